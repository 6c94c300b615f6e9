"""Hostile or damaged checkpoints: nothing is ever unpickled, and manifests cannot point outside their folder.

The hostile file is a `torch.save` pickle whose `__reduce__` creates a marker file when unpickled,
placed where `model.safetensors` belongs, with a manifest whose sizes and sha256 match it (so the
checkpoint is "valid" by its hashes). Every loader (resume, predict, evaluate, export, pretrained
weights) must refuse it, and the marker must never appear.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from conftest import SMALL_RUN, copy_run
from support.forkserver import shared

JOB = ["train", "--max-steps", "20", "--checkpoint-every", "10", "--epochs", "1", "--batch-size", "32",
       "--log-every", "100", "--no-progress"]
CKPT10, CKPT20 = "ckpt-g0001-s0000000010", "ckpt-g0001-s0000000020"


class Evil:
    """Unpickling this calls open(marker, "w"): arbitrary code execution, made visible."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_bytes(marker: Path, tmp: Path) -> bytes:
    path = tmp / f"evil-{marker.name}.pt"
    torch.save({"net.0.weight": Evil(str(marker))}, path)
    return path.read_bytes()


def replace_file(folder: Path, name: str, data: bytes) -> None:
    """Swap a checkpoint file and make the manifest agree with it (size and sha256)."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def trained(trained_run) -> Path:
    return trained_run(*SMALL_RUN)


@pytest.fixture
def hostile(trained, tmp_path) -> tuple[Path, Path]:
    """(run dir whose newest checkpoint carries a malicious pickle, marker path)."""
    marker = tmp_path / "PWNED"
    run_dir = copy_run(trained, tmp_path, "hostile-run")
    replace_file(run_dir / CKPT20, "model.safetensors", evil_bytes(marker, tmp_path))
    return run_dir, marker


def _one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.rc == 2, result.output
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_the_hostile_file_really_is_hostile(tmp_path):
    """Positive control: an unsafe loader does run the payload (so the marker checks below mean something)."""
    marker = tmp_path / "control"
    path = tmp_path / "control.pt"
    path.write_bytes(evil_bytes(marker, tmp_path))
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.timeout(180)
def test_malicious_pickle_checkpoint_is_refused_everywhere(hostile, tmp_path):
    run_dir, marker = hostile
    server = shared()
    checkpoint = str(run_dir / CKPT20)

    verify = server.run(["ckpt", "verify", checkpoint])
    assert verify.rc == 0, verify.output  # its hashes match: valid as files, still never unpickled

    fresh = tmp_path / "fresh-run"
    line = _one_line_error(server.run([*JOB, "--run-dir", str(fresh), "--resume", checkpoint]))
    assert "not a valid checkpoint" in line and "safetensors" in line, line
    assert not fresh.exists(), "a refused resume wrote into its run dir"

    for argv in (["predict", "--checkpoint", checkpoint], ["evaluate", "--checkpoint", checkpoint],
                 ["export", "--checkpoint", checkpoint, "--out", str(tmp_path / "out.pt")]):
        line = _one_line_error(server.run(argv))
        assert "safetensors" in line, (argv, line)
    assert not (tmp_path / "out.pt").exists()

    # a run dir whose newest checkpoint is hostile: skipped with a reason, the older one is used
    predicted = server.run(["predict", "--checkpoint", str(run_dir), "--samples", "2"])
    assert predicted.rc == 0 and "skipping checkpoint" in predicted.stderr, predicted.output
    resumed = server.run(["train", "--max-steps", "30", *JOB[3:], "--run-dir", str(run_dir), "--resume", "auto"])
    assert resumed.rc == 0, resumed.output
    assert "skipping checkpoint" in resumed.stderr and f"resuming from {run_dir / CKPT10}" in resumed.stderr
    assert not marker.exists(), "the malicious pickle was unpickled"


@pytest.mark.timeout(120)
def test_malicious_pretrained_weights_are_refused(tmp_path):
    marker = tmp_path / "PWNED"
    weights = tmp_path / "evil.pt"
    weights.write_bytes(evil_bytes(marker, tmp_path))
    result = shared().run(["train", "--model", "resnet18", "--pretrained-weights", str(weights),
                           "--run-dir", str(tmp_path / "run"), "--max-steps", "1"])
    line = _one_line_error(result)
    assert "cannot load pretrained weights" in line, line
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "trainer.safetensors"])
def test_every_checkpoint_file_is_parsed_without_unpickling(trained, tmp_path, name):
    from dist_train.checkpoint.state import CorruptCheckpoint, read_payload
    from dist_train.checkpoint.storage import Storage

    marker = tmp_path / "PWNED"
    folder = tmp_path / CKPT20
    shutil.copytree(trained / CKPT20, folder)
    replace_file(folder, name, evil_bytes(marker, tmp_path))
    manifest = json.loads((folder / "manifest.json").read_text())
    with pytest.raises(CorruptCheckpoint, match="safetensors"):
        read_payload(Storage(str(folder)), manifest)
    assert not marker.exists()


def _bad_manifests(victim: Path) -> list[tuple[str, object, str]]:
    """(label, change to the manifest, words the refusal must contain)."""
    data = victim.read_bytes()
    real = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}  # a real file, outside the folder
    return [
        ("parent escape", {"../victim.bin": real}, "unsafe file name"),
        ("nested escape", {"sub/../../victim.bin": real}, "unsafe file name"),
        ("absolute path", {str(victim): real}, "unsafe file name"),
        ("windows drive", {"C:\\victim.bin": real}, "unsafe file name"),
        ("backslash", {"sub\\victim.bin": real}, "unsafe file name"),
        ("dot", {".": real}, "unsafe file name"),
        ("not normalized", {"./model.safetensors": real}, "unsafe file name"),
        ("manifest itself", {"manifest.json": real}, "unsafe file name"),
        ("NUL byte", {"model\0.safetensors": real}, "unsafe file name"),
        ("absurd size", {"model.safetensors": {"size": 2**60, "sha256": "0" * 64}}, "absurd"),
        ("negative size", {"model.safetensors": {"size": -1, "sha256": "0" * 64}}, "absurd"),
        ("string size", {"model.safetensors": {"size": "10", "sha256": "0" * 64}}, "absurd"),
        ("boolean size", {"model.safetensors": {"size": True, "sha256": "0" * 64}}, "absurd"),
        ("bad sha256", {"model.safetensors": {"size": 1, "sha256": "zz"}}, "sha256"),
        ("no files", {}, "files"),
        ("too many files", {f"f{i}": real for i in range(10_001)}, "files"),
    ]


@pytest.mark.timeout(120)
def test_hostile_manifests_are_refused(trained, tmp_path):
    """Names that leave the folder and absurd sizes make a checkpoint invalid, whatever the files hold."""
    from dist_train.checkpoint import catalog
    from dist_train.checkpoint.storage import Storage

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    victim = run_dir / "victim.bin"
    victim.write_bytes(b"secret bytes outside any checkpoint folder")
    original = json.loads((trained / CKPT20 / "manifest.json").read_text())
    for step, (label, files, words) in enumerate(_bad_manifests(victim), start=1):
        folder = run_dir / f"ckpt-g0001-s{step:010d}"
        shutil.copytree(trained / CKPT20, folder)
        manifest = dict(original, step=step, files=files)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        verdict = catalog.inspect(Storage(str(run_dir)), catalog.parse_name(folder.name))
        assert not verdict.valid, label
        assert words in verdict.reason, (label, verdict.reason)

    for label, field, value in (("negative epoch", "epoch", -1), ("string epoch", "epoch", "1"),
                                ("future format", "format_version", 99), ("digest", "model_digest", "x")):
        folder = run_dir / "ckpt-g0002-s0000000001"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(trained / CKPT20, folder)
        (folder / "manifest.json").write_text(json.dumps({**original, "step": 1, field: value}))
        verdict = catalog.inspect(Storage(str(run_dir)), catalog.parse_name(folder.name))
        assert not verdict.valid, label
    for label, data in (("not JSON", b"{nope"), ("a list", b"[]"), ("binary", b"\xff\xfe\x00")):
        (folder / "manifest.json").write_bytes(data)
        verdict = catalog.inspect(Storage(str(run_dir)), catalog.parse_name(folder.name))
        assert not verdict.valid and "manifest" in verdict.reason, label
    assert victim.read_bytes() == b"secret bytes outside any checkpoint folder"


@pytest.mark.timeout(120)
def test_escaping_manifest_is_refused_by_verify_and_resume(trained, tmp_path):
    """A manifest naming `../victim.bin` (with its true size and sha256) is invalid for the CLI too."""
    run_dir = copy_run(trained, tmp_path)
    victim = run_dir / "victim.bin"
    victim.write_bytes(b"not part of the checkpoint")
    folder = run_dir / CKPT20
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../victim.bin"] = {"size": victim.stat().st_size,
                                          "sha256": hashlib.sha256(victim.read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    server = shared()
    verify = server.run(["ckpt", "verify", str(folder)])
    assert verify.rc == 1 and "unsafe file name" in verify.stdout, verify.output
    line = _one_line_error(server.run([*JOB, "--run-dir", str(tmp_path / "new"), "--resume", str(folder)]))
    assert "unsafe file name" in line, line
    assert not (tmp_path / "new").exists()


def test_damaged_safetensors_are_format_errors_not_crashes():
    """Header lengths and contents from a damaged or hostile file never allocate or execute anything."""
    from dist_train.checkpoint.serialization import FormatError, load_tensors, load_tree, tensor_file

    good = tensor_file({"w": torch.ones(4)})
    data = bytes(good.header) + b"".join(bytes(c) for c in list(good.chunks())[1:])
    assert torch.equal(load_tensors(data)["w"], torch.ones(4))
    damaged = [b"", b"\x01\x02", struct.pack("<Q", 2**63) + b"{}", struct.pack("<Q", 10) + b"not json!!",
               struct.pack("<Q", 2) + b"[]", data[:-3],
               struct.pack("<Q", 64) + json.dumps({"w": {"dtype": "F32", "shape": [2**40],
                                                         "data_offsets": [0, 2**42]}}).encode().ljust(64)]
    for blob in damaged:
        with pytest.raises(FormatError):
            load_tensors(blob)
    with pytest.raises(FormatError):
        load_tree(data)  # a tensor file without a state skeleton
