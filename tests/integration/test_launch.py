"""`dist-train launch`: bad input exits 2 before a worker starts; the workers' statuses become the exit status.

The unit tests pin the planning and the exit-status rules; the integration tests
run real launchers (and real torchrun workers) as subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import PYTHON, REPO, base_env, free_port, kill_group, manifests, run_cli, wait_for
from dist_train.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_PREEMPTED, EXIT_SUPERSEDED, UserError
from dist_train.launcher import outcome, plan_launch, shutdown_timeout
from dist_train.launcher.plan import split_argv

TINY_LAUNCH = ["--batch-size", "32", "--log-every", "5", "--no-progress"]


# --- exit-status rules -------------------------------------------------------------------------

@pytest.mark.parametrize("codes, status", [
    ({0: 2, 1: 2}, EXIT_BAD_INPUT),
    ({0: 2, 1: -signal.SIGTERM}, EXIT_BAD_INPUT),  # the peer the agent terminated does not count
    ({0: 75, 1: 75}, EXIT_PREEMPTED),
    ({0: 75, 1: -signal.SIGKILL}, EXIT_PREEMPTED),
    ({0: 3}, EXIT_SUPERSEDED),
    ({0: 1, 1: 75}, EXIT_FAILURE),  # a crash while a peer hit its deadline is a crash, not preemption
    ({0: 2, 1: 1}, EXIT_FAILURE),
    ({0: -signal.SIGKILL}, EXIT_FAILURE),  # OOM-killed
    ({0: 139}, EXIT_FAILURE),
])
def test_status_of_worker_exit_codes(codes, status):
    assert outcome.status_of(codes) == status
    assert f"exit status {status}" in outcome.from_worker_failures(codes).summary


def test_launcher_signals():
    assert outcome.from_signal(signal.SIGTERM).status == EXIT_PREEMPTED
    assert outcome.from_signal(signal.SIGUSR1).status == EXIT_PREEMPTED
    assert outcome.from_signal(signal.SIGINT).status == EXIT_PREEMPTED  # Ctrl-C commits a checkpoint too
    assert outcome.from_signal(signal.SIGHUP).status == 128 + signal.SIGHUP
    early = outcome.from_signal(signal.SIGTERM, workers_started=False)
    assert early.status == EXIT_PREEMPTED and "before the workers started" in early.summary


# --- planning (in-process: nothing is started) -------------------------------------------------

@pytest.fixture
def clean_torchrun_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("PET_") or key in ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "OMP_NUM_THREADS"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args would set it in this process


@pytest.mark.parametrize("argv, message", [
    (["--nproc-per-node", "2", "train"], "missing '--'"),
    (["--", "ckpt", "list", "x"], "'ckpt' after '--' is not a script file; expected train, -m MODULE or SCRIPT.py"),
    (["--"], "nothing after '--'"),
    (["--", "--bogus"], "got '--bogus'"),
    (["--", "-m"], "-m needs a module name"),
    (["--", "-m", "examples.no_such_module"], "no module named 'examples.no_such_module'"),
    (["--", "-m", "no_such_package.train"], "cannot find module 'no_such_package.train'"),
    (["--no-python", "--", "examples/char_transformer.py"], "--no-python, --run-path and --module do not apply"),
    (["--module", "--", "examples/char_transformer.py"], "--no-python, --run-path and --module do not apply"),
    (["--nnodes", "3:1", "--", "train"], "--nnodes"),
    (["--frobnicate", "--", "train"], "unrecognized arguments: --frobnicate"),
    (["script.py", "--", "train"], "unexpected argument 'script.py'"),
    (["--", "train", "--lr", "-1"], "invalid lr"),
    (["--", "train", "--bogus"], "unrecognized arguments: --bogus"),
    (["--", "train", "--run-dir", "nosuchscheme://x/y"], "unknown URL scheme"),
])
def test_bad_input_is_a_user_error(argv, message, clean_torchrun_env):
    with pytest.raises(UserError, match=re.escape(message)):
        plan_launch(argv)


def test_split_keeps_train_flags_verbatim():
    assert split_argv(["--nnodes", "2", "--", "train", "--", "x"]) == (["--nnodes", "2"], ["train", "--", "x"])


def test_plan(tmp_path, clean_torchrun_env):
    run_dir = str(tmp_path / "run")
    base = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "127.0.0.1:29400", "--rdzv-id", "j"]
    plan = plan_launch([*base, "--node-rank", "1", "--", "train", "--run-dir", run_dir])
    assert plan.worker_args == ["-u", "-m", "dist_train", "train", "--run-dir", run_dir]
    assert plan.entrypoint == sys.executable
    assert (plan.config.min_nodes, plan.config.max_nodes, plan.config.nproc_per_node) == (2, 2, 2)
    assert plan.config.rdzv_configs["is_host"] is False  # only node 0 hosts the rendezvous store
    assert plan.config.shutdown_timeout == shutdown_timeout(25.0) == 35  # --preempt-deadline default + margin
    assert "SIGUSR1" in plan.config.signals_to_handle.split(",")
    assert not os.path.exists(run_dir)  # planning writes nothing

    plan = plan_launch([*base, "--node-rank", "0", "--", "train", "--run-dir", run_dir, "--preempt-deadline", "50"])
    assert plan.config.rdzv_configs["is_host"] is True
    assert plan.config.shutdown_timeout == 60

    plan = plan_launch([*base, "--shutdown-timeout", "7", "--", "train", "--run-dir", run_dir])
    assert "is_host" not in plan.config.rdzv_configs  # no node rank: torch's own guess
    assert plan.config.shutdown_timeout == 7


def test_plan_user_code(tmp_path, clean_torchrun_env):
    """A user's script or module on the Python API: the workers run it under `python -u`; only the script (or
    module) is checked here, its own flags are the workers' to check; its --preempt-deadline sets the timeout."""
    run_dir = str(tmp_path / "run")
    plan = plan_launch(["--standalone", "--nproc-per-node", "2", "--", "-m", "examples.char_transformer",
                        "--run-dir", run_dir, "--preempt-deadline", "40", "--prompt", "x"])
    assert plan.worker_args == ["-u", "-m", "examples.char_transformer", "--run-dir", run_dir,
                                "--preempt-deadline", "40", "--prompt", "x"]
    assert plan.job is None and not plan.print_config and plan.command.kind == "module"
    assert plan.config.shutdown_timeout == shutdown_timeout(40.0)
    script = "tests/support/userpkg/train_script.py"
    plan = plan_launch(["--standalone", "--", script, "--run-dir", run_dir, "--its-own-flag", "-h"])
    assert plan.worker_args == ["-u", script, "--run-dir", run_dir, "--its-own-flag", "-h"]
    assert plan.config.shutdown_timeout == shutdown_timeout(25.0)  # the default deadline
    assert plan.entrypoint == sys.executable
    assert not os.path.exists(run_dir)


def test_plan_reads_torchrun_environment(tmp_path, clean_torchrun_env, monkeypatch):
    """The Kubeflow operator passes torchrun's options as PET_* variables."""
    monkeypatch.setenv("PET_NNODES", "1:3")
    monkeypatch.setenv("PET_RDZV_BACKEND", "c10d")
    monkeypatch.setenv("PET_RDZV_ENDPOINT", "job-worker-0:23456")
    monkeypatch.setenv("PET_MAX_RESTARTS", "2")
    plan = plan_launch(["--", "train", "--run-dir", str(tmp_path)])
    cfg = plan.config
    assert (cfg.min_nodes, cfg.max_nodes, cfg.rdzv_endpoint, cfg.max_restarts) == (1, 3, "job-worker-0:23456", 2)


# --- real launchers ----------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["common.sh", "single-node.sh", "multi-node.sh", "slurm.sbatch"])
def test_launch_scripts_are_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(90)
def test_help_into_a_closed_pipe_exits_quietly():
    """`dist-train launch --help | head -1`: the reader left; no BrokenPipeError traceback, no 'Exception
    ignored' at exit, status 141 (what a shell reports for a Unix tool stopped by SIGPIPE)."""
    proc = subprocess.Popen([PYTHON, "-m", "dist_train", "launch", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=base_env(), cwd=REPO)
    proc.stdout.close()  # the reading end is gone before anything was written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=80) == 141, err
    assert err == ""


def launch_cmd(options: list[str], train: list[str]) -> list[str]:
    return ["launch", *options, "--", "train", *train]


@pytest.mark.timeout(60)
def test_bad_flag_exits_2_before_any_worker(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(launch_cmd(["--standalone", "--nproc-per-node", "2"],
                                ["--run-dir", str(run_dir), "--lr", "-1"]), timeout=60)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-train: error: invalid lr"), result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()  # no worker ran: nothing was written


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_sigterm_while_waiting_for_other_nodes_exits_75(tmp_path):
    """A pod deleted while its launcher waits in the rendezvous reports "preempted", not a crash (143)."""
    log_path = tmp_path / "launch.log"
    cmd = [PYTHON, "-m", "dist_train", *launch_cmd(
        ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
         "--node-rank", "0"], ["--run-dir", str(tmp_path / "run")])]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=base_env(), cwd=REPO,
                                start_new_session=True)
    try:
        wait_for(lambda: "launch INFO" in log_path.read_text() or proc.poll() is not None, timeout=45,
                 what="the launcher to start its rendezvous")
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=20)
    finally:
        kill_group(proc)
    output = log_path.read_text()
    assert status == EXIT_PREEMPTED, output
    assert "before the workers started" in output.strip().splitlines()[-1]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_worker_bad_input_exits_2(tmp_path):
    """A problem only the workers can find (here: --resume names no checkpoint) still exits 2.

    One worker keeps it cheap; how several workers' statuses combine is test_status_of_worker_exit_codes."""
    run_dir = tmp_path / "run"
    result = run_cli(launch_cmd(["--standalone", "--nproc-per-node", "1"],
                                ["--run-dir", str(run_dir), "--resume", str(tmp_path / "missing"), *TINY_LAUNCH]),
                     timeout=110)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-3000:]
    assert "no checkpoint there" in result.stderr
    assert "exit status 2 (bad input)" in result.stderr.splitlines()[-1]
    assert "ChildFailedError" not in result.stderr and "Root Cause" not in result.stderr  # no torchrun box
    assert manifests(run_dir) == []


SUPPORT = REPO / "tests" / "support"
USER_SCRIPT = SUPPORT / "userpkg" / "train_script.py"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_user_module_bad_flag_exits_2(tmp_path):
    """A user's module on the Python API (`-- -m MODULE`): a flag only its workers can check exits 2 (plain
    torchrun: 1), one line from rank 0, no traceback, nothing written."""
    run_dir = tmp_path / "run"
    result = run_cli(["launch", "--standalone", "--nproc-per-node", "2", "--", "-m", "examples.char_transformer",
                      "--run-dir", str(run_dir), "--max-steps", "1", "--bogus-flag", "3"], timeout=110)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "unrecognized arguments: --bogus-flag 3" in errors[0], result.stderr[-3000:]
    assert "exit status 2 (bad input)" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr and "Root Cause" not in result.stderr
    assert not run_dir.exists()


def sigterm_after_first_commit(cmd: list[str], env: dict[str, str], run_dir, log_path) -> int:
    """Start `cmd` (a launcher) and SIGTERM it alone once a checkpoint is committed: it exits 75 with the
    preemption checkpoint committed, one closing line and no traceback. Returns that checkpoint's step."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    try:
        wait_for(lambda: any(run_dir.glob("ckpt-*/manifest.json")) or proc.poll() is not None, timeout=100,
                 what="the first committed checkpoint")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=45)
    finally:
        kill_group(proc)
    output = log_path.read_text()
    assert status == EXIT_PREEMPTED, output[-3000:]
    match = re.search(r"preempted at step (\d+): checkpoint committed", output)
    assert match, output[-3000:]
    step = int(match.group(1))
    assert step in [m["step"] for m in manifests(run_dir)]
    assert output.strip().splitlines()[-1].startswith("dist-train launch: SIGTERM received")
    assert "Traceback" not in output
    return step


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_sigterm_to_launcher_of_user_script_exits_75(tmp_path):
    """A user's script (`-- SCRIPT.py`, `dist_train.main(...)` with callables): SIGTERM to the launcher once a
    checkpoint is committed -> forwarded, every rank commits at one step boundary, the launcher exits 75."""
    run_dir, hooks, log_path = tmp_path / "run", tmp_path / "hooks", tmp_path / "launch.log"
    env = base_env({"PYTHONPATH": os.pathsep.join([str(REPO), str(SUPPORT)]), "USERPKG_HOOKS": str(hooks)})
    cmd = [PYTHON, "-m", "dist_train", "launch", "--standalone", "--nproc-per-node", "2", "--", str(USER_SCRIPT),
           "--run-dir", str(run_dir), "--epochs", "1000", "--max-steps", "1000000", "--checkpoint-every", "3",
           "--batch-size", "16", "--log-every", "5", "--no-progress"]
    sigterm_after_first_commit(cmd, env, run_dir, log_path)  # the launcher only, as Kubernetes does to PID 1
    for rank in (0, 1):  # the user's callbacks saw the preemption on every rank
        hooks_seen = [json.loads(line)["hook"] for line in (hooks / f"rank{rank}.jsonl").read_text().splitlines()]
        assert "on_preemption" in hooks_seen, (rank, hooks_seen[-5:])


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_sigterm_to_launcher_commits_and_exits_75(tmp_path):
    """SIGTERM to the launcher (a pod's PID 1): forwarded, checkpoint committed, exit 75 (via launch/single-node.sh)."""
    run_dir = tmp_path / "run"
    log_path = tmp_path / "launch.log"
    env = base_env({"NPROC_PER_NODE": "2", "DIST_TRAIN": f"{PYTHON} -m dist_train"})
    cmd = ["bash", str(REPO / "launch" / "single-node.sh"), "--run-dir", str(run_dir), "--epochs", "1000",
           "--max-steps", "1000000", "--checkpoint-every", "3", *TINY_LAUNCH]
    sigterm_after_first_commit(cmd, env, run_dir, log_path)  # the launcher only: the script exec'd into it
