"""`dist-train bench`: dist_train against plain baselines and the machine's limits, side by side.

Every figure is a ratio of two things measured in the same run, alternating, over
several repetitions (median and min..max shown), so it means something on a noisy,
shared machine. See docs/performance.md for what each baseline is.
"""

from __future__ import annotations

import argparse

from dist_train.errors import UserError


def register(commands) -> None:
    parser = commands.add_parser(
        "bench", help="benchmark against plain baselines (ratios, side by side)",
        description="Measure dist_train against plain baselines and the machine's limits: async-save stall, "
                    "save and S3 efficiency, trainer overhead, DDP scaling, resume latency and the amortized "
                    "cost of frequent checkpoints. Prints a table; --json writes every raw number.")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (200 MB state, cnn): about 3 minutes on an idle 2-core machine")
    parser.add_argument("--json", metavar="FILE", help="write the figures and their raw numbers as JSON")
    parser.add_argument("--only", metavar="FAMILIES",
                        help="comma-separated subset of: io, load, restart, s3, training, resume (default: all); "
                        "sharded, goodput and data (packed data from S3) run only when named")
    parser.add_argument("--repeats", type=int, metavar="N", help="repetitions of each A/B pair (default with "
                        "--quick: 3, and 5 for local checkpoint I/O; without: 5 and 7)")
    parser.add_argument("--size-mb", type=int, metavar="MB", help="training-state size of the I/O benchmarks "
                        "(default: 200 with --quick, 1024 without)")
    parser.add_argument("--work-dir", metavar="DIR", help="where the benchmark writes (default: the temp folder); "
                        "it measures that disk")
    parser.add_argument("--verbose", action="store_true", help="also show dist_train's own log lines")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's smoke run
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dist_train.bench.suite import EXTRA_FAMILIES, FAMILIES, configure_logging, run_suite, settings_for

    settings = settings_for("tiny" if args.tiny else "quick" if args.quick else "full")
    if args.repeats is not None:
        if args.repeats < 1:
            raise UserError("--repeats must be at least 1")
        settings.repeats = settings.io_repeats = args.repeats
    if args.size_mb is not None:
        if args.size_mb < 1:
            raise UserError("--size-mb must be at least 1")
        settings.state_bytes = args.size_mb * 2**20
    families = FAMILIES
    if args.only:
        families = tuple(f.strip() for f in args.only.split(",") if f.strip())
        unknown = [f for f in families if f not in FAMILIES + EXTRA_FAMILIES]
        if unknown or not families:
            raise UserError(f"--only: unknown benchmark family {', '.join(unknown) or '(none)'}; "
                            f"choose from {', '.join(FAMILIES + EXTRA_FAMILIES)}")
    configure_logging(args.verbose)

    from dist_train.bench.report import table, to_json, write_json

    figures, meta = run_suite(settings, families, args.work_dir)
    machine = meta["machine"]
    print(f"dist-train bench ({settings.name}): {machine['nproc']} CPUs ({machine['cpu']}), "
          f"{meta['duration_s']:.0f}s, load average {machine['load_average']} -> {meta['load_average_end']}")
    print("value = median over repetitions of the ratio, A and B measured alternately in this run")
    load = max(machine["load_average"] or [0.0], default=0.0)
    if machine["nproc"] and load > 0.5 * machine["nproc"]:
        print(f"warning: the machine was busy (load average {load:.1f} on {machine['nproc']} CPUs) before the run; "
              "the torchrun figures (2 ranks need 2 free cores) are then noisy: check the spread")
    print(table(figures))
    if args.json:
        write_json(args.json, to_json(figures, meta))
        print(f"raw numbers: {args.json}")
    return 1 if any(f.error for f in figures) else 0
