"""`dist-train predict|evaluate|export`: using a checkpoint's model after training.

`--checkpoint` is a checkpoint folder or a run dir (its newest valid checkpoint).
Only the model file is read, and its sha256 is checked while reading.
`evaluate` also runs under torchrun and then reports the exact global numbers.
`predict` and `export` follow the task recorded in the checkpoint (classes, values, a language
model's continuation); the run's data set is rebuilt only when something needs it (validation
samples, the shape of one input).
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

    sub = commands.add_parser("predict", help="what the model predicts for your inputs (or validation samples)",
                              description="Follows the task the checkpoint was trained for: a classifier "
                                          "prints each input's top-k classes with softmax probabilities, a "
                                          "regression model its values, a language model a greedy "
                                          "continuation of --prompt or of text files. Inputs are image files "
                                          "or folders of them, .npy or .pt files of tensors (one sample, or a "
                                          "batch), or text files; with none, a few validation samples of the "
                                          "run's own data set, with their targets.")
    common(sub)
    data(sub)
    sub.add_argument("inputs", nargs="*", metavar="FILE_OR_FOLDER",
                     help="image files or folders, .npy/.pt tensor files, text files (language model)")
    sub.add_argument("--top-k", type=int, default=5, metavar="K", help="classes shown per input (default 5)")
    sub.add_argument("--samples", type=int, default=8, metavar="N",
                     help="validation samples to predict when no inputs are given (default 8)")
    sub.add_argument("--prompt", metavar="TEXT", help="language model: the text to continue")
    sub.add_argument("--max-new-tokens", type=int, default=50, metavar="N",
                     help="language model: tokens generated per prompt (default 50)")
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
    sub.add_argument("--input-shape", metavar="N,...",
                     help="a graph's example input shape, batch first (e.g. 1,3,32,32); default: the recorded "
                          "image shape, else a validation sample's")
    sub.add_argument("--data-root", metavar="PATH", help="where the data set's files are now, if moved")
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
    from dist_train.inference.predict import describe_task, find_images, format_predictions

    _positive(args, "top_k", "samples", "batch_size", "max_new_tokens")
    _quiet_logging()
    files = find_images(args.inputs)
    loaded = load_model(args.checkpoint, _options(args), args.model, pick_device(args.device))
    if args.prompt is not None and loaded.task.name != "language_model":
        raise UserError(f"--prompt is for a language model; checkpoint {loaded.url} is a {loaded.task.name} model")
    data = _lazy(lambda: rebuild_data(loaded, args.data_root))
    if loaded.task.name == "language_model":
        items, failures = _continuations(args, loaded, files, data), []
        lines = None
    else:
        items, failures = _predictions(args, loaded, files, data)
        lines = format_predictions(items, loaded.class_names)
    for failure in failures:
        print(f"dist-train: error: {failure.reason}", file=sys.stderr)
    if files and not items:
        return EXIT_BAD_INPUT  # nothing could be read: each file said why, on its own line
    if args.json:
        report = {"checkpoint": loaded.url, "step": loaded.step, "model": loaded.spec.name,
                  "task": loaded.task.name,
                  "predictions": [p.as_dict() if lines is None else p.as_dict(loaded.class_names) for p in items]}
        if failures:
            report["failed"] = [{"input": f.source, "error": f.reason} for f in failures]
        print(json.dumps(report, indent=1))
    else:
        from dist_train.inference.generate import format_continuations

        print(f"checkpoint {loaded.url} (step {loaded.step}, {loaded.spec.name}, {describe_task(loaded)})")
        for line in (format_continuations(items) if lines is None else lines):
            print(line)
    return EXIT_FAILURE if failures else 0


def _lazy(build):
    """The run's data set, rebuilt once and only when something needs it."""
    cache = []

    def get():
        if not cache:
            cache.append(build())
        return cache[0]
    return get


def _sample_rank(loaded, data) -> int | None:
    from dist_train.inference.inputs import sample_input
    from dist_train.inference.predict import preprocessing_of

    record = preprocessing_of(loaded) or {}
    if record.get("input") == "tensor" and isinstance(record.get("shape"), list):
        return len(record["shape"])
    if record.get("input") == "image":
        return 3
    sample = sample_input(data)
    return None if sample is None else sample.dim()


def _predictions(args: argparse.Namespace, loaded, files: list[str], data):
    """Classes or values of image files, tensor files, or (no inputs) validation samples."""
    from dist_train.inference.inputs import as_batches, is_tensor_file, read_tensors
    from dist_train.inference.predict import file_inputs, predict_files, predict_samples, predict_tensors

    batch_size = args.batch_size or 64
    if not files:
        return predict_samples(loaded, data().val, args.samples, args.top_k, "val", batch_size), []
    tensor_files = [f for f in files if is_tensor_file(f)]
    images = [f for f in files if not is_tensor_file(f)]
    predictions, failures = [], []
    if images:
        inputs = file_inputs(loaded, data)
        predictions, failures = predict_files(loaded, images, inputs, args.top_k, batch_size)
    if tensor_files:
        rank = _sample_rank(loaded, data)
        for path in tensor_files:
            predictions += predict_tensors(loaded, [path], as_batches(read_tensors(path), rank), args.top_k)
    return predictions, failures


def _continuations(args: argparse.Namespace, loaded, files: list[str], data):
    """A language model continues --prompt, text files, token-id tensor files, or validation samples."""
    from dist_train.inference.generate import continue_ids, continue_prompts
    from dist_train.inference.inputs import is_tensor_file, read_tensors, read_text

    steps = args.max_new_tokens
    prompts = [("prompt", args.prompt)] if args.prompt is not None else []
    prompts += [(f, read_text(f)) for f in files if not is_tensor_file(f)]
    out = continue_prompts(loaded, prompts, steps) if prompts else []
    for path in (f for f in files if is_tensor_file(f)):
        rows = [row for t in read_tensors(path) for row in (t if t.dim() > 1 else t.unsqueeze(0))]
        out += continue_ids(loaded, [path if len(rows) == 1 else f"{path}[{i}]" for i in range(len(rows))],
                            rows, steps)
    if prompts or files:
        return out
    val = data().val
    indices = range(min(args.samples, len(val)))
    return continue_ids(loaded, [f"val[{i}]" for i in indices], [_tensor(val[i][0]) for i in indices], steps)


def _tensor(value):
    import torch

    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


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

    from dist_train.inference.inputs import parse_shape, sample_input
    from dist_train.inference.loading import rebuild_data

    shape = parse_shape(args.input_shape) if args.input_shape else None
    check_targets(args.out, args.force, args.format)  # before reading anything: a refused export costs nothing
    _quiet_logging()
    loaded = load_model(args.checkpoint, _options(args), args.model)
    written = export_model(loaded, args.out, args.force, args.format, shape,
                           lambda: sample_input(lambda: rebuild_data(loaded, args.data_root)))
    print(f"exported {loaded.spec.name} of {loaded.url} (step {loaded.step}) as {export_format(args.out, args.format)}")
    for path in written:
        print(f"wrote {path}")
    return 0
