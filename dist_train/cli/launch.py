"""`dist-train launch`: torchrun for `dist-train train` or a script on the Python API, with exit statuses
a scheduler can act on.

    dist-train launch --standalone --nproc-per-node 2 -- train --run-dir runs/x
    dist-train launch --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
        --rdzv-endpoint node0:29400 --rdzv-id job1 --node-rank 0 --max-restarts 3 -- train --config job.yaml
    dist-train launch --standalone --nproc-per-node 2 -- -m examples.char_transformer --run-dir runs/c
    dist-train launch --standalone --nproc-per-node 2 -- my_train.py --run-dir runs/m

After '--': `train` and its flags (checked here first), `-m MODULE` or `SCRIPT.py` and its
arguments (a script that calls `dist_train.main(...)`; its flags are checked by the workers).
Exit status: 0 finished, 1 failed, 2 bad input (nothing started), 3 superseded by
a newer attempt, 75 preempted (a checkpoint was committed; start it again).
"""

from __future__ import annotations

import argparse
import sys

from dist_train.cli.parsing import Parser
from dist_train.errors import EXIT_BAD_INPUT, UserError

DESCRIPTION = __doc__


class _TorchrunArguments(Parser):
    """Keeps every argument for the launcher: torchrun's own parser reads the options before `--`
    and the train parser the rest, so this sub-command declares none of them itself."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace = namespace if namespace is not None else argparse.Namespace()
        namespace.launch_argv = list(args if args is not None else sys.argv[1:])
        namespace.handler = run
        return namespace, []


def register(commands) -> None:
    parser = commands.add_parser("launch", help="torchrun for `train` or your script: exit 2 bad input, 75 preempted",
                                 add_help=False)
    parser.__class__ = _TorchrunArguments


def _print_help() -> None:
    from dist_train.launcher import USAGE
    from dist_train.launcher.plan import torchrun_parser

    print(f"usage: {USAGE}\n\n{DESCRIPTION.strip()}\n\ntorchrun options (before '--'); each also reads "
          "its PET_* environment variable:\n")
    options = torchrun_parser().format_help().split("options:", 1)[-1].strip("\n").splitlines()
    print("\n".join(line for line in options if not line.lstrip().startswith("-h, --help")))


def run(args: argparse.Namespace) -> int:
    from dist_train.launcher import launch

    argv = args.launch_argv
    options = argv[:argv.index("--")] if "--" in argv else argv
    if "-h" in options or "--help" in options:
        _print_help()
        return 0
    try:
        return launch(argv)
    except UserError as exc:
        # Printed on every node: main() prints only where RANK is unset or 0, and a scheduler
        # (the Kubeflow operator, SLURM wrappers) may set RANK for the launcher itself.
        print(f"dist-train: error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
