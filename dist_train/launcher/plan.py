"""From `dist-train launch` arguments to a checked launch plan, before any process starts.

The command line is torchrun's options, `--`, then what every worker runs: dist_train's
`train` command, a module (`-m MODULE ARGS`) or a script (`SCRIPT.py ARGS`), the last two
for a user's own script built on the Python API (`dist_train.main(...)`):

    dist-train launch --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint host:29400 \
        --node-rank 0 -- train --config job.yaml
    dist-train launch --standalone --nproc-per-node 2 -- -m examples.char_transformer --run-dir runs/c
    dist-train launch --standalone --nproc-per-node 2 -- my_train.py --run-dir runs/m

torchrun's options are read by torchrun's own parser (`torch.distributed.run`), so
every option, its spelling and its `PET_*` environment default (which the Kubeflow
operator sets) work as they do for `torchrun`. The `train` flags are resolved in
this process with the same code the workers use, so a bad flag, config value or
run-dir URL exits 2 here, before a single worker starts. A user's script may declare
flags of its own, so only the script (or module) is checked here; its flags are checked
by the workers, whose unanimous status 2 is the launcher's.
"""

from __future__ import annotations

import argparse
import math
import os
import uuid
from dataclasses import dataclass

from dist_train.config.job import JobConfig
from dist_train.config.parser import Parser, suggestion
from dist_train.errors import UserError

USAGE = "dist-train launch [torchrun options] -- train [train flags] | -m MODULE [args] | SCRIPT.py [args]"
# The workers of `-- train`: `python -u -m dist_train train ...`, one per local rank.
WORKER_MODULE = "dist_train"
FORMS = "train, -m MODULE or SCRIPT.py"
# Seconds the agent waits after forwarding SIGTERM beyond the trainer's own --preempt-deadline
# (which already includes the final checkpoint commit) before it SIGKILLs the workers.
SHUTDOWN_MARGIN_S = 10
# torchrun forwards these to the workers; SIGUSR1 is added because SLURM's --signal and
# the trainer both use it for "save and stop".
DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
SIGNALS_TO_FORWARD = DEFAULT_SIGNALS + ",SIGUSR1"


@dataclass(frozen=True)
class WorkerCommand:
    """What each worker runs: `python -u -m dist_train train ...`, `-m MODULE ...` or `SCRIPT ...`."""
    kind: str  # "train", "module" or "script"
    target: str  # the module (`dist_train` for train) or the script path
    args: list[str]  # after the target: ["train", flags...] for train, the user's arguments otherwise

    @property
    def is_module(self) -> bool:
        return self.kind in ("train", "module")


@dataclass
class LaunchPlan:
    config: object  # torch.distributed.launcher.api.LaunchConfig
    entrypoint: str  # the Python interpreter that runs the workers
    worker_args: list[str]  # ["-u", "-m", "dist_train", "train", ...] or ["-u", "my_train.py", ...]
    job: JobConfig | None  # `train`: the resolved config every worker will resolve again; user code: None
    print_config: bool  # `train --print-config`: print once here, start nothing
    command: WorkerCommand | None = None


def shutdown_timeout(preempt_deadline: float) -> int:
    """How long the agent lets workers finish after it forwarded a signal: deadline plus margin."""
    return int(math.ceil(preempt_deadline)) + SHUTDOWN_MARGIN_S


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """torchrun's options before the first `--`, the workers' command after it (verbatim)."""
    if "--" not in argv:
        raise UserError(f"launch: missing '--' before the workers' command (usage: {USAGE})")
    cut = argv.index("--")
    return list(argv[:cut]), list(argv[cut + 1:])


def worker_command(command: list[str]) -> WorkerCommand:
    """`train ...`, `-m MODULE ...` or `SCRIPT ...`, checked: the module importable, the script a file."""
    if not command:
        raise UserError(f"launch: nothing after '--'; expected {FORMS} (usage: {USAGE})")
    head = command[0]
    if head == "train":
        return WorkerCommand("train", WORKER_MODULE, command)
    if head in ("-m", "--module"):
        if len(command) < 2 or not command[1] or command[1].startswith("-"):
            raise UserError(f"launch: {head} needs a module name after it, as for python -m (usage: {USAGE})")
        _check_module(command[1])
        return WorkerCommand("module", command[1], command[2:])
    if head.startswith("-"):
        raise UserError(f"launch: expected {FORMS} after '--', got {head!r} (usage: {USAGE})")
    if not os.path.isfile(head):
        raise UserError(f"launch: {head!r} after '--' is not a script file; expected {FORMS} (usage: {USAGE})")
    return WorkerCommand("script", head, command[1:])


def _check_module(name: str) -> None:
    """`python -m NAME` would find it: the workers' path is the current directory and PYTHONPATH."""
    import importlib.util
    import sys

    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        spec = importlib.util.find_spec(name)
    except Exception as exc:  # noqa: BLE001 - a parent package that fails to import is the user's to fix
        raise UserError(f"launch: cannot find module {name!r}: {type(exc).__name__}: {exc}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    if spec is None:
        raise UserError(f"launch: no module named {name!r} (from the current directory and PYTHONPATH)")


def torchrun_parser() -> argparse.ArgumentParser:
    """torchrun's own parser, with its errors turned into one-line `UserError`s."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "dist-train launch"
    parser.usage = USAGE
    parser.allow_abbrev = False  # as for every dist-train parser: `--nproc 2` is an error, not a guess

    def error(message: str) -> None:
        raise UserError(f"launch: {message}")

    parser.error = error  # type: ignore[method-assign]
    return parser


def parse_torchrun_options(options: list[str], command: list[str] | WorkerCommand) -> argparse.Namespace:
    """torchrun's namespace with the worker fixed to the command after `--`."""
    if not isinstance(command, WorkerCommand):
        command = worker_command(command)
    parser = torchrun_parser()
    target = ["--module", command.target] if command.is_module else [command.target]
    args, extras = parser.parse_known_args([*options, *target, *command.args])
    if extras:
        flags = [a.split("=", 1)[0] for a in extras if a.startswith("-")]
        known = [flag for action in parser._actions for flag in action.option_strings]
        hint = suggestion(flags[0], known) if flags else ""
        raise UserError(f"launch: unrecognized arguments: {' '.join(extras)}{hint}")
    if args.training_script != command.target or list(args.training_script_args) != command.args:
        raise UserError(f"launch: unexpected argument {args.training_script!r} before '--'; what the workers "
                        f"run goes after it (usage: {USAGE})")
    if args.no_python or args.run_path or args.module != command.is_module:
        raise UserError("launch: --no-python, --run-path and --module do not apply before '--': the workers "
                        f"run `python -u` with what follows '--' ({FORMS})")
    return args


def parse_train_command(command: list[str]) -> tuple[argparse.Namespace, JobConfig]:
    """The `train` command parsed and resolved exactly as a worker will do it: the same flags (declared by
    the config fields), the same `resolve` and the same URL check as `dist-train train`."""
    from dist_train.checkpoint.storage import check_url_scheme
    from dist_train.config.job import add_config_arguments, resolve

    parser = Parser(prog="dist-train train")
    add_config_arguments(parser)
    args = parser.parse_args(command[1:])
    job = resolve(args)
    check_url_scheme(job.checkpoint.run_dir)
    return args, job


def user_preempt_deadline(args: list[str]) -> float:
    """A user script's `--preempt-deadline` (flag or `--config` file) when its train flags say so, else the
    default: only for the launcher's shutdown timeout; the workers check the flags themselves."""
    from dist_train.config.job import add_config_arguments, resolve

    parser = Parser(prog="dist-train train", add_help=False)  # the script's own -h is not ours to answer
    add_config_arguments(parser)
    try:
        known, _ = parser.parse_known_args(args)
        return resolve(known).train.preempt_deadline
    except (UserError, OSError, ValueError):
        return JobConfig().train.preempt_deadline


def check_storage(job: JobConfig) -> None:
    """A missing bucket or unwritable folder is bad input: say so once, before the workers start."""
    from dist_train.checkpoint.storage import Storage

    Storage(job.checkpoint.run_dir, job.checkpoint.storage_options).check_reachable()


def _apply_rendezvous_defaults(args: argparse.Namespace) -> None:
    """What `torch.distributed.run.run()` does to the options before `config_from_args()`."""
    from torch.distributed.run import parse_min_max_nnodes

    max_nodes = _nnodes(args.nnodes, parse_min_max_nnodes)[1]
    if args.standalone:
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    elif args.rdzv_backend == "static" and not args.rdzv_endpoint and args.master_port is None:
        if max_nodes == 1:
            args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    if args.master_port is None:
        args.master_port = 29500


def _nnodes(value: str, parse) -> tuple[int, int]:
    try:
        low, high = parse(value)
    except (ValueError, RuntimeError):
        raise UserError(f"launch: --nnodes must be N or MIN:MAX, got {value!r}") from None
    if not 0 < low <= high:
        raise UserError(f"launch: --nnodes needs 0 < MIN <= MAX, got {value!r}")
    return low, high


def _user_set(options: list[str], flag: str) -> bool:
    """Whether a torchrun option was given, as a flag (either spelling) or as its PET_* variable."""
    spellings = (flag, "--" + flag[2:].replace("-", "_"))
    given = any(o in spellings or o.startswith(tuple(s + "=" for s in spellings)) for o in options)
    return given or "PET_" + flag[2:].replace("-", "_").upper() in os.environ


def plan_launch(argv: list[str]) -> LaunchPlan:
    """Everything checked and decided; nothing started. Raises `UserError` for bad input."""
    from torch.distributed.run import config_from_args

    options, words = split_argv(argv)
    command = worker_command(words)
    args = parse_torchrun_options(options, command)
    train_args, job = parse_train_command(words) if command.kind == "train" else (None, None)
    if args.max_restarts < 0:
        raise UserError(f"launch: --max-restarts must be >= 0, got {args.max_restarts}")
    _apply_rendezvous_defaults(args)
    if not _user_set(options, "--shutdown-timeout") and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        deadline = job.train.preempt_deadline if job is not None else user_preempt_deadline(command.args)
        args.shutdown_timeout = shutdown_timeout(deadline)
    if not _user_set(options, "--signals-to-handle"):
        args.signals_to_handle = SIGNALS_TO_FORWARD
    try:
        config, entrypoint, worker_args = config_from_args(args)
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise UserError(f"launch: {exc}") from None
    if args.rdzv_backend == "c10d" and "is_host" not in config.rdzv_configs and _user_set(options, "--node-rank"):
        # Node 0 hosts the rendezvous store. Left to itself torch guesses from DNS, and a pod whose
        # headless-Service record is not published yet would wrongly decide it is not the host.
        config.rdzv_configs["is_host"] = args.node_rank == 0
    print_config = bool(train_args.print_config) if train_args is not None else False
    if job is not None and not print_config:
        check_storage(job)
    return LaunchPlan(config, entrypoint, list(worker_args), job, print_config, command)
