"""Transfer learning with a frozen torchvision backbone: the frozen part never changes, resume is exact.

The pretrained file's BatchNorm statistics are deliberately not the defaults, so a
backbone whose BatchNorm layers slip into training mode (even for one step, e.g. before
the first validation or right after a resume) changes them and fails these tests.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import final_digest, kill_group, manifests, run_torchrun, start_torchrun, wait_for

JOB = ["train", "--model", "resnet18", "--freeze-backbone", "--dataset", "synthetic", "--synthetic-shape", "3,32,32",
       "--synthetic-size", "320", "--synthetic-classes", "3", "--batch-size", "16", "--epochs", "2",
       "--checkpoint-every", "4", "--deterministic", "--no-progress", "--log-every", "4", "--lr", "0.01"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A stock resnet18 state_dict whose BatchNorm running statistics are far from the defaults."""
    import torchvision

    torch.manual_seed(7)
    net = torchvision.models.resnet18(weights=None)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(1000)
    path = tmp_path_factory.mktemp("weights") / "resnet18-pretrained.pt"
    torch.save(net.state_dict(), path)
    return path


def _job(run_dir: Path, pretrained: Path) -> list[str]:
    return [*JOB, "--run-dir", str(run_dir), "--pretrained-weights", str(pretrained)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, pretrained) -> Path:
    run_dir = tmp_path_factory.mktemp("tl-reference") / "run"
    result = run_torchrun(2, _job(run_dir, pretrained), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.timeout(360)
def test_the_frozen_backbone_stays_bit_identical_to_the_pretrained_file(uninterrupted, pretrained):
    stock = torch.load(pretrained, weights_only=True)
    for folder in sorted(uninterrupted.glob("ckpt-*")):
        saved = load_file(folder / "model.safetensors")
        frozen = {k: v for k, v in stock.items() if not k.startswith("fc.")}
        assert frozen, "no backbone tensors to compare"
        for key, tensor in frozen.items():
            assert torch.equal(saved[f"net.{key}"], tensor), f"{folder.name}: frozen {key} changed"
        assert not torch.equal(saved["net.fc.weight"][:3], stock["fc.weight"][:3]), "the new head is new"


@pytest.mark.timeout(420)
def test_transfer_learning_resumes_bit_exactly_after_sigterm(uninterrupted, pretrained, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_torchrun(2, _job(run_dir, pretrained), log_path=tmp_path / "first.log")
    try:
        wait_for(lambda: any(m["step"] >= 4 for m in manifests(run_dir)) or proc.poll() is not None, timeout=240,
                 what="the first committed checkpoint")
        kill_group(proc, signal.SIGTERM)
        assert proc.wait(timeout=120) != 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        kill_group(proc)
    steps = [m["step"] for m in manifests(run_dir)]
    final_step = manifests(uninterrupted)[-1]["step"]
    assert steps and steps[-1] < final_step, f"the job was not interrupted: {steps}"
    result = run_torchrun(2, _job(run_dir, pretrained), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert manifests(run_dir)[-1]["step"] == final_step
    assert final_digest(run_dir) == final_digest(uninterrupted)
