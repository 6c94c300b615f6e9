"""Sharded checkpoints written by every rank (issue 14): FSDP2 and DDP saves, resharding loads,
a rank that fails its write, DCP interop, `ckpt convert`, bounded save memory, `ckpt verify`.

Each job is `tests/support/sharded_job.py` under a real 2-process torchrun (gloo on CPU) on a tiny
model; the results come back as one JSON line.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import PYTHON, REPO, base_env, call_cli

SCRIPT = str(REPO / "tests" / "support" / "sharded_job.py")
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks go back to the OS: RSS follows live memory


def job(args: list[str], nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 240) -> dict:
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), SCRIPT, *args] \
        if nproc > 1 else [PYTHON, SCRIPT, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=base_env(env), timeout=timeout, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def fsdp_save(tmp_path_factory) -> dict:
    """One FSDP 2-rank job: a save that fails on rank 1, the next that succeeds, and the memory check."""
    root = tmp_path_factory.mktemp("fsdp")
    result = job(["save", "--parallelism", "fsdp", "--run-dir", str(root / "run"), "--out", str(root / "ref"),
                  "--fault-rank", "1", "--memory-run-dir", str(root / "memory"), "--async-step"], env=MEMORY_ENV)
    result["root"] = root
    return result


def _committed(result: dict) -> str:
    return result["outcomes"][-1]["url"]


@pytest.mark.timeout(300)
def test_a_rank_that_fails_its_write_commits_nothing_and_the_next_save_succeeds(fsdp_save):
    failed, ok = fsdp_save["outcomes"]
    assert "rank 1" in failed["error"] and "injected" in failed["error"]
    assert failed["run_dir_after"] == []  # no checkpoint folder, no staging folder: every rank's files gone
    assert ok["run_dir_after"] == ["ckpt-g0001-s0000000002"]
    assert ok["manifest_digest"] == fsdp_save["digest"]  # streamed digest == digest of the full tensors


@pytest.mark.timeout(300)
def test_a_save_committed_in_a_thread_while_training_holds_the_boundary_state(fsdp_save):
    saved = fsdp_save["async"]
    assert "error" not in saved, saved
    assert saved["manifest_digest"] == saved["expected"] != saved["after_step"]


@pytest.mark.timeout(300)
def test_verify_passes_and_one_manifest_lists_both_ranks_files(fsdp_save, capsys):
    url = _committed(fsdp_save)
    code, out, _ = call_cli(["ckpt", "verify", url], capsys)
    assert code == 0, out
    manifest = json.loads((Path(url) / "manifest.json").read_text())
    files = set(manifest["files"])
    for rank in (0, 1):
        assert {f"shards/rank{rank:05d}/model.safetensors", f"shards/rank{rank:05d}/optimizer.safetensors"} <= files
    assert manifest["sharded"] == {"version": 1, "world_size": 2, "entries": ["model", "optimizer"]}
    # A damaged shard of rank 1 makes the checkpoint invalid.
    shard = Path(url) / "shards/rank00001/model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    damaged = fsdp_save["root"] / "damaged"
    import shutil
    shutil.copytree(url, damaged / "ckpt-g0001-s0000000002")
    (damaged / "ckpt-g0001-s0000000002/shards/rank00001/model.safetensors").write_bytes(bytes(data))
    code, out, _ = call_cli(["ckpt", "verify", str(damaged / "ckpt-g0001-s0000000002")], capsys)
    assert code == 1 and "shards/rank00001/model.safetensors does not match its sha256" in out


@pytest.mark.timeout(300)
def test_fsdp_save_memory_is_the_shard_plus_a_bounded_buffer(fsdp_save):
    memory = fsdp_save["memory"]
    total = memory["total_bytes"]
    for rank in memory["ranks"]:
        assert rank["snapshot_bytes"] <= rank["local_bytes"]  # the copies hold this rank's shard, no more
        assert rank["local_bytes"] < 0.55 * total
        if rank["rss_growth"] is not None:
            assert rank["rss_growth"] < rank["local_bytes"] + 8 * 2**20, memory
    rank0 = memory["ranks"][0]
    if rank0["full_gather_growth"] is not None:  # the control: the measurement sees a full state
        assert rank0["full_gather_growth"] > 0.9 * total, memory


@pytest.mark.timeout(300)
def test_fsdp_2_ranks_loads_on_2_ranks_and_as_a_dcp_program(fsdp_save):
    url = _committed(fsdp_save)
    result = job(["load", "--parallelism", "fsdp", "--ckpt", url, "--out", str(fsdp_save["root"] / "ref"), "--dcp"])
    loaded = result["results"][0]
    assert loaded["differing"] == [] and loaded["extra"] == []  # model and optimizer, every tensor equal
    assert loaded["digest"] == fsdp_save["digest"]
    assert loaded["dcp_digest"] == fsdp_save["digest"]


@pytest.mark.timeout(300)
def test_fsdp_2_ranks_loads_in_one_process(fsdp_save):
    result = job(["load", "--parallelism", "fsdp", "--ckpt", _committed(fsdp_save),
                  "--out", str(fsdp_save["root"] / "ref")], nproc=1)
    assert result["world_size"] == 1
    assert result["results"][0]["differing"] == [] and result["results"][0]["digest"] == fsdp_save["digest"]


@pytest.mark.timeout(300)
def test_convert_equals_the_full_state(fsdp_save, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    code, printed, err = call_cli(["ckpt", "convert", _committed(fsdp_save), "--out", str(out)], capsys)
    assert code == 0, err
    assert fsdp_save["digest"] in printed
    reference = load_file(str(fsdp_save["root"] / "ref" / "reference.safetensors"))
    model = {k[len("model."):]: v for k, v in reference.items() if k.startswith("model.")}
    converted = load_file(str(out))
    assert converted.keys() == model.keys()
    assert all((converted[k] == model[k]).all() and converted[k].dtype == model[k].dtype for k in model)
    code, _, err = call_cli(["ckpt", "convert", _committed(fsdp_save), "--out", str(out)], capsys)
    assert code == 2 and "exists already" in err


@pytest.mark.timeout(400)
def test_ddp_checkpoints_of_both_layouts_load_into_fsdp(tmp_path):
    saved = job(["save", "--parallelism", "ddp", "--run-dir", str(tmp_path / "all"), "--out", str(tmp_path / "ref"),
                 "--legacy-run-dir", str(tmp_path / "rank0")])
    sharded, legacy = _committed(saved), saved["legacy"]["url"]
    manifest = json.loads((Path(sharded) / "manifest.json").read_text())
    sizes = [sum(e["size"] for name, e in manifest["files"].items() if name.startswith(f"shards/rank{r:05d}/"))
             for r in (0, 1)]
    assert min(sizes) > 0.3 * sum(sizes)  # replicated DDP state is split: each rank writes about half
    result = job(["load", "--parallelism", "fsdp", "--ckpt", sharded, "--ckpt", legacy, "--out", str(tmp_path / "ref")])
    for loaded in result["results"]:
        assert loaded["differing"] == [] and loaded["digest"] == saved["digest"]


@pytest.mark.timeout(300)
def test_sharded_save_and_load_on_s3_with_a_failing_rank(s3_env, s3_bucket, tmp_path):
    run = f"s3://{s3_bucket}/run"
    result = job(["save", "--parallelism", "fsdp", "--run-dir", run, "--out", str(tmp_path / "ref"),
                  "--fault-rank", "1", "--reload"], env=s3_env)
    failed, ok = result["outcomes"]
    assert "injected" in failed["error"] and failed["run_dir_after"] == []
    assert ok["run_dir_after"] == ["ckpt-g0001-s0000000002"] and ok["manifest_digest"] == result["digest"]
    assert result["reload"]["differing"] == [] and result["reload"]["digest"] == result["digest"]


@pytest.mark.slow  # an opt-in bench family (`--only sharded`); the default families run in test_bench.py
@pytest.mark.timeout(500)
def test_bench_sharded_family_runs_at_tiny_size(tmp_path):
    from conftest import run_cli

    out = tmp_path / "bench.json"
    result = run_cli(["bench", "--tiny", "--only", "sharded", "--json", str(out), "--work-dir", str(tmp_path / "w")],
                     timeout=480)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("sharded_save_speedup", "sharded_save_speedup_s3", "sharded_vs_dcp_save", "fsdp_overhead"):
        assert data[key]["error"] is None and data[key]["repeats"] == 1, (key, data[key])
    assert not list((tmp_path / "w").iterdir())
