"""Entry point of `dist-train` and `python -m dist_train`.

A `UserError` becomes one line on stderr and exit status 2 (printed by rank 0
only, so a torchrun job says it once). Anything else is a bug and keeps its
traceback.

Output into a pipe that closed early (`dist-train ckpt list --json | head -1`) is
not an error of ours: the command stops quietly with exit status 141, what a shell
reports for a Unix tool killed by SIGPIPE (`yes | head -1`), so `set -o pipefail`
treats dist-train like `cat`. SIGPIPE itself stays ignored (Python's default): a
training job must never die because whoever read its stdout went away.
"""

from __future__ import annotations

import os
import select
import sys

from dist_train.cli.parsing import Parser, subparsers
from dist_train.errors import EXIT_BAD_INPUT, LocalUserError, UserError, exit_now

# The process that started this one, read before anything slow is imported: a torchrun agent killed
# while its workers still import torch (seconds) is gone by the time the agent watch starts.
LAUNCHER_PID = os.getppid()
COMMANDS = ("train", "ckpt", "predict", "evaluate", "export", "report", "bench", "launch", "data")
# 128 + SIGPIPE: stdout was a pipe whose reader left.
EXIT_BROKEN_PIPE = 141


# The module that registers each command, and the one-line help `dist-train --help` shows without
# importing it (some import torch: seconds of start-up for every command). A unit test keeps the lines
# equal to the modules' own.
COMMAND_MODULES = {"train": "train", "ckpt": "ckpt", "predict": "infer", "evaluate": "infer", "export": "infer",
                   "report": "report", "bench": "bench", "launch": "launch",
                   "data": "data"}
COMMAND_HELP = {
    "train": "train a model (launch with torchrun for DDP)",
    "ckpt": "list, verify and prune checkpoints",
    "predict": "what the model predicts for your inputs (or validation samples)",
    "evaluate": "loss, accuracy, per-class accuracy and confusion matrix",
    "export": "the model's weights (.safetensors/.pt) or a TorchScript, ONNX or torch.export graph, for deployment",
    "report": "curves and attempt timeline (PNG), summary and goodput of a run",
    "bench": "benchmark against plain baselines (ratios, side by side)",
    "launch": "torchrun for `train` or your script: exit 2 bad input, 75 preempted",
    "data": "pack a data set into tar shards and a data manifest (local, file://, s3://)",
}


def build_parser(command: str | None = None) -> Parser:
    """The whole CLI; with `command`, only that command's module is imported (the others are named
    with their help line), so `dist-train --help` and `dist-train train --help` never import torch."""
    import importlib

    parser = Parser(prog="dist-train", description="Distributed PyTorch training with atomic checkpoints.")
    commands = subparsers(parser, "command")
    wanted = list(dict.fromkeys(COMMAND_MODULES.values())) if command is None else \
        [COMMAND_MODULES[command]] if command in COMMAND_MODULES else []
    registered: set[str] = set()
    for name in COMMAND_MODULES:
        module = COMMAND_MODULES[name]
        if module in wanted and module not in registered:
            registered.add(module)
            importlib.import_module(f"dist_train.cli.{module}").register(commands)
        elif module not in wanted:
            commands.add_parser(name, help=COMMAND_HELP[name])
    return parser


def _chosen_command(argv: list[str]) -> str:
    """The sub-command named on the command line ("" for none: `--help`, or a typo argparse reports)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return ""


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _command(argv: list[str]) -> int:
    try:
        parser = build_parser(_chosen_command(argv))
        args = parser.parse_args(argv)
        return int(args.handler(args) or 0)
    except UserError as exc:
        if _is_rank0() or isinstance(exc, LocalUserError):  # found by this rank alone: nobody else says it
            message = " ".join(str(exc).split())
            print(f"dist-train: error: {message}", file=sys.stderr, flush=True)
        # The traceback (never shown) keeps what the failed job held alive in a reference cycle until exit,
        # DataLoader iterators among it; their workers ignore SIGTERM, so the exit would wait for them forever.
        exc.__traceback__ = None
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # --help: its text may still sit in the stdout buffer
        if exc.code not in (0, None):
            raise
        return 0


def _stdout_closed() -> bool:
    """Whether stdout is a pipe (or socket) nobody reads any more; a BrokenPipeError from anything
    else is a bug and keeps its traceback."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll() here, or no file descriptor: the usual cause
        return True


def _stdout_gone() -> int:
    """Point stdout at /dev/null: the interpreter's final flush of what is still buffered then succeeds
    instead of printing 'Exception ignored ... BrokenPipeError' and exiting 120."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # a stdout without a file descriptor (captured in tests)
        pass
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "RANK" in os.environ:  # a torchrun worker (checked there): stop when the agent that started it dies
        from dist_train.distributed.env import stop_with_agent
        stop_with_agent(agent=LAUNCHER_PID)
    try:
        code = _command(argv)
        sys.stdout.flush()  # a pipe that closed early shows up here at the latest
        return code
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        return _stdout_gone()


def run() -> None:
    """Process entry point (console script and `python -m dist_train`).

    A torchrun worker leaves with `os._exit` once its output is flushed and its process group is
    torn down: C++ destructors of the distributed runtime at interpreter exit can otherwise abort
    now and then, turning a meaningful exit status (2, 75) into a crash.
    """
    code = main()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        exit_now(code)
    sys.exit(code)
