"""`dist-train train` and `dist_train.train(...)` are one entry path: both run through `api.run_job`."""

from __future__ import annotations

import dist_train
import dist_train.api
from dist_train.cli.main import main


def test_the_cli_and_the_python_api_run_the_same_function(monkeypatch, tmp_path):
    calls = []

    def run_job(args, model=None, dataset=None, task=None, extras=None, callbacks=(), group_forms=None):
        calls.append((args.run_dir, model, task))
        return 0

    monkeypatch.setattr(dist_train.api, "run_job", run_job)
    assert main(["train", "--run-dir", str(tmp_path / "cli")]) == 0
    assert dist_train.train(task="regression", argv=["--run-dir", str(tmp_path / "api")]) == 0
    assert calls == [(str(tmp_path / "cli"), None, None), (str(tmp_path / "api"), None, "regression")]


def test_print_config_is_the_same_through_both(capsys, tmp_path):
    flags = ["--run-dir", str(tmp_path / "run"), "--lr", "0.02", "--task", "regression", "--print-config"]
    assert main(["train", *flags]) == 0
    from_cli = capsys.readouterr().out
    assert dist_train.train(argv=flags) == 0
    assert capsys.readouterr().out == from_cli and "lr: 0.02" in from_cli
