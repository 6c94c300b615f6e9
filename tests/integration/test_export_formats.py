"""`dist-train export --format torchscript|onnx|exported-program`: files that run without dist_train.

The session's shared tiny digits run (conftest's SMALL_RUN) is exported in each format
through the CLI entry point, and each file is run the way a deployment would: onnxruntime
for ONNX, `torch.jit.load` and `torch.export.load` for the others, on the run's own
validation samples.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_RUN, call_cli


@pytest.fixture(autouse=True)
def restore_logging():
    logger = logging.getLogger("dist_train")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture(scope="module")
def run_dir(trained_run) -> Path:
    return trained_run(*SMALL_RUN)


@pytest.fixture(scope="module")
def reference(run_dir):
    """The checkpoint's model and its validation inputs, as `evaluate` sees them."""
    from dist_train.inference.loading import load_model, rebuild_data

    loaded = load_model(str(run_dir))
    bundle = rebuild_data(loaded)
    inputs = torch.stack([bundle.val[i][0] for i in range(len(bundle.val))])
    with torch.no_grad():
        logits = loaded.model(inputs)
    return loaded, inputs, logits


def export(capsys, run_dir: Path, out: Path, *extra: str) -> dict:
    code, stdout, err = call_cli(["export", "--checkpoint", str(run_dir), "--out", str(out), *extra], capsys)
    assert code == 0, err
    assert stdout.splitlines()[-3:] == [f"wrote {out}", f"wrote {out}.json", f"wrote {out}.README.md"]
    assert "[torch.onnx]" not in stdout and "Warning" not in err
    return json.loads(Path(f"{out}.json").read_text())


def run_readme(capsys, monkeypatch, out: Path, class_names: list[str]) -> None:
    """The README's snippet runs as written next to the file and prints a class name."""
    code = re.search(r"```python\n(.*?)```", Path(f"{out}.README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(out.parent)
    capsys.readouterr()
    exec(compile(code, f"{out.name} README", "exec"), {})
    assert capsys.readouterr().out.strip() in class_names


@pytest.mark.timeout(300)
def test_onnx_gives_pytorchs_top1_on_the_validation_samples(capsys, monkeypatch, tmp_path, run_dir, reference):
    import onnxruntime

    loaded, inputs, logits = reference
    out = tmp_path / "digits.onnx"
    info = export(capsys, run_dir, out, "--format", "onnx")
    assert info["format"] == "onnx" and info["input_shape"] == [1, 8, 8] and info["class_names"] == loaded.class_names
    assert info["preprocessing"]["image_mode"] == "L" and info["preprocessing"]["resize"] == [8, 8]

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    onnx_logits = session.run(None, {"input": inputs.numpy().astype(np.float32)})[0]
    assert len(inputs) == 270
    assert (onnx_logits.argmax(axis=1) == logits.argmax(dim=1).numpy()).all()
    assert np.allclose(onnx_logits, logits.numpy(), atol=1e-4)
    run_readme(capsys, monkeypatch, out, loaded.class_names)


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_and_exported_program_load_and_give_the_same_outputs(capsys, monkeypatch, tmp_path, run_dir,
                                                                         reference):
    loaded, inputs, logits = reference
    scripted = tmp_path / "digits.ts"
    info = export(capsys, run_dir, scripted, "--format", "torchscript")
    assert info["format"] == "torchscript" and info["torchscript"] == "script"
    program = tmp_path / "digits.pt2"
    info = export(capsys, run_dir, program)  # .pt2: torch.export without --format
    assert info["format"] == "exported-program" and info["model_digest"] == loaded.manifest["model_digest"]

    modules = {"torchscript": torch.jit.load(str(scripted)), "exported-program": torch.export.load(str(program)).module()}
    for name, module in modules.items():
        with torch.no_grad():
            assert torch.allclose(module(inputs), logits, atol=1e-5), name
            for n in (1, 3):  # the batch dimension is free
                assert torch.allclose(module(inputs[:n]), logits[:n], atol=1e-5), (name, n)
    run_readme(capsys, monkeypatch, scripted, loaded.class_names)
    run_readme(capsys, monkeypatch, program, loaded.class_names)


def test_missing_onnx_packages_are_one_line_naming_the_extra(capsys, monkeypatch, tmp_path, run_dir):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what `import onnxscript` meets when it is not installed
    code, stdout, err = call_cli(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("dist-train: error: --format onnx needs the onnxscript package: "
                          "pip install 'dist_train[onnx]'"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--out", "m.onnx", "--format", "weights"], "weights go to a file ending in .safetensors or .pt"),
    (["--out", "m.bin"], "--format torchscript|onnx|exported-program"),
])
def test_a_file_name_that_does_not_say_the_format_is_refused_before_reading(capsys, tmp_path, args, message):
    args = [str(tmp_path / a) if a.startswith("m.") else a for a in args]
    code, stdout, err = call_cli(["export", "--checkpoint", str(tmp_path / "nowhere"), *args], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
