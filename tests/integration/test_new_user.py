"""What a new user hit (issue 22), as real processes: user-code errors caught by the dry batch before the
run dir is claimed; a flag changed on resume that takes effect and says so, with the redone steps of a
dead attempt gone from metrics.jsonl; the README's Python-API script run by path and then evaluated and
predicted from its checkpoint; Ctrl-C to `launch/local.sh` ending with a checkpoint and exit 75."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, REPO, base_env, kill_group, manifests, run_forked, wait_for
from dist_train.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED

pytestmark = pytest.mark.integration
SUPPORT = REPO / "tests" / "support"
USER_PATH = {"PYTHONPATH": os.pathsep.join([str(REPO), str(SUPPORT)])}
USER_JOB = ["--model", "userpkg.models:build", "--dataset", "userpkg.data:Wave", "--max-steps", "2",
            "--batch-size", "16", "--no-progress"]
USER_MODULES = {
    "badtask.py": "def short(outputs, targets):\n    return (outputs.squeeze(-1) - targets).pow(2)[:-1]\n",
    "strdata.py": ("class Words:\n    def __init__(self, split):\n        self.in_channels = 8\n    def __len__(self):\n"
                   "        return 8\n    def __getitem__(self, i):\n        return 'word', 0.5\n"),
}


def one_line_error(result, *fragments: str) -> None:
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("dist-train: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


USER_CASES = [
    pytest.param([], ("task classification needs integer class ids", "float32", "--task regression"),
                 id="regression-data-as-classes"),
    pytest.param(["--task", "badtask:short"],
                 ("task badtask:short returned losses of shape [15] for a batch of 16",), id="task-31-of-32"),
    pytest.param(["--task", "regression", "--dataset", "strdata:Words"],
                 ("data set strdata:Words yields samples of input str, target float",), id="str-samples"),
    pytest.param(["--task", "regression", "--width", "64"], ("--width 64 applies to the built-in cnn and mlp only",),
                 id="width-with-own-model"),
    pytest.param(["--task", "regression", "--model", "userpkg.models:biuld"], ("did you mean build?",),
                 id="misspelt"),
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("flags, fragments", USER_CASES)
def test_user_code_errors_exit_2_with_one_line_and_write_nothing(tmp_path, flags, fragments):
    for name, text in USER_MODULES.items():
        (tmp_path / name).write_text(text)
    run_dir = tmp_path / "run"
    result = run_forked(["train", "--run-dir", str(run_dir), *USER_JOB, *flags], env=USER_PATH, cwd=tmp_path)
    one_line_error(result, *fragments)
    assert not run_dir.exists()


def test_the_user_code_cases_are_documented():
    section = (REPO / "docs" / "bad-input.md").read_text().split("## Your own code", 1)[1].split("Notes:")[0]
    documented = set(re.findall(r"^\| ([a-z0-9-]+) \|", section, flags=re.M)) - {"case", "---"}
    assert documented == {case.id for case in USER_CASES}


def _train_lines(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("split") == "train"]


@pytest.mark.timeout(240)
def test_a_new_lr_on_resume_is_applied_and_redone_steps_are_logged_once(tmp_path):
    run_dir = tmp_path / "run"
    job = ["train", "--run-dir", str(run_dir), "--max-steps", "8", "--checkpoint-every", "4", "--log-every", "2",
           "--epochs", "1", "--batch-size", "32", "--no-progress", "--lr-schedule", "constant"]
    first = run_forked([*job, "--lr", "0.003"])
    assert first.returncode == 0, first.stderr[-3000:]
    # The attempt dies after logging step 8 but before its step-8 checkpoint is committed.
    shutil.rmtree(run_dir / next(p.name for p in run_dir.iterdir() if p.name.endswith("s0000000008")))
    assert [(r["step"], r["lr"]) for r in _train_lines(run_dir)] == [(2, 0.003), (4, 0.003), (6, 0.003),
                                                                    (8, 0.003)]
    second = run_forked([*job, "--lr", "0.001"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "--lr changed on resume: 0.003 -> 0.001" in second.stderr
    lines = _train_lines(run_dir)
    assert [(r["step"], r["generation"], r["lr"]) for r in lines] == [(2, 1, 0.003), (4, 1, 0.003), (6, 2, 0.001),
                                                                      (8, 2, 0.001)]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 0.001
    assert manifests(run_dir)[-1]["config"]["optim"]["lr"] == 0.001
    third = run_forked([*job, "--lr", "0.001", "--optimizer", "sgd"])
    one_line_error(third, "--optimizer changed on resume")


def readme_script() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"```python\n(# my_train\.py\n.*?)```", text, re.S)
    assert match, "the README's Python-API example (a block starting '# my_train.py') is gone"
    return match.group(1)


@pytest.mark.timeout(300)
def test_the_readmes_python_api_example_trains_and_its_checkpoint_serves_inference(tmp_path):
    script = tmp_path / "my_train.py"
    script.write_text(readme_script())
    run_dir = tmp_path / "run"
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "my_train.py",
               "--run-dir", str(run_dir), "--epochs", "1", "--batch-size", "32", "--max-steps", "4",
               "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, env=base_env(), cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    final = manifests(run_dir)[-1]
    assert final["model"]["name"] == f"{script}:build_model"  # not __main__:build_model
    # evaluate and predict rebuild the model and the data set from the script, from another folder
    evaluated = run_forked(["evaluate", "--checkpoint", str(run_dir), "--json"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["step"] == 4
    predicted = run_forked(["predict", "--checkpoint", str(run_dir), "--samples", "2"])
    assert predicted.returncode == 0, predicted.stderr[-3000:]


@pytest.mark.timeout(240)
def test_ctrl_c_in_the_local_launch_script_commits_and_exits_75(tmp_path):
    # The script as shipped, beside a no-op ensure-env.sh (the test's venv is the repo's)
    (tmp_path / "launch").mkdir()
    shutil.copy(REPO / "launch" / "local.sh", tmp_path / "launch" / "local.sh")
    (tmp_path / "launch" / "ensure-env.sh").write_text("")
    (tmp_path / ".venv").symlink_to(Path(PYTHON).parents[1])
    run_dir, log = tmp_path / "run", tmp_path / "out.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "launch/local.sh", "--epochs", "100", "--no-progress", "--batch-size", "16",
                                 "--checkpoint-every", "5"], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                env=base_env({"RUN_DIR": str(run_dir)}), start_new_session=True)
    try:
        wait_for(lambda: any(p.name.startswith("ckpt-") for p in run_dir.glob("ckpt-*")), 180,
                 what="a first checkpoint")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
        status = proc.wait(120)
    finally:
        kill_group(proc)
        proc.wait(10)
    text = log.read_text()
    assert status == EXIT_PREEMPTED, text[-3000:]
    assert "SignalException" not in text and "Traceback" not in text, text[-3000:]
    assert manifests(run_dir)[-1]["reason"] == "preempted"
