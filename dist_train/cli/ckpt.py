"""`dist-train ckpt list|latest|verify|prune|best`: inspecting and tidying a run dir's checkpoints."""

from __future__ import annotations

import argparse
import json
import sys

from dist_train.checkpoint import catalog
from dist_train.checkpoint import manifest as mf
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

    sub = actions.add_parser("best", help="URL of the valid checkpoint with the lowest validation loss")
    common(sub)
    sub.set_defaults(handler=cmd_best)

    sub = actions.add_parser("verify", help="exit 0 when the checkpoint (or every one in a run dir) is valid")
    common(sub, "URL")
    sub.set_defaults(handler=cmd_verify)

    sub = actions.add_parser("prune", help="delete older checkpoints; never the newest valid one")
    common(sub)
    sub.add_argument("--keep-last", type=int, required=True, metavar="N")
    sub.add_argument("--keep-best", type=int, metavar="K", help="also keep the K lowest validation losses")
    sub.add_argument("--keep-every", type=int, metavar="M", help="also keep steps that are multiples of M")
    sub.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    sub.set_defaults(handler=cmd_prune)


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


def cmd_list(args: argparse.Namespace) -> int:
    storage = _run_dir(args)
    rows = [v.as_dict() for v in catalog.scan(storage, args.verify)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no checkpoints in {storage.display_url}")
        return 0
    print(f"{'STEP':>8} {'EPOCH':>5} {'GEN':>4} {'SIZE':>9}  {'CREATED':24} {'VALID':5}  URL / REASON")
    for row in rows:
        epoch = "" if row["epoch"] is None else row["epoch"]
        valid = "yes" if row["valid"] else "NO"
        print(f"{row['step']:>8} {epoch:>5} {row['generation']:>4} {_human(row['size']):>9}  "
              f"{row['created_at'] or '-':24} {valid:5}  {row['url']}")
        if not row["valid"]:
            print(f"{'':>63}  reason: {row['reason']}")
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
    storage = _run_dir(args)
    scored = [(val_loss_of(v.manifest), v) for v in catalog.scan(storage, "sha256") if v.valid]
    scored = [(loss, v) for loss, v in scored if loss is not None]
    if not scored:
        print(f"no valid checkpoint with a validation loss in {storage.display_url}", file=sys.stderr)
        return 1
    loss, best = min(scored, key=lambda pair: (pair[0], -pair[1].ref.step))
    print(best.url)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    target = Storage(args.target, _options(args))
    target.check_reachable()
    if target.exists(mf.MANIFEST) or catalog.parse_name(target.url().rstrip("/").rsplit("/", 1)[-1]):
        parent_url, name = target.url().rstrip("/").rsplit("/", 1)
        parent = Storage(parent_url, _options(args))
        ref = catalog.parse_name(name) or catalog.CheckpointRef(0, -1, name)
        verdicts = [catalog.inspect(parent, ref, "sha256")]
        if ref.step == -1 and verdicts[0].reason and verdicts[0].reason.startswith("manifest step"):
            verdicts[0] = catalog.Verdict(ref, verdicts[0].url, True, None, verdicts[0].manifest, verdicts[0].size)
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
    storage = _run_dir(args)
    newest_valid = catalog.newest_valid(storage, "sha256")
    if newest_valid is None:
        print(f"no valid checkpoint in {storage.display_url}; nothing pruned", file=sys.stderr)
        return 1
    verdicts = {v.ref: v for v in catalog.scan(storage, "size")}
    committed = [ref for ref, v in verdicts.items() if v.valid]
    doomed = [ref for ref in plan(committed, RetentionPolicy(args.keep_last, args.keep_best, args.keep_every),
                                  lambda ref: val_loss_of(verdicts[ref].manifest))
              if ref != newest_valid.ref and ref < newest_valid.ref]
    for ref in doomed:
        if args.dry_run:
            print(f"would delete {storage.url(ref.name)}")
        else:
            delete_checkpoint(storage, ref)
            print(f"deleted {storage.url(ref.name)}")
    kept = len(committed) - len(doomed)
    print(f"{'would keep' if args.dry_run else 'kept'} {kept} checkpoint(s); newest valid: {newest_valid.url}")
    return 0
