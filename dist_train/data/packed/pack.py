"""Writing a packed data set: shards first, the data manifest last, as a checkpoint is committed.

Shard names carry this pack's attempt id (`shards/<split>-<attempt>-<n>.tar`), so a pack
that was killed leaves only shards no manifest lists: the folder does not open as a data
set, and the next run writes its own shards beside them and removes the orphans once its
manifest is committed. The manifest commit is the storage's `create_whole`, the checkpoint
writer's primitive: locally a staging file fsynced and renamed into place, on a store one
conditional create (`If-None-Match: *` on S3). Beside each shard a small index object (`.idx.json`) lists
its samples' keys and byte ranges, for tools that read single samples with ranged GETs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
import uuid
from typing import Any

from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.storage import STAGING_PREFIX, Storage
from dist_train.data.packed import format as fmt
from dist_train.data.packed import shards as sh
from dist_train.data.packed.sources import Source
from dist_train.errors import UserError

log = logging.getLogger(__name__)
_SIZE = re.compile(r"\s*(\d+)\s*(B|KiB|MiB|GiB|TiB)?\s*", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, what: str = "--shard-size") -> int:
    """`67108864`, `64MiB`, `512KiB`, `1GiB` -> bytes; UserError for anything else or zero."""
    match = _SIZE.fullmatch(str(text))
    if not match or int(match.group(1)) <= 0:
        raise UserError(f"{what} {text!r}: a positive size in bytes or with KiB/MiB/GiB, e.g. 64MiB")
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _UNITS[unit]


def _tool_version() -> str:
    try:
        from importlib.metadata import version
        return version("dist_train")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def check_target(storage: Storage, overwrite: bool) -> bool:
    """Refuse an --out that holds a data set (unless --overwrite) or anything else; True when a data set
    is there (to be replaced)."""
    try:
        storage.check_reachable()
    except UserError as exc:
        raise UserError(str(exc).replace("run dir ", "--out ", 1)) from None
    try:
        raw = storage.read(fmt.MANIFEST)
    except FileNotFoundError:
        raw = None
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"--out {storage.display_url}: cannot read it ({describe_error(exc)})") from None
    if raw is not None:
        try:
            fmt.parse(raw)
        except fmt.FormatError:
            raise UserError(f"--out {storage.display_url} holds a manifest.json that is not a data set's "
                            "(a checkpoint?): choose another location") from None
        if not overwrite:
            raise UserError(f"--out {storage.display_url} already holds a packed data set; "
                            "pass --overwrite to replace it")
        return True
    strangers = [e.name for e in storage.list("") if e.name != fmt.SHARDS and not e.name.startswith(STAGING_PREFIX)]
    if strangers:
        raise UserError(f"--out {storage.display_url} is not empty and not a packed data set "
                        f"(it holds {strangers[0]!r}): choose an empty location")
    return False


def _member_bytes(members: dict[str, bytes]) -> int:
    return sum(512 + -(-len(data) // 512) * 512 for data in members.values())


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="sample", desc="packing")

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def pack(source: Source, out: str, shard_size: int, *, storage_options: dict[str, Any] | None = None,
         overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Write `source` to `out` as shards and a data manifest; returns the manifest."""
    storage = Storage(out, storage_options)
    replacing = check_target(storage, overwrite)
    existed = storage.exists("")
    attempt = uuid.uuid4().hex[:8]
    bar = _Progress(sum(s.count for s in source.splits.values()), progress)
    splits: dict[str, Any] = {}
    written: list[str] = []
    try:
        for split_name, samples in source.splits.items():
            entries: list[dict[str, Any]] = []
            builder = sh.ShardBuilder()
            for i in range(samples.count):
                members = samples.members(i)
                if builder.num_samples and builder.size + _member_bytes(members) > shard_size:
                    entries.append(_write_shard(storage, builder, split_name, attempt, len(entries), written))
                    builder = sh.ShardBuilder()
                builder.add(f"{i:0{sh.KEY_DIGITS}d}", members)
                bar.update()
            if builder.num_samples:
                entries.append(_write_shard(storage, builder, split_name, attempt, len(entries), written))
            splits[split_name] = {"num_samples": samples.count, "shards": entries}
    except BaseException:
        _discard(storage, written, remove_root=not existed)  # a bad sample found mid-way: leave nothing behind
        raise
    finally:
        bar.close()
    preprocessing = source.preprocessing.finish() if hasattr(source.preprocessing, "finish") \
        else dict(source.preprocessing)
    manifest = {"kind": fmt.KIND, "format_version": fmt.FORMAT_VERSION, "splits": splits,
                "classes": source.classes, "preprocessing": preprocessing, "source": source.description,
                "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "tool": {"name": "dist_train", "version": _tool_version()}, "attempt": attempt}
    fmt.parse(fmt.encode(manifest))  # one schema, checked on write: never commit what a reader would refuse
    _commit(storage, manifest, attempt, replacing)
    _remove_orphans(storage, manifest)
    return manifest


def _discard(storage: Storage, names: list[str], remove_root: bool) -> None:
    for name in names:
        try:
            storage.delete(name)
        except Exception as exc:  # noqa: BLE001 - an orphan is ignored by readers; the next pack removes it
            log.warning("could not remove %s: %s", storage.url(name), describe_error(exc))
    for folder in [fmt.SHARDS] + ([""] if remove_root else []):  # folders this pack made, if left empty
        try:
            storage.remove_empty_folder(folder)
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            log.warning("could not remove %s: %s", storage.url(folder), describe_error(exc))


def _write_shard(storage: Storage, builder: sh.ShardBuilder, split: str, attempt: str, n: int,
                 written: list[str]) -> dict[str, Any]:
    data = builder.finish()
    name = f"{fmt.SHARDS}/{split}-{attempt}-{n:05d}.tar"
    written += [name, name + ".idx.json"]
    storage.write(name, [data], len(data))
    index = json.dumps({"keys": builder.keys, "offsets": builder.offsets}, separators=(",", ":")).encode()
    storage.write_bytes(name + ".idx.json", index)
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "num_samples": builder.num_samples, "index": name + ".idx.json",
            "index_sha256": hashlib.sha256(index).hexdigest()}


def _commit(storage: Storage, manifest: dict[str, Any], attempt: str, replacing: bool) -> None:
    data = fmt.encode(manifest)
    if replacing:
        storage.delete(fmt.MANIFEST)  # from here until the new one lands, the folder is no data set
    if not storage.create_whole(fmt.MANIFEST, data, attempt):
        try:
            ours = storage.read(fmt.MANIFEST) == data  # a retried create whose first answer was lost
        except FileNotFoundError:
            ours = False
        if not ours:
            raise UserError(f"--out {storage.display_url}: another pack committed a data set there first")


def _remove_orphans(storage: Storage, manifest: dict[str, Any]) -> None:
    """Shards of killed or replaced packs: no manifest lists them. Best effort, never fatal."""
    listed = {s["name"].rsplit("/", 1)[-1] for split in manifest["splits"].values() for s in split["shards"]}
    listed |= {s["index"].rsplit("/", 1)[-1] for split in manifest["splits"].values() for s in split["shards"]}
    try:
        for entry in storage.list(fmt.SHARDS):
            if entry.name not in listed:
                storage.delete(f"{fmt.SHARDS}/{entry.name}")
        for entry in storage.list(""):
            if entry.name.startswith(STAGING_PREFIX):
                storage.delete(entry.name)
    except Exception as exc:  # noqa: BLE001 - orphans are ignored by readers; a later pack removes them
        log.warning("could not remove leftovers of earlier packs in %s: %s", storage.display_url,
                    describe_error(exc))
