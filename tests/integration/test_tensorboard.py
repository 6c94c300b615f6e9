"""`--tensorboard`: event files read back with TensorBoard's own reader, on disk and on S3.

The expected tags sit at their optimizer steps. After a resume that redoes steps (the newest
checkpoint, the preempted one, is corrupt, so the run goes back to the one before it), the raw
event files do hold those steps twice, and TensorBoard's reader shows each step once, with the
values of the run that redid it: the resumed writer's `purge_step` tells the reader to drop them.
"""

from __future__ import annotations

import math
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, base_env, kill_group, manifests, run_cli, run_forked, wait_for
from dist_train.data.config import DataConfig
from dist_train.data.registry import build_datasets
from dist_train.errors import EXIT_PREEMPTED

# the embedded digits, one process, 64 a batch
BATCH = 64
FLAGS = ["--model", "mlp", "--width", "32", "--batch-size", str(BATCH), "--checkpoint-every", "4", "--tensorboard",
         "--no-progress"]
LAST = 30  # the resumed run stops here: validations at the first epoch's end and at the end
TAGS = {"train/loss", "train/lr", "train/accuracy", "val/loss", "val/accuracy"}


def accumulator(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    reader.Reload()
    return reader


def scalars(reader, tag: str) -> dict[int, float]:
    events = reader.Scalars(tag)
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"{tag}: a step appears twice: {sorted(steps)}"
    return {e.step: e.value for e in events}


def raw_scalars(folder: Path, tag: str) -> list[list[tuple[int, float]]]:
    """(step, value) of `tag` per event file, oldest file first, as written (no purging)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    files = sorted(folder.glob("events.out.tfevents.*"))
    return [[(event.step, value.simple_value) for event in LegacyEventFileLoader(str(path)).Load()
             for value in event.summary.value if value.tag == tag] for path in files]


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_tags_at_their_steps_and_no_step_twice_after_sigterm_and_a_resume_that_redoes_steps(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    first = [PYTHON, "-m", "dist_train", "train", "--run-dir", str(run_dir), *FLAGS, "--epochs", "50",
             "--log-every", "1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(first, stdout=out, stderr=subprocess.STDOUT, env=base_env(), cwd=REPO,
                                start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or any(m["step"] >= 8 for m in manifests(run_dir)), 120,
                 interval=0.02, what="the checkpoint of step 8")
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
    finally:
        kill_group(proc)
        proc.wait(10)
    assert status == EXIT_PREEMPTED, log.read_text()[-3000:]
    newest, previous = manifests(run_dir)[-1], manifests(run_dir)[-2]
    stopped, resumed_from = newest["step"], previous["step"]
    assert 8 <= stopped < LAST - 4, stopped

    # The newest checkpoint is damaged: the resume skips it and redoes the steps after the one before.
    ckpt = next(p.parent for p in run_dir.glob("ckpt-*/manifest.json") if f"-s{stopped:010d}" in p.parent.name)
    corrupt(ckpt / "model.safetensors")
    second = run_forked(["train", "--run-dir", str(run_dir), *FLAGS, "--epochs", "50", "--log-every", "1",
                      "--max-steps", str(LAST)], timeout=180)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"skipping checkpoint {ckpt}" in second.stderr and f"(step {resumed_from}," in second.stderr

    folder = run_dir / "tensorboard"
    reader = accumulator(folder)
    assert TAGS <= set(reader.Tags()["scalars"]), reader.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/accuracy"):
        assert sorted(scalars(reader, tag)) == list(range(1, LAST + 1)), tag
    steps_per_epoch = math.ceil(len(build_datasets(DataConfig(), seed=0).train) / BATCH)
    assert steps_per_epoch < LAST
    for tag in ("val/loss", "val/accuracy"):
        assert sorted(scalars(reader, tag)) == [steps_per_epoch, LAST], tag
    assert all(math.isfinite(v) and v > 0 for v in scalars(reader, "train/loss").values())

    # As written, the redone steps are in the files twice; the reader keeps the redone values.
    written = raw_scalars(folder, "train/loss")
    assert len(written) == 2, "one event file per attempt"
    counts = Counter(step for per_file in written for step, _ in per_file)
    redone = set(range(resumed_from + 1, stopped + 1))
    assert {step for step, n in counts.items() if n > 1} == redone
    shown = scalars(reader, "train/loss")
    assert all(shown[step] == value for step, value in written[1]), "the resumed run's values win"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_event_files_of_an_s3_run_dir_are_uploaded_and_readable(tmp_path, s3_env, s3_bucket):
    import boto3

    run_url, scratch = f"s3://{s3_bucket}/runs/tb", tmp_path / "scratch"
    scratch.mkdir()
    result = run_cli(["train", "--run-dir", run_url, *FLAGS, "--max-steps", "6", "--log-every", "2"],
                     env={**s3_env, "TMPDIR": str(scratch)}, timeout=100)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(scratch.glob("dist-train-tb-*")), "the local staging folder of the events is removed"

    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    listing = client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/tb/tensorboard/").get("Contents", [])
    keys = [item["Key"] for item in listing]
    assert keys and all(Path(key).name.startswith("events.out.tfevents.") for key in keys), keys
    local = tmp_path / "downloaded"
    local.mkdir()
    for key in keys:
        client.download_file(s3_bucket, key, str(local / Path(key).name))

    reader = accumulator(local)
    assert TAGS <= set(reader.Tags()["scalars"])
    assert sorted(scalars(reader, "train/loss")) == sorted(scalars(reader, "train/lr")) == [2, 4, 6]
    assert sorted(scalars(reader, "val/loss")) == sorted(scalars(reader, "val/accuracy")) == [6]
