"""`dist-train ckpt convert`: one plain safetensors file of a checkpoint's model, from any layout.

The output is what `model.safetensors` of a rank-0 checkpoint is: the full tensors under
their state_dict names, `{"format": "pt"}` metadata, loadable by `safetensors.torch.load_file`
or any safetensors reader. It is streamed: the header first (every shape is known from
the index), then one full tensor at a time, assembled from its pieces; memory is one
tensor plus one piece, whatever the model's size. The model digest is computed on the
way and must equal the manifest's, or the output is removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from dist_train.checkpoint import catalog
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.index import build_index, full_tensor, verify_share
from dist_train.checkpoint.serialization import _DTYPES, _raw_bytes
from dist_train.checkpoint.storage import Storage
from dist_train.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Converted:
    url: str
    tensors: int
    size: int
    model_digest: str


def _split_url(url: str) -> tuple[str, str]:
    url = url.rstrip("/")
    if "/" not in url:
        return ".", url
    parent, name = url.rsplit("/", 1)
    return parent or "/", name


def convert(checkpoint_url: str, out_url: str, storage_options: dict | None = None,
            verify_sha: bool = True) -> Converted:
    """Consolidate the model of the checkpoint at `checkpoint_url` into the file `out_url`."""
    folder = Storage(checkpoint_url, storage_options)
    try:
        manifest = catalog.read_manifest(folder)
    except mf.ManifestError as exc:
        raise UserError(f"{folder.display_url} is not a valid checkpoint: {exc}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read checkpoint {folder.display_url}: {exc}") from None
    index = build_index(folder, manifest, entries=("model",))
    if verify_sha:
        problem = verify_share(folder, manifest, names=index.files)
        if problem:
            raise UserError(f"{folder.display_url} is not a valid checkpoint: {problem}")
    keys = index.keys("model")
    if not keys:
        raise UserError(f"{folder.display_url} holds no model tensors")

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in keys:
        info = index.tensors[key]
        nbytes = _nbytes(info.shape, info.dtype)
        header[key[len("model."):]] = {"dtype": _DTYPES[info.dtype], "shape": list(info.shape),
                                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    head = struct.pack("<Q", len(encoded)) + encoded
    size = len(head) + offset
    digest = hashlib.sha256()

    def chunks() -> Iterator[memoryview | bytes]:
        yield head
        for key in keys:
            tensor = full_tensor(index, key)
            digest.update(mf.digest_prefix(key[len("model."):], tensor.dtype, tensor.shape))
            view = _raw_bytes(tensor)
            digest.update(view)
            yield view

    parent_url, name = _split_url(out_url)
    parent = Storage(parent_url, storage_options)
    if parent.exists(name):
        raise UserError(f"{parent.url(name)} exists already; choose another --out")
    target = parent.stage(name, uuid.uuid4().hex[:8])  # locally a hidden sibling, renamed once it checks out
    parent.makedirs("")
    try:
        parent.write(target, chunks(), size)
        if digest.hexdigest() != manifest["model_digest"]:
            raise UserError(f"{folder.display_url}: the consolidated weights do not match the manifest's "
                            "model_digest")
    except BaseException:
        try:
            parent.discard_staged(target)
        except Exception as exc:  # noqa: BLE001 - the original error matters more
            log.warning("could not remove %s: %s", parent.url(target), exc)
        raise
    parent.publish(target, name)  # removes the staged copy itself if this fails
    return Converted(parent.url(name), len(keys), size, digest.hexdigest())


def _nbytes(shape: tuple[int, ...], dtype) -> int:
    import torch

    out = torch.empty((), dtype=dtype).element_size()
    for dim in shape:
        out *= dim
    return out
