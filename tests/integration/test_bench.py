"""Smoke test of `dist-train bench`: every benchmark's code runs once at a tiny size.

No timing assertions: the numbers of a tiny run on a shared machine mean nothing. It
checks that each figure is reported with its value and the raw numbers behind it.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

KEYS = ("stall_ratio", "save_efficiency", "s3_efficiency", "trainer_overhead", "ddp_scaling", "resume_ratio",
        "checkpoint_overhead", "async_thread_vs_process", "load_ratio", "load_ratio_old_path", "restart_load_ratio",
        "restore_vs_dcp", "restore_bytes_ratio", "restore_scaling", "restore_sha256_ratio")


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_bench_tiny_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(["bench", "--tiny", "--json", str(out), "--work-dir", str(tmp_path / "work")], timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| stall_ratio" in result.stdout
    data = json.loads(out.read_text())
    for key in KEYS:
        figure = data[key]
        assert figure["error"] is None, (key, figure["error"])
        assert figure["raw"], key
        if figure["value"] is None:
            # Only an information figure may be undefined in one repetition (the thread lost no time).
            assert key == "async_thread_vs_process" and figure["repeats"] == 0, key
            continue
        assert isinstance(figure["value"], float), key
        assert figure["repeats"] == 1 and len(figure["ratios"]) == 1, key
        assert figure["min"] <= figure["value"] <= figure["max"], key
    assert data["save_efficiency"]["raw"]["bytes"] >= 4 * 2**20
    assert data["checkpoint_overhead"]["raw"]["every_k_steps"] >= 1
    assert data["meta"]["machine"]["nproc"] >= 1
    assert set(data["meta"]["family_seconds"]) == {"io", "load", "restart", "s3", "training", "resume"}
    restart = data["restart_load_ratio"]["raw"]  # both sides read the same checkpoint, each side once
    assert restart["checkpoint_bytes"] >= 4 * 2**20 and len(restart["cache_s"]) == len(restart["s3_s"]) == 1
    assert not list((tmp_path / "work").iterdir())  # the benchmark cleans up after itself


def test_bench_rejects_unknown_family():
    result = run_cli(["bench", "--only", "disk"])
    assert result.returncode == 2
    assert "unknown benchmark family disk" in result.stderr
