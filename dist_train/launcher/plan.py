"""From `dist-train launch` arguments to a checked launch plan, before any process starts.

The command line is torchrun's options, `--`, then the `train` command:

    dist-train launch --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint host:29400 \
        --node-rank 0 -- train --config job.yaml

torchrun's options are read by torchrun's own parser (`torch.distributed.run`), so
every option, its spelling and its `PET_*` environment default (which the Kubeflow
operator sets) work as they do for `torchrun`. The `train` flags are resolved in
this process with the same code the workers use, so a bad flag, config value or
run-dir URL exits 2 here, before a single worker starts.
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

USAGE = "dist-train launch [torchrun options] -- train [train flags]"
# The workers: `python -u -m dist_train train ...`, one per local rank.
WORKER_MODULE = "dist_train"
# Seconds the agent waits after forwarding SIGTERM beyond the trainer's own --preempt-deadline
# (which already includes the final checkpoint commit) before it SIGKILLs the workers.
SHUTDOWN_MARGIN_S = 10
# torchrun forwards these to the workers; SIGUSR1 is added because SLURM's --signal and
# the trainer both use it for "save and stop".
DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
SIGNALS_TO_FORWARD = DEFAULT_SIGNALS + ",SIGUSR1"


@dataclass
class LaunchPlan:
    config: object  # torch.distributed.launcher.api.LaunchConfig
    entrypoint: str  # the Python interpreter that runs the workers
    worker_args: list[str]  # ["-u", "-m", "dist_train", "train", ...]
    job: JobConfig  # the resolved config every worker will resolve again
    print_config: bool  # `train --print-config`: print once here, start nothing


def shutdown_timeout(preempt_deadline: float) -> int:
    """How long the agent lets workers finish after it forwarded a signal: deadline plus margin."""
    return int(math.ceil(preempt_deadline)) + SHUTDOWN_MARGIN_S


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """torchrun's options before the first `--`, the `train` command after it."""
    if "--" not in argv:
        raise UserError(f"launch: missing '--' before the train command (usage: {USAGE})")
    cut = argv.index("--")
    options, command = list(argv[:cut]), list(argv[cut + 1:])
    if not command or command[0] != "train":
        got = command[0] if command else "nothing"
        raise UserError(f"launch: expected 'train' after '--', got {got!r} (usage: {USAGE})")
    return options, command


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


def parse_torchrun_options(options: list[str], command: list[str]) -> argparse.Namespace:
    """torchrun's namespace with the worker fixed to `-m dist_train <command>`."""
    parser = torchrun_parser()
    args, extras = parser.parse_known_args([*options, "--module", WORKER_MODULE, *command])
    if extras:
        flags = [a.split("=", 1)[0] for a in extras if a.startswith("-")]
        known = [flag for action in parser._actions for flag in action.option_strings]
        hint = suggestion(flags[0], known) if flags else ""
        raise UserError(f"launch: unrecognized arguments: {' '.join(extras)}{hint}")
    if args.training_script != WORKER_MODULE or list(args.training_script_args) != command:
        raise UserError(f"launch: unexpected argument {args.training_script!r} before '--'; the workers always "
                        f"run `python -m {WORKER_MODULE} train` (usage: {USAGE})")
    if args.no_python or args.run_path:
        raise UserError("launch: --no-python and --run-path do not apply: the workers always run "
                        f"`python -m {WORKER_MODULE} train`")
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

    options, command = split_argv(argv)
    args = parse_torchrun_options(options, command)
    train_args, job = parse_train_command(command)
    if args.max_restarts < 0:
        raise UserError(f"launch: --max-restarts must be >= 0, got {args.max_restarts}")
    _apply_rendezvous_defaults(args)
    if not _user_set(options, "--shutdown-timeout") and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        args.shutdown_timeout = shutdown_timeout(job.train.preempt_deadline)
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
    if not train_args.print_config:
        check_storage(job)
    return LaunchPlan(config, entrypoint, list(worker_args), job, bool(train_args.print_config))
