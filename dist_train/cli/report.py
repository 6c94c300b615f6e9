"""`dist-train report RUN_DIR`: a run's curves as a PNG and its summary in the terminal."""

from __future__ import annotations

import argparse
import json

from dist_train.cli.parsing import storage_options


def register(commands) -> None:
    parser = commands.add_parser("report", help="loss/accuracy curves (PNG) and a text summary of a run",
                                 description="Plot training and validation loss and accuracy against step, "
                                             "with resumes and committed checkpoints marked, and print a "
                                             "summary. RUN_DIR may be any run-dir URL (local, s3://, ...).")
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--out", default="curves.png", metavar="FILE",
                        help="where the plot goes (default curves.png; .svg and .pdf work too)")
    parser.add_argument("--no-plot", action="store_true", help="only the text summary")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--verify", choices=("size", "sha256"), default="size",
                        help="how checkpoints are checked before they are marked (default: size)")
    parser.add_argument("--storage-options", default="{}", metavar="JSON", help="fsspec options as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dist_train.checkpoint.storage import Storage
    from dist_train.report.history import committed_checkpoints, read_history
    from dist_train.report.summary import format_summary, summarize

    options = storage_options(args.storage_options)
    if not args.no_plot:
        from dist_train.report.plot import plot_format
        plot_format(args.out)  # a bad --out fails before any reading
    storage = Storage(args.run_dir, options)
    history = read_history(storage)
    checkpoints, folders = committed_checkpoints(storage, args.verify)
    summary = summarize(history, checkpoints, folders)
    if not args.no_plot:
        from dist_train.report.plot import plot_curves
        plot_curves(history, [v.ref.step for v in checkpoints], args.out, title=storage.display_url)
        summary["plot"] = args.out
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print("\n".join(format_summary(storage.display_url, summary)))
    if not args.no_plot:
        print(f"curves written to {args.out}")
    return 0
