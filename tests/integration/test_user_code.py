"""Your own model, data and task: a user package outside dist_train, trained by real 2-rank jobs.

`tests/support/userpkg` stands for the user's code: an MLP with dropout, a map-style Dataset, a
Huber task and a training script that uses the Python API. It is importable only through
PYTHONPATH or the current directory, never from dist_train. Each job is trained without
interruption once, and once preempted mid-epoch (SIGTERM to the launcher) and resumed with the
same command: with `--deterministic` both end with the same `model_digest`. Inference then
rebuilds the user's model from the manifest alone. Bad user code exits 2 with one line.

To preempt mid-epoch without racing the job, the user's Dataset holds each rank still once it
has served `HOLD_AFTER` training samples while a gate file exists (`userpkg/data.py`); the test
signals while the ranks wait and releases the gate once rank 0 reports the signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, base_env, final_digest, kill_group, manifests, run_cli, run_forked, wait_for
from dist_train.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED

SUPPORT = REPO / "tests" / "support"
SCRIPT = SUPPORT / "userpkg" / "train_script.py"
USER_PATH = {"PYTHONPATH": os.pathsep.join([str(REPO), str(SUPPORT)])}
MODEL_ARGS = {"hidden": 32, "dropout": 0.1}
# 512 training samples, 2 ranks x 16: 16 optimizer steps an epoch, 32 in all.
LOOP = ["--epochs", "2", "--batch-size", "16", "--lr", "0.01", "--log-every", "4", "--checkpoint-every", "4",
        "--deterministic", "--no-progress"]
CLI_FLAGS = ["--model", "userpkg.models:build", "--model-args", json.dumps(MODEL_ARGS),
             "--dataset", "userpkg.data:Wave", *LOOP]
STEPS, STEPS_PER_EPOCH = 32, 16
# Each rank waits at the gate in its 6th step (dist_train reads item 0 once to check the data set):
# after the step-4 checkpoint, so the stop comes mid-epoch, before the step-8 one.
HOLD_AFTER = 6 * 16


# -- jobs --------------------------------------------------------------------------------------

def launch_cmd(run_dir: Path, *flags: str) -> list[str]:
    """`dist-train launch` is torchrun's agent, with an exit status that says "preempted" (75)."""
    return [PYTHON, "-m", "dist_train", "launch", "--standalone", "--nproc-per-node", "2", "--",
            "train", "--run-dir", str(run_dir), *flags]


def script_cmd(run_dir: Path, *flags: str) -> list[str]:
    """Plain torchrun running the user's own script."""
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
            "--run-dir", str(run_dir), *flags]


def start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=base_env(env), cwd=REPO,
                                start_new_session=True)


def run_to_end(command: list[str], log: Path, env: dict[str, str], timeout: float = 300) -> int:
    proc = start(command, log, env)
    try:
        return proc.wait(timeout)
    finally:
        kill_group(proc)
        proc.wait(10)


def gated(env: dict[str, str], gate: Path) -> dict[str, str]:
    return {**env, "USERPKG_GATE": str(gate), "USERPKG_GATE_AFTER": str(HOLD_AFTER)}


def preempt_mid_epoch(command: list[str], run_dir: Path, tmp_path: Path, env: dict[str, str]) -> tuple[int, str]:
    """Start the job; once the first interval checkpoint is committed and both ranks wait at the gate,
    SIGTERM the launcher's process group; release the gate once rank 0 logged the signal."""
    gate, log = tmp_path / "gate", tmp_path / "preempted.log"
    gate.touch()
    proc = start(command, log, gated(env, gate))
    try:
        def ready() -> bool:
            held = len(list(tmp_path.glob("gate.held-*"))) == 2
            return proc.poll() is not None or (held and any(m["reason"] == "interval" for m in manifests(run_dir)))
        wait_for(ready, 240, interval=0.02, what="an interval checkpoint and both ranks at the gate")
        assert proc.poll() is None, log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        wait_for(lambda: "SIGTERM received" in log.read_text(), 60, what="rank 0 to report SIGTERM")
        gate.unlink()
        status = proc.wait(120)
    finally:
        kill_group(proc)
        proc.wait(10)
    return status, log.read_text()


def assert_preempted_mid_epoch(run_dir: Path, log: str) -> dict:
    preempted = manifests(run_dir)[-1]
    assert preempted["reason"] == "preempted", log[-3000:]
    assert 4 < preempted["step"] < STEPS_PER_EPOCH and preempted["sampler"]["position"] > 0, preempted["sampler"]
    return preempted


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def one_line_error(result: subprocess.CompletedProcess, *names: str) -> str:
    err = result.stderr.strip()
    assert result.returncode == EXIT_BAD_INPUT, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and len(err.splitlines()) == 1, result.stderr
    for name in names:
        assert name in err, err
    return err


@pytest.fixture(scope="module")
def userpkg():
    """The user's package imported here too, to compute baselines and rebuild an exported model."""
    import sys

    sys.path.insert(0, str(SUPPORT))
    try:
        import userpkg.data
        import userpkg.models
        yield userpkg
    finally:
        sys.path.remove(str(SUPPORT))


def mean_predictor(userpkg) -> tuple[float, float]:
    """Validation MSE and mean absolute error of always predicting the training targets' mean."""
    train, val = userpkg.data.Wave("train"), userpkg.data.Wave("val")
    error = val.y - train.y.mean()
    return float(error.pow(2).mean()), float(error.abs().mean())


# -- import paths on the CLI -------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.timeout(600)
def test_user_model_and_data_with_regression_learn_resume_exactly_evaluate_and_export(tmp_path, userpkg):
    flags = [*CLI_FLAGS, "--task", "regression"]
    reference = tmp_path / "reference"
    status = run_to_end(launch_cmd(reference, *flags), tmp_path / "reference.log", USER_PATH)
    assert status == 0, (tmp_path / "reference.log").read_text()[-3000:]

    run_dir = tmp_path / "run"
    status, log = preempt_mid_epoch(launch_cmd(run_dir, *flags), run_dir, tmp_path, USER_PATH)
    assert status == EXIT_PREEMPTED, log[-3000:]
    assert_preempted_mid_epoch(run_dir, log)
    status = run_to_end(launch_cmd(run_dir, *flags), tmp_path / "resumed.log", gated(USER_PATH, tmp_path / "gate"))
    resumed_log = (tmp_path / "resumed.log").read_text()
    assert status == 0 and "resuming from" in resumed_log, resumed_log[-3000:]

    final = manifests(run_dir)[-1]
    assert final["step"] == STEPS and final["model_digest"] == final_digest(reference)
    assert final["model"] == {"name": "userpkg.models:build", "args": MODEL_ARGS, "shape": {"in_channels": 8}}
    assert final["task"] == "regression"

    baseline_mse, _ = mean_predictor(userpkg)
    val = [r for r in metrics_lines(run_dir) if r.get("split") == "val"]
    assert [r["step"] for r in val] == [STEPS_PER_EPOCH, STEPS]
    assert val[-1]["mse"] < 0.5 * baseline_mse, (val[-1], baseline_mse)

    # evaluate rebuilds the user's model and data set from the manifest (userpkg on PYTHONPATH)
    result = run_forked(["evaluate", "--checkpoint", str(run_dir), "--json"], env=USER_PATH)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert (report["model"], report["task"], report["step"], report["count"]) == \
        ("userpkg.models:build", "regression", STEPS, 128)
    assert report["loss"] == pytest.approx(final["metrics"]["val_loss"], rel=1e-5)
    assert report["mse"] == pytest.approx(val[-1]["mse"], rel=1e-5) and "mae" in report

    # export, from the folder that holds userpkg (the current directory is on the path)
    out = tmp_path / "m.safetensors"
    result = run_cli(["export", "--checkpoint", str(run_dir), "--out", str(out)], cwd=SUPPORT)
    assert result.returncode == 0, result.stderr[-2000:]
    from safetensors.torch import load_file

    from dist_train.checkpoint.manifest import model_digest
    state = load_file(str(out))
    assert model_digest(state) == final["model_digest"]
    model = userpkg.models.build(**final["model"]["args"], **final["model"]["shape"])
    model.load_state_dict(state, strict=True)
    assert json.loads(Path(f"{out}.json").read_text())["model"] == final["model"]

    # where userpkg cannot be imported: one line naming the module, exit 2
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli(["evaluate", "--checkpoint", str(run_dir)], cwd=elsewhere)
    one_line_error(result, "module userpkg.models not found")


@pytest.fixture(scope="module")
def huber_reference(tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted run of the user's script (Huber task, EMA extra, hook recorder): its run dir
    and hook records. The CLI with the same import paths trains the very same model."""
    base = tmp_path_factory.mktemp("huber-reference")
    run_dir, hooks = base / "run", base / "hooks"
    status = run_to_end(script_cmd(run_dir, *LOOP), base / "train.log", {**USER_PATH, "USERPKG_HOOKS": str(hooks)})
    assert status == 0, (base / "train.log").read_text()[-3000:]
    return run_dir, hooks


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_custom_task_callable_trains_resumes_exactly_and_logs_its_metrics(tmp_path, userpkg, huber_reference):
    flags = [*CLI_FLAGS, "--task", "userpkg.tasks:huber"]
    run_dir = tmp_path / "run"
    status, log = preempt_mid_epoch(launch_cmd(run_dir, *flags), run_dir, tmp_path, USER_PATH)
    assert status == EXIT_PREEMPTED, log[-3000:]
    assert_preempted_mid_epoch(run_dir, log)
    status = run_to_end(launch_cmd(run_dir, *flags), tmp_path / "resumed.log", gated(USER_PATH, tmp_path / "gate"))
    assert status == 0, (tmp_path / "resumed.log").read_text()[-3000:]

    final = manifests(run_dir)[-1]
    # the same model_digest as an uninterrupted run (of the Python API with the same callables)
    assert final["step"] == STEPS and final["model_digest"] == final_digest(huber_reference[0])
    assert final["task"] == "userpkg.tasks:huber"

    records = metrics_lines(run_dir)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    assert train and val and all({"abs_error", "within_quarter"} <= set(r) for r in train + val)
    assert {r["generation"] for r in train} == {1, 2}, "both attempts log the custom metrics"
    _, baseline_mae = mean_predictor(userpkg)
    assert val[-1]["abs_error"] < 0.6 * baseline_mae, (val[-1], baseline_mae)


# -- the Python API ----------------------------------------------------------------------------

def hook_records(folder: Path, rank: int) -> list[list[dict]]:
    """The hook calls of one rank, split into attempts (each begins with on_train_start)."""
    attempts: list[list[dict]] = []
    for line in (folder / f"rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["hook"] == "on_train_start":
            attempts.append([])
        attempts[-1].append(record)
    return attempts


def calls(attempt: list[dict], hook: str) -> list[dict]:
    return [r for r in attempt if r["hook"] == hook]


def assert_hooks_as_documented(attempt: list[dict], rank: int, first_step: int, last_step: int, outcome: str,
                               run_dir: Path, generation: int) -> None:
    assert attempt[0]["hook"] == "on_train_start" and attempt[0]["step"] == first_step
    assert attempt[-1]["hook"] == "on_train_end" and attempt[-1]["outcome"] == outcome
    assert attempt[-1]["step"] == last_step
    steps = [r["step"] for r in calls(attempt, "on_train_batch_end")]
    assert steps == list(range(first_step + 1, last_step + 1)), "one call after each optimizer step"
    assert all(r["loss"] is not None and r["loss"] > 0 for r in calls(attempt, "on_train_batch_end"))
    validations = calls(attempt, "on_validation_end")
    assert [r["step"] for r in validations] == [s for s in (STEPS_PER_EPOCH, STEPS) if first_step < s <= last_step]
    assert all({"loss", "abs_error", "within_quarter"} <= set(r["metrics"]) for r in validations)
    saves = calls(attempt, "on_save_checkpoint")
    if rank != 0:
        assert not saves, "on_save_checkpoint runs on rank 0 only"
        return
    # once per checkpoint this attempt committed, in order, with the step it holds
    named = [Path(r["url"]).name for r in saves]
    assert named == sorted(p.parent.name for p in run_dir.glob(f"ckpt-g{generation:04d}-*/manifest.json"))
    assert [r["step"] for r in saves] == [int(name.split("-s")[1]) for name in named]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_python_api_script_with_stateful_extra_and_callbacks(tmp_path, huber_reference):
    reference, ref_hooks = huber_reference
    for rank in (0, 1):
        [attempt] = hook_records(ref_hooks, rank)
        assert_hooks_as_documented(attempt, rank, 0, STEPS, "finished", reference, 1)
        assert not calls(attempt, "on_preemption")
    ref_saves = calls(hook_records(ref_hooks, 0)[0], "on_save_checkpoint")
    assert [r["step"] for r in ref_saves] == [4, 8, 12, 16, 20, 24, 28, 32]

    run_dir, hooks = tmp_path / "run", tmp_path / "hooks"
    env = {**USER_PATH, "USERPKG_HOOKS": str(hooks)}
    status, log = preempt_mid_epoch(script_cmd(run_dir, *LOOP), run_dir, tmp_path, env)
    # Plain torchrun turns its own SIGTERM into a SignalException (status 1); the workers' 75 shows in the log.
    assert status != 0 and "checkpoint committed, exit status 75" in log, log[-3000:]
    preempted = assert_preempted_mid_epoch(run_dir, log)
    assert "ema" in preempted["entries"]
    status = run_to_end(script_cmd(run_dir, *LOOP), tmp_path / "resumed.log", gated(env, tmp_path / "gate"))
    assert status == 0, (tmp_path / "resumed.log").read_text()[-3000:]

    for rank in (0, 1):
        first, second = hook_records(hooks, rank)
        assert_hooks_as_documented(first, rank, 0, preempted["step"], "preempted", run_dir, 1)
        assert_hooks_as_documented(second, rank, preempted["step"], STEPS, "finished", run_dir, 2)
        [stop] = calls(first, "on_preemption")
        assert stop["step"] == preempted["step"] and not calls(second, "on_preemption")
        assert first.index(stop) == len(first) - 2 - (rank == 0), "then the final checkpoint, then on_train_end"
        # the extra's state after the resume is the state that was saved
        resumed = second[0]
        assert resumed["ema_updates"] == preempted["step"]
        assert resumed["ema_digest"] == first[-1]["ema_digest"]
        if rank == 0:
            [saved] = [r for r in calls(first, "on_save_checkpoint") if r["step"] == preempted["step"]]
            assert first.index(saved) == len(first) - 2 and saved["ema_digest"] == resumed["ema_digest"]
        # ... and the run ends where the uninterrupted one did, EMA included
        assert second[-1]["ema_digest"] == hook_records(ref_hooks, rank)[0][-1]["ema_digest"]
        assert second[-1]["ema_updates"] == STEPS
    assert final_digest(run_dir) == final_digest(reference)

    final = manifests(run_dir)[-1]
    assert final["model"]["name"] == "userpkg.models:build" and final["task"] == "userpkg.tasks:huber"
    # the callables are recorded as import paths: evaluate rebuilds model, data and task
    result = run_forked(["evaluate", "--checkpoint", str(run_dir), "--json"], env=USER_PATH)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["task"] == "userpkg.tasks:huber" and report["step"] == STEPS
    assert report["abs_error"] == pytest.approx(final["metrics"]["val_abs_error"], rel=1e-5)


# -- bad user code: exit 2, one line naming it, nothing written ------------------------------------

BAD = [
    (["--model", "userpkg.nowhere:build"], ["userpkg.nowhere"]),
    (["--model", "userpkg.broken:build"], ["userpkg.broken imports userpkg_missing_dependency"]),
    (["--model", "userpkg.models:nothing"], ["userpkg.models:nothing"]),
    (["--model", "userpkg.bad:raises"], ["userpkg.bad:raises", "failed on purpose"]),
    (["--model", "userpkg.bad:not_a_module"], ["userpkg.bad:not_a_module", "torch.nn.Module"]),
    (["--dataset", "userpkg.bad:NoLength"], ["userpkg.bad:NoLength", "__len__"]),
    (["--model-args", "{hidden: 32"], ["--model-args"]),
    (["--task", "huber"], ["--task", "huber"]),
]


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad, names", BAD, ids=[" ".join(b) for b, _ in BAD])
def test_bad_user_code_exits_2_with_one_line_and_writes_nothing(tmp_path, bad, names):
    run_dir = tmp_path / "run"
    result = run_forked(["train", "--run-dir", str(run_dir), *CLI_FLAGS, "--task", "regression", *bad], env=USER_PATH)
    one_line_error(result, *names)
    assert not run_dir.exists()
