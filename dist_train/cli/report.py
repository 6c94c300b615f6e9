"""`dist-train report RUN_DIR`: a run's curves and attempt timeline as a PNG, its summary and goodput."""

from __future__ import annotations

import argparse
import json

from dist_train.cli.parsing import storage_options

DEFAULT_NAME = "report.png"


def register(commands) -> None:
    parser = commands.add_parser("report", help="curves and attempt timeline (PNG), summary and goodput of a run",
                                 description="Plot the task's metrics (loss, accuracy, MSE/MAE, perplexity...) "
                                             "against step with resumes and committed checkpoints marked, beside "
                                             "a timeline of the run's attempts, and print a summary with the "
                                             "run's goodput (docs/goodput.md). RUN_DIR may be any run-dir URL "
                                             "(local, s3://, ...).")
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help=f"where the plot goes (default: {DEFAULT_NAME} in a local run dir, in the current "
                             "folder for a remote one; .svg and .pdf work too)")
    parser.add_argument("--no-plot", action="store_true", help="only the text summary")
    parser.add_argument("--json", action="store_true", help="print the summary and goodput as JSON")
    parser.add_argument("--verify", choices=("size", "sha256"), default="size",
                        help="how checkpoints are checked before they are marked (default: size)")
    parser.add_argument("--storage-options", default="{}", metavar="JSON", help="fsspec options as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dist_train.checkpoint.storage import Storage
    from dist_train.goodput.accounting import account
    from dist_train.goodput.events import read_records
    from dist_train.report.history import committed_checkpoints, read_history
    from dist_train.report.summary import format_goodput, format_summary, summarize

    options = storage_options(args.storage_options)
    if not args.no_plot and args.out is not None:
        from dist_train.report.plot import plot_format
        plot_format(args.out)  # a bad --out fails before any reading
    storage = Storage(args.run_dir, options)
    history = read_history(storage)
    checkpoints, folders = committed_checkpoints(storage, args.verify)
    summary = summarize(history, checkpoints, folders)
    goodput = account(read_records(storage))
    summary["attempt_count"] = max(summary.pop("attempts"), len(goodput["attempts"]))
    out = None
    if not args.no_plot:
        from dist_train.report.plot import plot_curves
        out = args.out or (storage.local_path(DEFAULT_NAME) if storage.appendable else DEFAULT_NAME)
        plot_curves(history, [v.ref.step for v in checkpoints], out, title=storage.display_url, goodput=goodput)
        summary["plot"] = out
    if args.json:
        print(json.dumps({**summary, **goodput}, indent=1))
        return 0
    lines = format_summary(storage.display_url, {**summary, "attempts": summary["attempt_count"]})
    print("\n".join(lines + format_goodput(goodput)))
    if out is not None:
        print(f"report written to {out}")
    return 0
