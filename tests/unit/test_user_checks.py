"""What a new user hit (issue 22), in process: the dry batch's checks of data, model and task; flags
changed on resume; import paths that name a script or are misspelt; one version; a CLI start without
torch; metrics.jsonl without the redone steps of a dead attempt."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import dist_train
from dist_train.config.job import JobConfig
from dist_train.errors import UserError
from dist_train.training.preflight import dry_batch, refuse_builtin_only_flags
from dist_train.training.tasks import build_task

REPO = Path(__file__).resolve().parents[2]


class Pairs(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _check(model: nn.Module, task, items, batch: int = 8) -> None:
    dry_batch(model, build_task(task), Pairs(items), batch, torch.device("cpu"), "the_model", "the_data")


def _error(*args, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        _check(*args, **kwargs)
    return " ".join(str(caught.value).split())


REGRESSION = [(torch.randn(4), float(i) * 0.37) for i in range(16)]


def test_float_targets_are_refused_for_classification():
    message = _error(nn.Linear(4, 3), "classification", REGRESSION)
    assert "classification" in message and "integer class ids" in message and "--task regression" in message
    _check(nn.Linear(4, 1), "regression", REGRESSION)  # the right task passes


def test_class_ids_beyond_the_models_outputs_are_refused():
    items = [(torch.randn(4), i % 5) for i in range(16)]
    message = _error(nn.Linear(4, 3), "classification", items)
    assert "class id 4" in message and "3 outputs" in message
    _check(nn.Linear(4, 5), "classification", items)


def test_language_model_needs_sequences_of_token_ids():
    class Lm(nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], x.shape[1], 7)
    tokens = [(torch.randint(7, (5,)), torch.randint(7, (5,))) for _ in range(4)]
    _check(Lm(), "language_model", tokens)
    message = _error(Lm(), "language_model", [(x, y[:3]) for x, y in tokens])
    assert "language_model" in message and "[4, 5]" in message


def test_a_task_returning_one_loss_too_few_is_named():
    def short(outputs, targets):
        return (outputs.squeeze(1) - targets).pow(2)[:-1]
    message = _error(nn.Linear(4, 1), short, REGRESSION, batch=16)
    assert "returned losses of shape [15] for a batch of 16" in message
    assert "test_user_checks" in message  # the task's name, its import path


def test_a_data_set_of_strings_says_what_its_samples_are():
    message = _error(nn.Linear(4, 1), "regression", [("hello", 1.5)] * 4)
    assert "data set the_data" in message and "input str, target float" in message
    assert "expected an input Tensor" in message


def test_a_model_that_fails_on_the_batch_is_one_line():
    message = _error(nn.Linear(5, 1), "regression", REGRESSION)
    assert message.startswith("model the_model failed on a batch of inputs Tensor[8, 4] float32")


def test_the_dry_batch_leaves_rng_and_model_state_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 1))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    _check(model, "regression", REGRESSION)
    assert torch.equal(torch.rand(3), expected)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_width_and_dropout_with_your_own_model_are_refused():
    cfg = JobConfig()
    refuse_builtin_only_flags(cfg, "mine:build")  # defaults: nothing given
    cfg.model.width = 64
    with pytest.raises(UserError, match="--width 64 applies to the built-in cnn and mlp only.*--model-args"):
        refuse_builtin_only_flags(cfg, "mine:build")


def test_a_misspelt_attribute_gets_a_suggestion(tmp_path, monkeypatch):
    (tmp_path / "mymodels_nu.py").write_text("def build_model():\n    return None\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from dist_train.plugins import import_object
    with pytest.raises(UserError, match="has no attribute build_modle; did you mean build_model"):
        import_object("mymodels_nu:build_modle", "--model")


def test_a_script_path_loads_without_running_its_main_block(tmp_path):
    script = tmp_path / "my_train.py"
    script.write_text(textwrap.dedent("""
        import sys
        def build_model():
            return "built"
        if __name__ == "__main__":
            sys.exit("the training run must not start")
    """))
    from dist_train.plugins import import_object
    assert import_object(f"{script}:build_model", "--model")() == "built"
    with pytest.raises(UserError, match="did you mean build_model"):
        import_object(f"{script}:build_mode", "--model")


def test_qualified_name_of_a_script_run_by_path_is_its_file(tmp_path):
    script = tmp_path / "by_path.py"
    script.write_text("import dist_train.plugins as p\ndef build(): pass\nprint(p.qualified_name(build))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.stdout.strip() == f"{script}:build", out.stderr


def test_inference_takes_a_factory_under_a_new_import_path():
    from dist_train.inference.loading import model_spec
    manifest = {"model": {"name": "__main__:build", "args": {"hidden": 3}, "shape": {"in_channels": 8}}}
    spec = model_spec(manifest, "ckpt", "my_train:build")
    assert (spec.name, spec.args, spec.shape) == ("my_train:build", {"hidden": 3}, {"in_channels": 8})
    with pytest.raises(UserError, match="not mlp"):
        model_spec(manifest, "ckpt", "mlp")


def test_one_version():
    from setuptools.config.pyprojecttoml import read_configuration
    project = read_configuration(REPO / "pyproject.toml", expand=True)["project"]
    assert project["version"] == dist_train.__version__ == "0.3.0"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help_does_not_import_torch(argv):
    code = ("import sys, runpy; sys.argv = ['dist_train', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('dist_train', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert "usage:" in out.stdout and "TORCH False" in out.stderr, out.stderr[-2000:]


def test_the_lazy_command_list_says_what_the_commands_say():
    from dist_train.cli.main import COMMAND_HELP, build_parser
    choices = build_parser()._subparsers._group_actions[0]._choices_actions
    assert {a.dest: a.help for a in choices} == COMMAND_HELP


# -- flags changed on resume --------------------------------------------------------------------

def _optim(lr: float):
    from dist_train.config.job import JobConfig
    from dist_train.training.optim import build_optimizer, build_scheduler, load_scheduler_state, scheduler_state
    cfg = JobConfig()
    cfg.optim.lr = lr
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 100)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    return cfg, optimizer, scheduler, (optimizer.state_dict(), scheduler_state(scheduler)), load_scheduler_state


def test_a_new_lr_on_resume_reaches_the_optimizer():
    from dist_train.training.resume_flags import reconcile
    old_cfg, _, _, (opt_state, sched_state), load = _optim(0.003)
    cfg, optimizer, scheduler, _, _ = _optim(0.001)
    optimizer.load_state_dict(opt_state)  # what a resume restores: the old lr everywhere
    load(scheduler, sched_state)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.003)
    said = reconcile(cfg, {"config": old_cfg.to_dict()}, optimizer, scheduler, True)
    assert said == ["--lr changed on resume: 0.003 -> 0.001 (the scheduler's base lr and the param groups "
                    "are set to it)"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)  # the schedule goes on from the new base


def test_incompatible_flags_are_refused_and_the_checkpoints_value_wins_where_it_decides():
    from dist_train.training.resume_flags import reconcile
    old_cfg, optimizer, scheduler, _, _ = _optim(0.003)
    cfg = JobConfig()
    cfg.optim.lr = 0.003
    cfg.optim.optimizer = "sgd" if old_cfg.optim.optimizer != "sgd" else "adam"
    with pytest.raises(UserError, match="--optimizer changed on resume"):
        reconcile(cfg, {"config": old_cfg.to_dict()}, optimizer, scheduler, True)
    cfg.optim.optimizer = old_cfg.optim.optimizer
    cfg.model.pretrained_weights = "weights.pt"
    said = reconcile(cfg, {"config": old_cfg.to_dict()}, optimizer, scheduler, True)
    assert said and "--pretrained-weights 'weights.pt' ignored on resume" in said[0]
    assert cfg.model.pretrained_weights is None  # config.yaml says what was used


def test_checkpoint_every_left_unset_on_resume_keeps_the_saved_value_without_a_changed_warning(caplog):
    from dist_train.config.job import FIELDS
    from dist_train.training.resume_flags import reconcile
    old_cfg, optimizer, scheduler, _, _ = _optim(0.003)
    section = FIELDS["checkpoint_every"][0]
    setattr(getattr(old_cfg, section), "checkpoint_every", "3")
    cfg = JobConfig()
    cfg.optim.lr = 0.003
    assert getattr(cfg, section).checkpoint_every is None  # the flag was not given
    with caplog.at_level("INFO", logger="dist_train.training.resume_flags"):
        said = reconcile(cfg, {"config": old_cfg.to_dict()}, optimizer, scheduler, True)
    assert said == ["--checkpoint-every not given on resume: keeping the checkpoint's '3' "
                    "(pass --checkpoint-every to change it)"]
    assert not any("changed" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert getattr(cfg, section).checkpoint_every == "3"  # in force, and config.yaml says so
    cfg2 = JobConfig()  # a value that is given is a change, and is applied
    cfg2.optim.lr = 0.003
    setattr(getattr(cfg2, section), "checkpoint_every", "5")
    said = reconcile(cfg2, {"config": old_cfg.to_dict()}, optimizer, scheduler, True)
    assert said == ["--checkpoint-every changed on resume: '3' -> '5' (the next checkpoints follow it)"]
    assert getattr(cfg2, section).checkpoint_every == "5"


def test_the_resume_table_in_the_docs_is_the_policy():
    from dist_train.training.resume_flags import POLICY
    text = (REPO / "docs" / "configuration.md").read_text()
    for key, (kind, _) in POLICY.items():
        flag = "--" + key.replace("_", "-")
        assert f"| `{flag}` | {kind} |" in text, flag


# -- metrics.jsonl after a resume ------------------------------------------------------------------

def test_a_resume_drops_the_lines_of_steps_it_redoes(tmp_path):
    from dist_train.checkpoint.storage import Storage
    from dist_train.training.metrics import METRICS, MetricsLog
    storage = Storage(str(tmp_path))
    dead = MetricsLog(storage)
    for step in (2, 4, 6, 8):
        dead.write({"step": step, "split": "train", "generation": 1})
    dead.write({"event": "resume", "step": 9})
    dead.close()
    (tmp_path / METRICS).open("a").write('{"step": 10, "trunc')  # the dead attempt's torn last line
    resumed = MetricsLog(storage, resumed_step=4)
    resumed.write({"step": 6, "split": "train", "generation": 2})
    resumed.close()
    lines = (tmp_path / METRICS).read_text().splitlines()
    assert resumed.dropped == 2
    records = [json.loads(line) for line in lines if line.startswith('{"step": 10') is False]
    assert [(r.get("step"), r.get("generation")) for r in records] == [(2, 1), (4, 1), (9, None), (6, 2)]


def test_regression_outputs_that_do_not_match_the_targets_are_named():
    message = _error(nn.Linear(4, 3), "regression", REGRESSION)
    assert message.startswith("regression: the model's outputs (8, 3) do not match the targets (8,)")


def test_checkpoint_every_given_as_none_on_resume_is_a_change_not_an_unset_flag():
    import argparse

    from dist_train.config.job import FIELDS, add_config_arguments, resolve
    from dist_train.training.resume_flags import reconcile
    old_cfg, optimizer, scheduler, _, _ = _optim(0.003)
    section = FIELDS["checkpoint_every"][0]
    setattr(getattr(old_cfg, section), "checkpoint_every", "3")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    for argv, kept in ((["--lr", "0.003"], "3"), (["--lr", "0.003", "--checkpoint-every", "none"], None)):
        cfg = resolve(parser.parse_args(argv))
        said = reconcile(cfg, {"config": old_cfg.to_dict()}, optimizer, scheduler, True)
        assert getattr(cfg, section).checkpoint_every == kept, said
        assert ("not given on resume" in said[0]) == (kept is not None), said
    assert "changed on resume: '3' -> None" in said[0]
    assert "given" not in cfg.to_dict()  # not a config section: config.yaml does not change
