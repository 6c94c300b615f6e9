"""The data manifest of a packed data set: its schema, written by `pack.py`, checked by `dataset.py`.

A packed data set is a folder (any fsspec URL) holding `manifest.json` and the tar shards
it lists. The manifest is the commit point: written last and atomically, so a folder
without one is not a data set, and a reader trusts no byte it does not list (every shard
is checked against its size and sha256 before a sample of it is used). `kind` tells it
apart from a checkpoint's manifest, which has the same file name.
"""

from __future__ import annotations

import json
import re
from typing import Any

FORMAT_VERSION = 1
KIND = "dist_train.data"
MANIFEST = "manifest.json"
SHARDS = "shards"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


class FormatError(ValueError):
    """The manifest is not one this version can read (the message says why, in one line)."""


class NewerFormat(FormatError):
    """The manifest was written by a newer dist_train."""


def encode(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise FormatError(what)


def parse(data: bytes) -> dict[str, Any]:
    """The manifest as a dict, once every field a reader relies on has been checked."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"not JSON ({exc})") from None
    _need(isinstance(manifest, dict), "not a JSON object")
    _need(manifest.get("kind") == KIND, f"kind is {manifest.get('kind')!r}, not {KIND!r} "
          "(a checkpoint's manifest, or another tool's)")
    version = manifest.get("format_version")
    _need(isinstance(version, int) and not isinstance(version, bool), "format_version is missing")
    if version > FORMAT_VERSION:
        raise NewerFormat(f"format_version {version} is newer than this dist_train reads ({FORMAT_VERSION}); "
                          "upgrade dist_train")
    splits = manifest.get("splits")
    _need(isinstance(splits, dict) and bool(splits), "no splits")
    for name, split in splits.items():
        _need(isinstance(split, dict) and isinstance(split.get("shards"), list), f"split {name!r} has no shards")
        total = 0
        for shard in split["shards"]:
            _need(isinstance(shard, dict), f"split {name!r}: a shard entry is not an object")
            rel = shard.get("name")
            _need(isinstance(rel, str) and bool(_SAFE_NAME.fullmatch(rel)) and ".." not in rel.split("/"),
                  f"split {name!r}: unsafe shard name {rel!r}")
            _need(isinstance(shard.get("size"), int) and shard["size"] > 0, f"shard {rel}: bad size")
            _need(isinstance(shard.get("sha256"), str) and bool(_HEX64.fullmatch(shard["sha256"])),
                  f"shard {rel}: bad sha256")
            _need(isinstance(shard.get("num_samples"), int) and shard["num_samples"] > 0,
                  f"shard {rel}: bad num_samples")
            total += shard["num_samples"]
        _need(split.get("num_samples") == total, f"split {name!r}: num_samples is not the sum of its shards'")
    classes = manifest.get("classes")
    _need(classes is None or (isinstance(classes, list) and all(isinstance(c, str) for c in classes)),
          "classes must be a list of strings or null")
    _need(isinstance(manifest.get("preprocessing", {}), dict), "preprocessing must be an object")
    return manifest
