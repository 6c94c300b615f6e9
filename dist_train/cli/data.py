"""`dist-train data pack SOURCE --out URL`: a data set as tar shards plus a data manifest, in any store.

Imports torch only when a pack runs (not for `--help`).
"""

from __future__ import annotations

import argparse
import sys

from dist_train.errors import UserError

HELP = "pack a data set into tar shards and a data manifest (local, file://, s3://)"


def register(commands) -> None:
    from dist_train.cli.parsing import subparsers

    parser = commands.add_parser("data", help=HELP)
    actions = subparsers(parser, "action")
    sub = actions.add_parser("pack", help="write SOURCE as shards (WebDataset tar layout) and a data manifest")
    sub.add_argument("source", metavar="SOURCE",
                     help="a built-in data set name (digits, ...), an image folder, a UTF-8 text file, "
                          "or MODULE:ATTR (a map-style data set factory, as --dataset takes)")
    sub.add_argument("--out", required=True, metavar="URL", help="where the data set goes (path or fsspec URL)")
    sub.add_argument("--shard-size", default="64MiB", metavar="SIZE",
                     help="target shard size in bytes or with KiB/MiB/GiB (default 64MiB)")
    sub.add_argument("--val-fraction", type=float, default=0.15, metavar="F",
                     help="share held out for validation, split by --seed (folders with val/ keep theirs)")
    sub.add_argument("--test-fraction", type=float, default=0.15, metavar="F", help="share held out for test")
    sub.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the split (default 0)")
    sub.add_argument("--dataset-args", default="{}", metavar="JSON",
                     help="keyword arguments for a MODULE:ATTR factory, as a JSON object")
    sub.add_argument("--data-root", default=None, metavar="PATH",
                     help="where mnist/fashion_mnist/cifar10 files are (built-in names that need one)")
    sub.add_argument("--tokenizer", default="char", choices=("char",),
                     help="how a text file is tokenised: char (a vocabulary of its characters)")
    sub.add_argument("--seq-len", type=int, default=64, metavar="T",
                     help="tokens per text sample (input T tokens, target the next T)")
    sub.add_argument("--overwrite", action="store_true", help="replace a data set already at --out")
    sub.add_argument("--storage-options", default="{}", metavar="JSON", help="fsspec options as JSON")
    sub.set_defaults(handler=cmd_pack)


def _fraction(value: float, flag: str) -> float:
    if not 0.0 <= value < 1.0:
        raise UserError(f"{flag} {value}: must be at least 0 and below 1")
    return value


def cmd_pack(args: argparse.Namespace) -> int:
    import json

    from dist_train.cli.parsing import storage_options
    from dist_train.data.packed.pack import pack, parse_size
    from dist_train.data.packed.sources import PackOptions, open_source

    shard_size = parse_size(args.shard_size)
    options = storage_options(args.storage_options)
    try:
        dataset_args = json.loads(args.dataset_args)
    except ValueError as exc:
        raise UserError(f"--dataset-args is not JSON ({exc})") from None
    if not isinstance(dataset_args, dict):
        raise UserError("--dataset-args must be a JSON object")
    if _fraction(args.val_fraction, "--val-fraction") + _fraction(args.test_fraction, "--test-fraction") >= 1.0:
        raise UserError("--val-fraction plus --test-fraction must leave something to train on")
    if args.seq_len < 1:
        raise UserError("--seq-len must be a positive whole number")
    source = open_source(args.source, PackOptions(args.val_fraction, args.test_fraction, args.seed, dataset_args,
                                                  args.tokenizer, args.seq_len, args.data_root))
    manifest = pack(source, args.out, shard_size, storage_options=options, overwrite=args.overwrite,
                    progress=sys.stderr.isatty())
    counts = ", ".join(f"{name} {split['num_samples']} samples in {len(split['shards'])} shards"
                       for name, split in manifest["splits"].items())
    from dist_train.checkpoint.storage import redact_url
    print(f"packed {redact_url(args.out)}: {counts}")
    return 0
