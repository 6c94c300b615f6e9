"""`dist-train train`: one training job (under torchrun: one rank of it)."""

from __future__ import annotations

import argparse

from dist_train.config.job import JobConfig, add_config_arguments, dump_yaml, resolve


def register(commands) -> None:
    parser = commands.add_parser("train", help="train a model (launch with torchrun for DDP)",
                                 description="Train with DistributedDataParallel under torchrun, or as one "
                                             "process without it. Flags override the --config YAML file.")
    add_config_arguments(parser)
    parser.set_defaults(handler=run)


def load_config(args: argparse.Namespace) -> JobConfig:
    from dist_train.checkpoint.storage import check_url_scheme

    cfg = resolve(args)
    check_url_scheme(cfg.checkpoint.run_dir)
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from dist_train.distributed.env import configure_logging, distributed
    from dist_train.training.job import run_training

    with distributed(cfg.train.device) as env:
        configure_logging(env)
        return run_training(cfg, env)
