"""`dist-train ckpt list|latest|verify|prune|best`: inspecting and tidying a run dir's checkpoints."""

from __future__ import annotations

import argparse
import json
import sys

from dist_train.checkpoint import catalog, resolver
from dist_train.checkpoint.retention import RetentionPolicy, delete_checkpoint, plan, val_loss_of
from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.storage import Storage
from dist_train.cli.parsing import storage_options
from dist_train.errors import UserError


def register(commands) -> None:
    from dist_train.cli.parsing import subparsers

    parser = commands.add_parser("ckpt", help="list, verify and prune checkpoints")
    actions = subparsers(parser, "action")

    def common(sub, target: str = "RUN_DIR") -> None:
        sub.add_argument("target", metavar=target)
        sub.add_argument("--storage-options", default="{}", metavar="JSON", help="fsspec options as JSON")

    sub = actions.add_parser("list", help="every checkpoint folder with its verdict")
    common(sub)
    sub.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    sub.add_argument("--verify", choices=("sha256", "size"), default="sha256")
    sub.set_defaults(handler=cmd_list)

    sub = actions.add_parser("latest", help="URL of the newest valid checkpoint (exit 1 if none)")
    common(sub)
    sub.add_argument("--verify", choices=("sha256", "size"), default="sha256")
    sub.set_defaults(handler=cmd_latest)

    sub = actions.add_parser("best", help="URL of the valid checkpoint with the lowest validation loss "
                             "(a warning on stderr when the run's best was pruned)")
    common(sub)
    sub.set_defaults(handler=cmd_best)

    sub = actions.add_parser("verify", help="exit 0 when the checkpoint (or every one in a run dir) is valid")
    common(sub, "URL")
    sub.set_defaults(handler=cmd_verify)

    sub = actions.add_parser("prune", help="delete older checkpoints; never the newest valid one")
    common(sub)
    sub.add_argument("--keep-last", type=int, metavar="N", help="keep the newest N")
    sub.add_argument("--keep-best", type=int, metavar="K", help="keep the K lowest validation losses")
    sub.add_argument("--keep-every", type=int, metavar="M", help="keep steps that are multiples of M")
    sub.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    sub.set_defaults(handler=cmd_prune)

    sub = actions.add_parser("convert", help="one safetensors file of a checkpoint's model (sharded or not)")
    common(sub, "CKPT")
    sub.add_argument("--out", required=True, metavar="FILE", help="the safetensors file to write (path or URL)")
    sub.set_defaults(handler=cmd_convert)


def _options(args: argparse.Namespace) -> dict:
    return storage_options(args.storage_options)


def _run_dir(args: argparse.Namespace) -> Storage:
    storage = Storage(args.target, _options(args))
    storage.check_reachable()
    try:
        listing = storage.list("")
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot list {storage.display_url}: {describe_error(exc)}") from None
    if not listing and not storage.exists(""):
        raise UserError(f"run dir not found: {storage.display_url}")
    return storage


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(size)


def _row(verdict: catalog.Verdict) -> dict:
    """The contract's keys (`reason`: why it is invalid), plus why it was saved and its validation loss."""
    row = verdict.as_dict()
    row["save_reason"] = (verdict.manifest or {}).get("reason")
    row["val_loss"] = val_loss_of(verdict.manifest)
    return row


def cmd_list(args: argparse.Namespace) -> int:
    storage = _run_dir(args)
    rows = [_row(v) for v in catalog.scan(storage, args.verify)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no checkpoints in {storage.display_url}")
        return 0
    print(f"{'STEP':>8} {'EPOCH':>5} {'GEN':>4} {'SIZE':>9}  {'CREATED':24} {'SAVED AT':9} {'VAL LOSS':>8} "
          f"{'VALID':5}  URL / REASON")
    for row in rows:
        epoch = "" if row["epoch"] is None else row["epoch"]
        valid = "yes" if row["valid"] else "NO"
        loss = "-" if row["val_loss"] is None else f"{row['val_loss']:.4f}"
        line = (f"{row['step']:>8} {epoch:>5} {row['generation']:>4} {_human(row['size']):>9}  "
                f"{row['created_at'] or '-':24} {row['save_reason'] or '-':9} {loss:>8} {valid:5}  ")
        print(f"{line}{row['url']}")
        if not row["valid"]:
            print(f"{'':{len(line)}}reason: {row['reason']}")
    return 0


def cmd_latest(args: argparse.Namespace) -> int:
    storage = _run_dir(args)
    verdict = catalog.newest_valid(storage, args.verify,
                                   on_skip=lambda v: print(f"skipped {v.url}: {v.reason}", file=sys.stderr))
    if verdict is None:
        print(f"no valid checkpoint in {storage.display_url}", file=sys.stderr)
        return 1
    print(verdict.url)
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    """The lowest validation loss among the valid checkpoints. When the best the run recorded (the newest
    valid manifest's `best`) is lower, its checkpoint was pruned or is invalid: one warning line on stderr
    names its step and what is printed instead, and the exit status stays 0 (the best that exists)."""
    storage = _run_dir(args)
    verdicts = catalog.scan(storage, "sha256")
    valid = [v for v in verdicts if v.valid]
    recorded = _recorded_best(max(valid, key=lambda v: v.ref)) if valid else None
    scored = [(loss, v) for v in valid if (loss := val_loss_of(v.manifest)) is not None]
    if not scored:
        gone = f" (the run's best, step {recorded[1]}, is gone)" if recorded else ""
        print(f"no valid checkpoint with a validation loss in {storage.display_url}{gone}", file=sys.stderr)
        return 1
    loss, best = min(scored, key=lambda pair: (pair[0], -pair[1].ref.step))
    if recorded is not None and recorded[0] < loss:
        value, step = recorded
        invalid = [v for v in verdicts if v.ref.step == step and not v.valid]
        why = f"is invalid ({invalid[-1].reason})" if invalid else "is no longer there (pruned)"
        print(f"warning: the run's best validation loss {value:.6g} (step {step}) belongs to a checkpoint that "
              f"{why}; printing the best remaining one instead: step {best.ref.step}, validation loss {loss:.6g}",
              file=sys.stderr)
    print(best.url)
    return 0


def _recorded_best(verdict: catalog.Verdict) -> tuple[float, int | None] | None:
    """(val_loss, step) of the best validation so far, as a checkpoint's manifest recorded it."""
    best = (verdict.manifest or {}).get("best") or {}
    value = best.get("val_loss")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return float(value), best.get("step")


def cmd_verify(args: argparse.Namespace) -> int:
    """Every digest of the checkpoint (or of each one in a run dir), checked by the one resolver's rules."""
    target = Storage(args.target, _options(args))
    target.check_reachable()
    if resolver.is_checkpoint_url(target):
        located = resolver.locate(args.target, _options(args))
        verdicts = [resolver.check(located, located.refs[0], "sha256")]
    else:
        storage = _run_dir(args)
        verdicts = catalog.scan(storage, "sha256")
        if not verdicts:
            print(f"no checkpoints in {storage.display_url}", file=sys.stderr)
            return 1
    bad = [v for v in verdicts if not v.valid]
    for verdict in verdicts:
        if verdict.valid:
            print(f"ok {verdict.url}")
        else:
            print(f"INVALID {verdict.url}: {verdict.reason}")
    return 1 if bad else 0


def cmd_prune(args: argparse.Namespace) -> int:
    for flag in ("keep_last", "keep_best", "keep_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.keep_last is None and args.keep_best is None and args.keep_every is None:
        raise UserError("ckpt prune: say what to keep: --keep-last N, --keep-best K and/or --keep-every M")
    storage = _run_dir(args)
    newest_valid = catalog.newest_valid(storage, "sha256")
    if newest_valid is None:
        print(f"no valid checkpoint in {storage.display_url}; nothing pruned", file=sys.stderr)
        return 1
    marks = catalog.corrupt_marks(storage)
    verdicts = {v.ref: v for v in catalog.scan(storage, "size")}
    committed = [ref for ref, v in verdicts.items() if v.valid]
    corrupt = [ref for ref in verdicts if ref.name in marks]  # found corrupt at resume: removed first
    doomed = [ref for ref in plan(committed, RetentionPolicy(args.keep_last, args.keep_best, args.keep_every),
                                  lambda ref: val_loss_of(verdicts[ref].manifest), corrupt)
              if ref != newest_valid.ref and (ref < newest_valid.ref or ref in corrupt)]
    for ref in doomed:
        if args.dry_run:
            print(f"would delete {storage.url(ref.name)}")
        else:
            delete_checkpoint(storage, ref)
            print(f"deleted {storage.url(ref.name)}")
    kept = len(committed) - len([ref for ref in doomed if ref not in corrupt])
    print(f"{'would keep' if args.dry_run else 'kept'} {kept} checkpoint(s); newest valid: {newest_valid.url}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from dist_train.checkpoint.convert import convert

    done = convert(args.target, args.out, _options(args))
    print(f"wrote {done.url}: {done.tensors} tensors, {_human(done.size)}, model_digest {done.model_digest}")
    return 0
