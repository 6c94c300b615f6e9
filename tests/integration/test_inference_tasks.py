"""`predict`, `evaluate` and `export` follow the task a checkpoint was trained for, not only image classes.

Two tiny real runs: a regression (the user's MLP on the user's data set, tests/support/userpkg) and a
character-level language model (examples/char_transformer.py, its vocabulary recorded from the data
set's `vocab`). Their outputs are checked against the model's own forward pass; exported ONNX graphs
run in onnxruntime through the README snippet written beside them.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from conftest import REPO, call_cli, run_forked

SUPPORT = REPO / "tests" / "support"
USER_PATH = {"PYTHONPATH": os.pathsep.join([str(REPO), str(SUPPORT)])}
LM_ARGS = {"block_size": 16, "n_layer": 1, "n_head": 2, "d_model": 32}
TRAIN = ["--max-steps", "6", "--epochs", "1", "--log-every", "100", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"lm": run dir, "regression": run dir}, each trained once (one process, forked)."""
    root = tmp_path_factory.mktemp("tasks")
    commands = {
        "lm": ["--model", "examples.char_transformer:build", "--model-args", json.dumps(LM_ARGS),
               "--dataset", "examples.char_transformer:char_text", "--task", "language_model",
               "--dataset-args", json.dumps({"block_size": 16, "train_sequences": 64, "val_sequences": 16}),
               "--batch-size", "8", "--optimizer", "adamw", "--lr", "3e-3"],
        "regression": ["--model", "userpkg.models:build", "--dataset", "userpkg.data:Wave", "--task", "regression",
                       "--batch-size", "32"]}
    out = {}
    for name, flags in commands.items():
        result = run_forked(["train", "--run-dir", str(root / name), *flags, *TRAIN], env=USER_PATH, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = root / name
    return out


@pytest.fixture(autouse=True)
def _user_code_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(SUPPORT))
    monkeypatch.syspath_prepend(str(REPO))


def _model(run_dir):
    from dist_train.inference.loading import load_model
    return load_model(str(run_dir))


def _greedy(model, ids, steps, window=16):
    with torch.no_grad():
        for _ in range(steps):
            ids = ids + [int(model(torch.tensor([ids[-window:]]))[0, -1].argmax())]
    return ids


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_predict_continues_a_prompt_for_a_language_model(runs, capsys, tmp_path):
    from examples.char_transformer import corpus

    vocab = corpus()[1]
    loaded = _model(runs["lm"])
    code, out, err = call_cli(["predict", "--checkpoint", str(runs["lm"]), "--prompt", "The ret",
                               "--max-new-tokens", "7"], capsys)
    assert code == 0, err
    header, line = out.splitlines()
    assert "language model, vocabulary of %d tokens" % len(vocab) in header and "classes" not in header
    want = "".join(vocab[i] for i in _greedy(loaded.model, [vocab.index(c) for c in "The ret"], 7)[7:])
    assert line == f"prompt: 'The ret'  ->  {want!r}"

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("def f")
    code, out, err = call_cli(["predict", "--checkpoint", str(runs["lm"]), str(prompt_file), "--max-new-tokens",
                               "3", "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["task"] == "language_model"
    assert report["predictions"] == [{"input": str(prompt_file), "prompt": "def f", "continuation": "".join(
        vocab[i] for i in _greedy(loaded.model, [vocab.index(c) for c in "def f"], 3)[5:])}]

    code, out, err = call_cli(["predict", "--checkpoint", str(runs["lm"]), "--samples", "2", "--max-new-tokens",
                               "2"], capsys)
    assert code == 0 and [line.split(":")[0] for line in out.splitlines()[1:]] == ["val[0]", "val[1]"]

    code, out, err = call_cli(["predict", "--checkpoint", str(runs["lm"]), "--prompt", "\u2603"], capsys)
    assert code == 2 and out == "" and re.match(r"dist-train: error: the prompt has tokens outside", err)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_predict_prints_a_regression_models_values_for_npy_and_pt_inputs(runs, capsys, tmp_path):
    loaded = _model(runs["regression"])
    batch = torch.randn(3, 8)
    one = torch.randn(8)
    np.save(tmp_path / "batch.npy", batch.numpy())
    torch.save({"a": one}, tmp_path / "one.pt")
    code, out, err = call_cli(["predict", "--checkpoint", str(runs["regression"]), str(tmp_path / "batch.npy"),
                               str(tmp_path / "one.pt"), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["task"] == "regression"
    with torch.no_grad():
        want = loaded.model(torch.cat([batch, one[None]])).reshape(-1).tolist()
    assert [p["input"] for p in report["predictions"]] == [f"{tmp_path / 'batch.npy'}[{i}]" for i in range(3)] \
        + [str(tmp_path / "one.pt")]
    assert [p["values"][0] for p in report["predictions"]] == pytest.approx(want, abs=1e-6)

    code, out, err = call_cli(["predict", "--checkpoint", str(runs["regression"]), "--samples", "2"], capsys)
    assert code == 0 and "regression" in out.splitlines()[0] and "classes" not in out
    assert re.match(r"val\[0\]  ->  \S+   \(target \S+, loss \S+\)$", out.splitlines()[1])

    pickled = tmp_path / "object.pt"
    torch.save({"x": object.__new__(torch.nn.Identity)}, pickled)
    code, out, err = call_cli(["predict", "--checkpoint", str(runs["regression"]), str(pickled)], capsys)
    assert code == 2 and "Python objects" in err and len(err.splitlines()) == 1


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_evaluate_reports_each_tasks_metrics(runs, capsys):
    code, out, _ = call_cli(["evaluate", "--checkpoint", str(runs["lm"]), "--json"], capsys)
    assert code == 0 and {"perplexity", "token_accuracy"} <= set(json.loads(out))
    code, out, _ = call_cli(["evaluate", "--checkpoint", str(runs["regression"]), "--json"], capsys)
    assert code == 0 and {"mse", "mae"} <= set(json.loads(out)) and "accuracy" not in json.loads(out)


def _snippet(readme: str) -> str:
    return re.search(r"```python\n(.*?)```", readme, re.S).group(1)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_onnx_exports_follow_the_task_and_their_readme_snippets_run(runs, capsys, tmp_path, monkeypatch):
    import onnxruntime

    from examples.char_transformer import corpus

    vocab = corpus()[1]
    for name in ("lm", "regression"):  # no image shape: the example input is a validation sample
        code, out, err = call_cli(["export", "--checkpoint", str(runs[name]), "--out", str(tmp_path / f"{name}.onnx")],
                                  capsys)
        assert code == 0, err
    lm_info = json.loads((tmp_path / "lm.onnx.json").read_text())
    assert lm_info["task"] == "language_model" and lm_info["input_shape"] == [16]
    assert "int64 token ids" in lm_info["input"]

    # the graph's sequence length is free: a shorter prompt gives the model's own logits
    lm = _model(runs["lm"]).model
    ids = torch.tensor([[vocab.index(c) for c in "The "]])
    session = onnxruntime.InferenceSession(str(tmp_path / "lm.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.allclose(session.run(None, {"input": ids.numpy()})[0], lm(ids).numpy(), atol=1e-4)

    regression = _model(runs["regression"]).model
    x = torch.randn(5, 8)
    session = onnxruntime.InferenceSession(str(tmp_path / "regression.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert np.allclose(session.run(None, {"input": x.numpy()})[0], regression(x).numpy(), atol=1e-5)

    monkeypatch.chdir(tmp_path)
    readme = (tmp_path / "lm.onnx.README.md").read_text()
    assert "softmax" not in readme and "class_names" not in readme
    capsys.readouterr()
    exec(compile(_snippet(readme), "lm.onnx.README.md", "exec"), {})
    want = "".join(vocab[i] for i in _greedy(lm, [vocab.index(c) for c in "The "], 20))
    assert capsys.readouterr().out.strip("\n") == want.strip("\n")

    readme = (tmp_path / "regression.onnx.README.md").read_text()
    assert "softmax" not in readme and "regression" in readme
    exec(compile(_snippet(readme), "regression.onnx.README.md", "exec"), {})
    with torch.no_grad():
        assert json.loads(capsys.readouterr().out) == pytest.approx(regression(torch.zeros(1, 8))[0].tolist(),
                                                                    abs=1e-5)

    code, out, err = call_cli(["export", "--checkpoint", str(runs["regression"]), "--out",
                               str(tmp_path / "given.pt2"), "--input-shape", "1,8"], capsys)
    assert code == 0 and json.loads((tmp_path / "given.pt2.json").read_text())["input_shape"] == [8]
    code, out, err = call_cli(["export", "--checkpoint", str(runs["regression"]), "--out",
                               str(tmp_path / "bad.onnx"), "--input-shape", "one,8"], capsys)
    assert code == 2 and "--input-shape" in err and not (tmp_path / "bad.onnx").exists()
