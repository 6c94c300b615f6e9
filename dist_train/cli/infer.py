"""`dist-train predict|evaluate|export`: using a checkpoint's model after training.

`--checkpoint` is a checkpoint folder or a run dir (its newest valid checkpoint).
Only the model file is read, and its sha256 is checked while reading.
`evaluate` also runs under torchrun and then reports the exact global numbers.
`predict` exits 1 when some inputs could not be read (the rest are predicted), 2 when none could.
"""

from __future__ import annotations

import argparse
import json
import sys

from dist_train.cli.parsing import storage_options
from dist_train.errors import UserError


def register(commands) -> None:
    def common(sub) -> None:
        sub.add_argument("--checkpoint", required=True, metavar="URL",
                         help="a checkpoint folder, or a run dir (then its newest valid checkpoint)")
        sub.add_argument("--storage-options", default="{}", metavar="JSON", help="fsspec options as JSON")
        sub.add_argument("--model", metavar="NAME",
                         help="the model you expect (a built-in name or MODULE:ATTR); another is refused")

    def data(sub) -> None:
        sub.add_argument("--data-root", metavar="PATH", help="where the data set's files are now, if moved")
        sub.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        sub.add_argument("--batch-size", type=int, metavar="N", help="inputs per forward pass")

    sub = commands.add_parser("predict", help="top-k classes of image files (or of validation samples)",
                              description="Print each input's top-k classes with softmax probabilities. "
                                          "Inputs are image files or folders of them; with none, a few "
                                          "validation samples of the run's own data set, with true labels.")
    common(sub)
    data(sub)
    sub.add_argument("inputs", nargs="*", metavar="FILE_OR_FOLDER")
    sub.add_argument("--top-k", type=int, default=5, metavar="K", help="classes shown per input (default 5)")
    sub.add_argument("--samples", type=int, default=8, metavar="N",
                     help="validation samples to predict when no inputs are given (default 8)")
    sub.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    sub.set_defaults(handler=cmd_predict)

    sub = commands.add_parser("evaluate", help="loss, accuracy, per-class accuracy and confusion matrix",
                              description="Evaluate a checkpoint on its run's validation or test split. "
                                          "Under torchrun the ranks share the work; the numbers are global.")
    common(sub)
    data(sub)
    sub.add_argument("--split", choices=("val", "test"), default="val")
    sub.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    sub.set_defaults(handler=cmd_evaluate)

    sub = commands.add_parser("export", help="the model's weights (.safetensors/.pt) or a TorchScript, ONNX or "
                                             "torch.export graph, for deployment",
                              description="Write the model to OUT: its weights (.safetensors or .pt; a "
                                          "torchvision backbone's under torchvision's own keys) or, with "
                                          "--format, a graph. Beside it go OUT.json (model spec, class names, "
                                          "preprocessing) and OUT.README.md (how to load and run it).")
    common(sub)
    sub.add_argument("--out", required=True, metavar="FILE",
                     help="the file to write: .safetensors or .pt (weights), .onnx, .pt2, or any with --format")
    sub.add_argument("--format", choices=("weights", "torchscript", "onnx", "exported-program"),
                     help="default: weights, .onnx -> onnx, .pt2 -> exported-program (torch.export)")
    sub.add_argument("--force", action="store_true", help="overwrite OUT and its side files")
    sub.set_defaults(handler=cmd_export)


def _options(args: argparse.Namespace) -> dict:
    return storage_options(args.storage_options)


def _quiet_logging() -> None:
    """Single-process commands: warnings (a skipped checkpoint) on stderr, in the job's log format."""
    import logging

    import torch

    from dist_train.distributed.env import DistEnv, configure_logging

    configure_logging(DistEnv(0, 1, 0, torch.device("cpu"), None), logging.WARNING)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def cmd_predict(args: argparse.Namespace) -> int:
    from dist_train.errors import EXIT_BAD_INPUT, EXIT_FAILURE
    from dist_train.inference.loading import load_model, pick_device, rebuild_data
    from dist_train.inference.predict import (file_inputs, find_images, format_predictions, predict_files,
                                              predict_samples)

    _positive(args, "top_k", "samples", "batch_size")
    _quiet_logging()
    files = find_images(args.inputs)
    loaded = load_model(args.checkpoint, _options(args), args.model, pick_device(args.device))
    batch_size = args.batch_size or 64
    failures = []
    if files:
        inputs = file_inputs(loaded, lambda: rebuild_data(loaded, args.data_root))
        predictions, failures = predict_files(loaded, files, inputs, args.top_k, batch_size)
    else:
        predictions = predict_samples(loaded, rebuild_data(loaded, args.data_root).val, args.samples, args.top_k,
                                      "val", batch_size)
    for failure in failures:
        print(f"dist-train: error: {failure.reason}", file=sys.stderr)
    if files and not predictions:
        return EXIT_BAD_INPUT  # nothing could be read: each file said why, on its own line
    names = loaded.class_names
    if args.json:
        report = {"checkpoint": loaded.url, "step": loaded.step, "model": loaded.spec.name,
                  "predictions": [p.as_dict(names) for p in predictions]}
        if failures:
            report["failed"] = [{"input": f.source, "error": f.reason} for f in failures]
        print(json.dumps(report, indent=1))
    else:
        print(f"checkpoint {loaded.url} (step {loaded.step}, {loaded.spec.name}, {len(names)} classes)")
        for line in format_predictions(predictions, names):
            print(line)
    return EXIT_FAILURE if failures else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dist_train.distributed.env import configure_logging, distributed
    from dist_train.inference.evaluate import evaluate_split, format_result, result_dict
    from dist_train.inference.loading import build_loaded, read_weights, rebuild_data

    _positive(args, "batch_size")
    options = _options(args)
    with distributed(args.device) as env:
        configure_logging(env)
        # Rank 0 picks the checkpoint (a run dir may gain one meanwhile); the others read that same folder.
        chosen = env.on_every_rank(lambda: read_weights(args.checkpoint, options) if env.is_rank0 else None)
        url = env.broadcast_object(chosen.url if chosen else None)

        def prepare():
            loaded = build_loaded(chosen or read_weights(url, options), args.model, env.device)
            return loaded, rebuild_data(loaded, args.data_root)

        loaded, bundle = env.on_every_rank(prepare)
        cfg_batch = ((loaded.manifest.get("config") or {}).get("data") or {}).get("batch_size", 64)
        result = evaluate_split(env, loaded, bundle, args.split, args.batch_size or cfg_batch)
        if env.is_rank0:
            report = result_dict(loaded, args.split, result)
            if args.json:
                print(json.dumps(report, indent=1))
            else:
                print("\n".join(format_result(report)))
            sys.stdout.flush()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dist_train.inference.export import check_targets, export_format, export_model
    from dist_train.inference.loading import load_model

    check_targets(args.out, args.force, args.format)  # before reading anything: a refused export costs nothing
    _quiet_logging()
    loaded = load_model(args.checkpoint, _options(args), args.model)
    written = export_model(loaded, args.out, args.force, args.format)
    print(f"exported {loaded.spec.name} of {loaded.url} (step {loaded.step}) as {export_format(args.out, args.format)}")
    for path in written:
        print(f"wrote {path}")
    return 0
