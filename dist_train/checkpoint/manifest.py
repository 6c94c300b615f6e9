"""The manifest that commits a checkpoint, and the checks that make it trustworthy.

A checkpoint folder is a checkpoint only when `manifest.json` parses and every file
it lists exists with the listed size and sha256 (and, in entries written since chunked
verification, its 4 MiB chunks' sha256s: digest.py). `model_digest` fingerprints the
weights themselves (not the file bytes) so two runs can be compared directly.
"""

from __future__ import annotations

import datetime
import json
import posixpath
import re
from typing import Any, Mapping

import torch

from dist_train.checkpoint import digest as _digest

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MAX_FILE_SIZE = 2**44  # 16 TiB: anything larger is a hostile or corrupt manifest
MAX_FILES = 10_000
_SHA256 = re.compile(r"[0-9a-f]{64}")
REQUIRED = ("format_version", "step", "epoch", "world_size", "created_at", "files", "model_digest")


class ManifestError(ValueError):
    """The manifest is unreadable, incomplete, or points outside its folder."""


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def model_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors sorted by key: key, dtype, shape and raw bytes of each (see digest.py)."""
    return _digest.model_digest(state_dict)


def digest_prefix(key: str, dtype: torch.dtype, shape) -> bytes:
    """What `model_digest` hashes before a tensor's bytes (also used to digest a sharded model streamed)."""
    return _digest.digest_prefix(key, dtype, shape)


def safe_relative_name(name: Any) -> bool:
    """A file name that stays inside the checkpoint folder."""
    if not isinstance(name, str) or not name or len(name) > 255 or "\\" in name or "\0" in name:
        return False
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return False
    normalized = posixpath.normpath(name)
    return normalized == name and not normalized.startswith("..") and normalized != "." \
        and ".." not in name.split("/") and name != MANIFEST


def encode(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def parse(data: bytes) -> dict[str, Any]:
    """Decode and check a manifest's shape; raise ManifestError with the reason."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ManifestError("manifest is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise ManifestError("manifest is not a JSON object")
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise ManifestError("manifest lacks " + ", ".join(missing))
    if manifest["format_version"] != FORMAT_VERSION:
        raise ManifestError(f"unsupported format_version {manifest['format_version']!r}")
    for key in ("step", "epoch", "world_size"):
        if not isinstance(manifest[key], int) or isinstance(manifest[key], bool) or manifest[key] < 0:
            raise ManifestError(f"manifest field {key} is not a non-negative integer")
    if not isinstance(manifest["model_digest"], str) or not _SHA256.fullmatch(manifest["model_digest"]):
        raise ManifestError("manifest model_digest is not a sha256 hex digest")
    files = manifest["files"]
    if not isinstance(files, dict) or not files or len(files) > MAX_FILES:
        raise ManifestError("manifest files must be a non-empty object")
    for name, entry in files.items():
        if not safe_relative_name(name):
            raise ManifestError(f"manifest lists an unsafe file name {name!r}")
        if not isinstance(entry, dict):
            raise ManifestError(f"manifest entry for {name} is not an object")
        size, sha = entry.get("size"), entry.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_SIZE:
            raise ManifestError(f"manifest size of {name} is absurd or missing")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise ManifestError(f"manifest sha256 of {name} is malformed")
        problem = _digest.check_entry(name, entry)
        if problem:
            raise ManifestError(problem)
    return manifest
