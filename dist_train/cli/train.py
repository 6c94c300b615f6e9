"""`dist-train train`: one training job (under torchrun: one rank of it).

The flags are parsed here; the job runs through `dist_train.api.run_job`, the same function a
user's script reaches through `dist_train.train(...)`: one entry path, so the CLI and the
Python API cannot drift apart.
"""

from __future__ import annotations

import argparse

from dist_train.config.job import add_config_arguments


def register(commands) -> None:
    parser = commands.add_parser("train", help="train a model (launch with torchrun for DDP)",
                                 description="Train with DistributedDataParallel under torchrun, or as one "
                                             "process without it. Flags override the --config YAML file.")
    add_config_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dist_train.api import run_job

    return run_job(args)
