"""The examples in examples/ run as their docstrings say, and keep the contract's promises.

- char_transformer.py (Python API, language_model task): learns (validation perplexity far
  below the vocabulary size) and resumes bit-exactly after SIGTERM under torchrun.
- ddp_loop.py (a hand-written loop with CheckpointManager): SIGKILLed at seeded random
  checkpoints and restarted, it ends bit-identical to an uninterrupted loop; a corrupt newest
  checkpoint is skipped with its reason; the same loop on S3 commits verifiable checkpoints.
- transfer_learning/model.py (an import path for `dist-train train`): the frozen resnet18
  base, BatchNorm statistics included, stays bit-identical to the pretrained file; evaluate,
  predict and export rebuild the model from the import path.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, REPO, base_env, call_cli, final_digest, kill_group, manifests, wait_for
from dist_train.errors import EXIT_PREEMPTED

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `examples` is a package at the repository root, as for `python -m`


def torchrun(nproc: int, *target: str) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *target]


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=base_env(env), timeout=timeout, cwd=REPO)


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=base_env(env), cwd=REPO,
                            start_new_session=True)


def committed_steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in manifests(run_dir)] if run_dir.exists() else []


# -- the character-level transformer (Python API) ------------------------------------------------

LM_ARGS = ["--max-steps", "40", "--checkpoint-every", "10", "--deterministic", "--no-progress",
           "--dataset-args", '{"train_sequences": 2560, "val_sequences": 256}']


def lm_cmd(run_dir: Path) -> list[str]:
    return torchrun(2, "-m", "examples.char_transformer", "--run-dir", str(run_dir), *LM_ARGS)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lm") / "run"
    result = run(lm_cmd(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_char_transformer_learns_far_below_the_uniform_perplexity(lm_run, capsys):
    from examples.char_transformer import corpus, generate

    vocab = len(corpus()[1])
    records = [json.loads(line) for line in (lm_run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("split") == "val"]
    assert val and val[-1]["step"] == 40, records[-3:]
    assert val[-1]["perplexity"] < vocab / 2, f"perplexity {val[-1]['perplexity']:.2f}, vocabulary {vocab}"

    code, out, err = call_cli(["evaluate", "--checkpoint", str(lm_run)], capsys)  # rebuilt from the import paths
    assert code == 0 and "perplexity" in out, out + err
    text = generate(str(lm_run), "The ", 30)
    assert text.startswith("The ") and len(text) == 34


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_char_transformer_resumes_bit_exactly_after_sigterm(lm_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(lm_cmd(run_dir), tmp_path / "first.log")
    try:
        wait_for(lambda: committed_steps(run_dir) or proc.poll() is not None, 240, interval=0.01,
                 what="the first committed checkpoint")
        kill_group(proc, signal.SIGTERM)
        code = proc.wait(120)
    finally:
        kill_group(proc)
        proc.wait(10)
    # Each rank leaves with 75 (preempted, resume me); plain torchrun itself reports its own SIGTERM
    # as 1 (`dist-train launch` maps it to 75, but launches `train` only, not a user's script).
    log = (tmp_path / "first.log").read_text()
    assert code != 0 and log.count(f"checkpoint committed, exit status {EXIT_PREEMPTED}") == 2, log[-3000:]
    assert committed_steps(run_dir)[-1] < 40, "the job was not interrupted"
    result = run(lm_cmd(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert manifests(run_dir)[-1]["step"] == 40
    assert final_digest(run_dir) == final_digest(lm_run)


# -- the hand-written DDP loop (CheckpointManager) -----------------------------------------------

LOOP_STEPS = 200


def loop_cmd(run_dir: str | Path, steps: int = LOOP_STEPS, save_every: int = 10) -> list[str]:
    return torchrun(2, "examples/ddp_loop.py", "--run-dir", str(run_dir), "--steps", str(steps),
                    "--save-every", str(save_every), "--keep-last", "3")


def reached(run_dir: Path, proc: subprocess.Popen, step: int):
    """A poll: the checkpoint of `step` (or a later one) is committed, or the job ended."""
    return lambda: any(s >= step for s in committed_steps(run_dir)) or proc.poll() is not None


def newest_committed(run_dir: Path) -> Path:
    return max(run_dir.glob("ckpt-*/manifest.json"), key=lambda p: json.loads(p.read_text())["step"]).parent


@pytest.fixture(scope="module")
def loop_reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("loop") / "run"
    result = run(loop_cmd(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_ddp_loop_killed_at_random_checkpoints_ends_bit_identical(loop_reference, tmp_path, capsys):
    """Two SIGKILLs of the whole job at seeded random checkpoints, then the newest checkpoint is damaged:
    the last restart skips it (with its reason), resumes from the one before, and ends bit-identical."""
    run_dir = tmp_path / "run"
    chooser = random.Random(13)
    target = 0
    for attempt in range(2):
        target += 10 * chooser.randint(1, 3)  # kill once the checkpoint of this step is committed
        proc = start(loop_cmd(run_dir), tmp_path / f"attempt{attempt}.log")
        try:
            wait_for(reached(run_dir, proc, target), 240, interval=0.002, what=f"the checkpoint of step {target}")
            kill_group(proc, signal.SIGKILL)
            code = proc.wait(60)
        finally:
            kill_group(proc)
            proc.wait(10)
        assert code == -signal.SIGKILL, (tmp_path / f"attempt{attempt}.log").read_text()[-3000:]
        target = committed_steps(run_dir)[-1]
        assert target < LOOP_STEPS, "the loop finished before the kill"

    damaged = newest_committed(run_dir)
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # same size, other bytes: only the sha256 can tell
    weights.write_bytes(bytes(data))
    result = run(loop_cmd(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping checkpoint {damaged}: " in result.stderr and "sha256" in result.stderr, result.stderr[-3000:]
    assert "resuming from" in result.stderr, result.stderr[-3000:]
    assert manifests(run_dir)[-1]["step"] == LOOP_STEPS
    assert final_digest(run_dir) == final_digest(loop_reference)
    code, out, err = call_cli(["ckpt", "verify", str(run_dir)], capsys)  # retention has removed the damaged one
    assert code == 0, out + err


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_ddp_loop_on_s3_commits_verifiable_checkpoints_and_resumes(loop_reference, s3_env, s3_bucket, capsys):
    url = f"s3://{s3_bucket}/loop"
    first = run(loop_cmd(url, steps=LOOP_STEPS // 2, save_every=50), env=s3_env)
    assert first.returncode == 0, first.stderr[-3000:]
    code, out, err = call_cli(["ckpt", "verify", url], capsys)
    assert code == 0, out + err
    second = run(loop_cmd(url, save_every=50), env=s3_env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr and f"step {LOOP_STEPS // 2}" in second.stderr, second.stderr[-3000:]
    code, out, err = call_cli(["ckpt", "list", url, "--json"], capsys)
    assert code == 0, err
    listed = json.loads(out)
    newest = max(listed, key=lambda c: c["step"])
    assert newest["step"] == LOOP_STEPS and all(c["valid"] for c in listed), listed
    assert newest["model_digest"] == final_digest(loop_reference)  # same math as the local, uninterrupted loop
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in first.stderr + second.stderr


# -- transfer learning through an import path ----------------------------------------------------

TL_MODEL = "examples.transfer_learning.model:build"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of two classes of small noisy images, and a stock resnet18 state_dict saved as "pretrained"
    whose BatchNorm running statistics are far from the defaults (so any drift shows)."""
    import torchvision
    from PIL import Image

    base = tmp_path_factory.mktemp("photos")
    gen = torch.Generator().manual_seed(0)
    for name, rgb in (("blue", (30, 60, 200)), ("red", (200, 40, 30))):
        (base / "images" / name).mkdir(parents=True)
        for i in range(12):
            noise = torch.randint(-40, 40, (40, 40, 3), generator=gen)
            pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(base / "images" / name / f"{i}.png")
    torch.manual_seed(7)
    net = torchvision.models.resnet18(weights=None)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(1000)
    torch.save(net.state_dict(), base / "resnet18.pt")
    return base / "images", base / "resnet18.pt"


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_transfer_learning_keeps_the_frozen_base_bit_identical_and_serves(photos, tmp_path, capsys):
    from safetensors.torch import load_file

    images, pretrained = photos
    run_dir = tmp_path / "run"
    result = run([PYTHON, "-m", "dist_train", "train", "--model", TL_MODEL, "--freeze-backbone",
                  "--dataset", "image_folder", "--data-root", str(images), "--image-size", "32",
                  "--pretrained-weights", str(pretrained), "--run-dir", str(run_dir), "--max-steps", "4",
                  "--checkpoint-every", "2", "--batch-size", "8", "--lr", "0.01", "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    stock = torch.load(pretrained, weights_only=True)
    frozen = {k: v for k, v in stock.items() if not k.startswith("fc.")}
    folders = sorted(run_dir.glob("ckpt-*"))
    assert len(folders) >= 2 and manifests(run_dir)[-1]["step"] == 4
    for folder in folders:
        saved = load_file(folder / "model.safetensors")
        for key, tensor in frozen.items():  # weights and BatchNorm running statistics alike
            assert torch.equal(saved[f"backbone.{key}"], tensor), f"{folder.name}: frozen {key} changed"
        assert set(saved) - {f"backbone.{k}" for k in frozen} == {"head.1.weight", "head.1.bias"}
    first = load_file(folders[0] / "model.safetensors")["head.1.weight"]
    assert not torch.equal(first, load_file(folders[-1] / "model.safetensors")["head.1.weight"]), "the head trains"

    code, out, err = call_cli(["evaluate", "--checkpoint", str(run_dir)], capsys)
    assert code == 0 and "accuracy" in out, out + err
    code, out, err = call_cli(["predict", "--checkpoint", str(run_dir), str(images / "red" / "0.png"),
                               "--top-k", "2", "--json"], capsys)
    assert code == 0 and "red" in out and "blue" in out, out + err
    exported = tmp_path / "model.safetensors"
    code, out, err = call_cli(["export", "--checkpoint", str(run_dir), "--out", str(exported)], capsys)
    assert code == 0, out + err
    weights = load_file(exported)
    assert torch.equal(weights["backbone.bn1.running_mean"], stock["bn1.running_mean"])
