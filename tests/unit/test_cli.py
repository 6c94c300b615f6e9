"""The command line itself: strict flags with suggestions, `ckpt list|best|prune`, output into closed pipes,
and the layering rule that the launcher never imports the CLI."""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, call_cli
from dist_train.checkpoint import catalog
from dist_train.checkpoint.fencing import AttemptRegistry
from dist_train.checkpoint.manifest import model_digest
from dist_train.checkpoint.serialization import tensor_file
from dist_train.checkpoint.storage import Storage
from dist_train.checkpoint.writer import CheckpointWriter
from dist_train.cli.main import EXIT_BROKEN_PIPE, build_parser, main
from dist_train.errors import UserError

# --- flags: no abbreviations, a suggestion for an unknown one ------------------------------------


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_no_parser_accepts_abbreviated_flags():
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 10  # every sub-command and ckpt action
    assert [p.prog for p in parsers if p.allow_abbrev] == []


@pytest.mark.parametrize("argv, message", [
    (["train", "--e", "3"], "train: unrecognized arguments: --e 3; did you mean --epochs"),  # first of several
    (["train", "--epoch=3"], "did you mean --epochs?"),
    (["train", "--batchsize", "8"], "did you mean --batch-size?"),
    (["ckpt", "list", "runs/x", "--js"], "ckpt list: unrecognized arguments: --js; did you mean --json?"),
    (["ckpt", "prune", "runs/x", "--keep", "2"], "did you mean --keep-last or --keep-best or --keep-every?"),
    (["report", "runs/x", "--no-plo"], "did you mean --no-plot?"),
])
def test_abbreviations_and_typos_are_refused_with_a_suggestion(argv, message):
    with pytest.raises(UserError) as err:
        build_parser().parse_args(argv)
    assert message in str(err.value)


def test_an_unknown_flag_with_nothing_close_gets_no_guess():
    with pytest.raises(UserError) as err:
        build_parser().parse_args(["train", "--frobnicate"])
    assert str(err.value) == "train: unrecognized arguments: --frobnicate"


def test_launch_refuses_abbreviated_torchrun_options(monkeypatch):
    from dist_train.launcher import plan_launch

    monkeypatch.delenv("PET_NPROC_PER_NODE", raising=False)
    with pytest.raises(UserError, match=r"unrecognized arguments: --nproc; did you mean --nproc-per-node\?"):
        plan_launch(["--nproc", "2", "--", "train"])
    with pytest.raises(UserError, match=r"unrecognized arguments: --epoc 2; did you mean --epochs\?"):
        plan_launch(["--", "train", "--epoc", "2"])


def test_one_line_and_exit_2_from_main(capsys):
    code, out, err = call_cli(["train", "--epo", "3"], capsys)
    assert code == 2 and out == ""
    assert err == "dist-train: error: train: unrecognized arguments: --epo 3; did you mean --epochs?\n"


# --- the launcher does not import the CLI --------------------------------------------------------


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["launcher", "config"])
def test_lower_layers_never_import_the_cli(package):
    """Imports inside functions count too: plan.py used to reach `dist_train.cli.main` at call time."""
    offenders = {str(path.relative_to(REPO)): sorted(n for n in _imports(path) if n.startswith("dist_train.cli"))
                 for path in (REPO / "dist_train" / package).glob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


# --- ckpt list, best, prune ----------------------------------------------------------------------


def _commit(storage: Storage, step: int, reason: str, val_loss: float | None, best: tuple[float, int] | None):
    weights = {"w": torch.full((4,), float(step))}
    metrics = {"samples_seen": step * 32} | ({"val_loss": val_loss} if val_loss is not None else {})
    fields = {"epoch": step // 10, "world_size": 1, "model_digest": model_digest(weights), "reason": reason,
              "metrics": metrics, "best": {"val_loss": best[0], "step": best[1]} if best else {}}
    CheckpointWriter(storage, 1, "writer-a", AttemptRegistry(storage)).commit(
        step, {"model.safetensors": tensor_file(weights)}, fields)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """Interval saves between epoch ends; validation after each epoch: the best is at step 20."""
    storage = Storage(str(tmp_path / "run"))
    storage.makedirs("")
    _commit(storage, 5, "interval", None, None)
    _commit(storage, 10, "epoch_end", 0.50, (0.50, 10))
    _commit(storage, 20, "epoch_end", 0.20, (0.20, 20))
    _commit(storage, 25, "interval", None, (0.20, 20))
    _commit(storage, 30, "epoch_end", 0.30, (0.20, 20))
    _commit(storage, 33, "preempted", None, (0.20, 20))
    return tmp_path / "run"


def test_list_shows_why_each_checkpoint_was_saved_and_its_validation_loss(run_dir, capsys):
    code, out, _ = call_cli(["ckpt", "list", str(run_dir), "--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    assert [(r["step"], r["save_reason"], r["val_loss"]) for r in rows] == [
        (5, "interval", None), (10, "epoch_end", 0.5), (20, "epoch_end", 0.2), (25, "interval", None),
        (30, "epoch_end", 0.3), (33, "preempted", None)]
    contract = {"url", "step", "epoch", "created_at", "size", "valid", "reason", "model_digest"}
    assert all(contract <= set(r) and r["reason"] is None for r in rows)  # `reason`: why it is invalid

    code, out, _ = call_cli(["ckpt", "list", str(run_dir)], capsys)
    header, *lines = out.splitlines()
    assert "SAVED AT" in header and "VAL LOSS" in header
    assert "epoch_end" in lines[1] and "0.5000" in lines[1]
    assert "preempted" in lines[-1] and lines[-1].split()[-3:-1] == ["-", "yes"]


def test_best_says_when_the_runs_best_was_pruned(run_dir, capsys):
    code, out, err = call_cli(["ckpt", "best", str(run_dir)], capsys)
    assert code == 0 and out.strip().endswith("ckpt-g0001-s0000000020") and err == ""

    code, _, _ = call_cli(["ckpt", "prune", str(run_dir), "--keep-last", "2"], capsys)
    assert code == 0 and [r.step for r in catalog.list_checkpoints(Storage(str(run_dir)))] == [30, 33]
    code, out, err = call_cli(["ckpt", "best", str(run_dir)], capsys)
    assert code == 0 and out.strip().endswith("ckpt-g0001-s0000000030")
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "best validation loss 0.2 (step 20)" in lines[0] and "no longer there" in lines[0]
    assert "step 30, validation loss 0.3" in lines[0]


@pytest.mark.parametrize("flags, left", [
    (["--keep-best", "1"], [20, 33]),  # the best plus the newest
    (["--keep-every", "10"], [10, 20, 30, 33]),  # multiples of 10 plus the newest
    (["--keep-best", "2", "--keep-every", "25"], [20, 25, 30, 33]),
])
def test_prune_rules_work_on_their_own(run_dir, capsys, flags, left):
    code, out, _ = call_cli(["ckpt", "prune", str(run_dir), *flags], capsys)
    assert code == 0, out
    assert [r.step for r in catalog.list_checkpoints(Storage(str(run_dir)))] == left


def test_prune_needs_a_rule(run_dir, capsys):
    code, _, err = call_cli(["ckpt", "prune", str(run_dir)], capsys)
    assert code == 2 and "--keep-last N, --keep-best K and/or --keep-every M" in err
    assert len(catalog.list_checkpoints(Storage(str(run_dir)))) == 6


# --- output into a pipe nobody reads -------------------------------------------------------------


@pytest.fixture
def closed_pipe(monkeypatch):
    """Makes stdout a real pipe whose reading end is already closed (`| head -1` after its line).

    Called from the test body: pytest's own capture sets `sys.stdout` again after fixtures ran.
    """
    streams = []

    def redirect() -> io.TextIOWrapper:
        read_fd, write_fd = os.pipe()
        os.close(read_fd)
        stream = io.TextIOWrapper(io.FileIO(write_fd, "w"))
        streams.append(stream)
        monkeypatch.setattr(sys, "stdout", stream)
        return stream

    yield redirect
    monkeypatch.undo()
    for stream in streams:
        stream.close()


@pytest.mark.parametrize("argv", [["ckpt", "list", "{run}", "--json"], ["report", "{run}", "--json", "--no-plot"],
                                  ["launch", "--help"]])
def test_output_into_a_closed_pipe_is_not_an_error(argv, run_dir, capsys, closed_pipe):
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 10, "epoch": 1, "split": "val", "loss": 0.5}) + "\n")
    stdout = closed_pipe()
    code = main([a.replace("{run}", str(run_dir)) for a in argv])
    assert code == EXIT_BROKEN_PIPE
    assert capsys.readouterr().err == ""
    stdout.write("still buffered\n")
    stdout.flush()  # stdout now goes to /dev/null: the interpreter's last flush cannot fail either
