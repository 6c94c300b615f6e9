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

COMMANDS = ("train", "ckpt", "predict", "evaluate", "export", "report", "bench", "launch")
# 128 + SIGPIPE: stdout was a pipe whose reader left.
EXIT_BROKEN_PIPE = 141


def build_parser() -> Parser:
    from dist_train.cli import ckpt, infer, launch, report, train, bench

    parser = Parser(prog="dist-train", description="Distributed PyTorch training with atomic checkpoints.")
    commands = subparsers(parser, "command")
    for module in (train, ckpt, infer, report, bench, launch):
        module.register(commands)
    return parser


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _command(argv: list[str]) -> int:
    try:
        parser = build_parser()
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
        stop_with_agent()
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
