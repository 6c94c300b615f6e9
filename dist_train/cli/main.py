"""Entry point of `dist-train` and `python -m dist_train`.

A `UserError` becomes one line on stderr and exit status 2 (printed by rank 0
only, so a torchrun job says it once). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import sys

from dist_train.cli.parsing import Parser, subparsers
from dist_train.errors import EXIT_BAD_INPUT, UserError, exit_now

COMMANDS = ("train", "ckpt", "predict", "evaluate", "export", "report", "bench", "launch")


def build_parser() -> Parser:
    from dist_train.cli import ckpt, infer, launch, report, train, bench

    parser = Parser(prog="dist-train", description="Distributed PyTorch training with atomic checkpoints.")
    commands = subparsers(parser, "command")
    for module in (train, ckpt, infer, report, bench, launch):
        module.register(commands)
    return parser


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.handler(args) or 0)
    except UserError as exc:
        if _is_rank0():
            message = " ".join(str(exc).split())
            print(f"dist-train: error: {message}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


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
