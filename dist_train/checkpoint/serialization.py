"""Checkpoint file format: safetensors for tensors, JSON for everything else. No pickle anywhere.

A nested state (an optimizer's state_dict, RNG states, counters) is split into a
JSON *skeleton* and a flat name -> tensor map. Both go into one safetensors file
(the skeleton in its metadata), so loading a checkpoint can never execute code.

Writing streams the file: the header, then each tensor's bytes straight from its
memory, so a large state is hashed and written without another in-memory copy.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Iterator

import safetensors.torch
import torch

SKELETON_KEY = "dist_train.skeleton"
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
MAX_HEADER = 100 * 2**20


class FormatError(ValueError):
    """The bytes are not a checkpoint file we wrote (or they were damaged)."""


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without copying (it must already be contiguous on the CPU)."""
    if tensor.numel() == 0:
        return memoryview(b"")
    flat = tensor.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.dtype != torch.uint8 else memoryview(flat.numpy())


@dataclass
class TensorFile:
    """A safetensors file ready to stream: its exact size is known before writing."""
    header: bytes
    tensors: list[torch.Tensor]

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.numel() * t.element_size() for t in self.tensors)

    def chunks(self, chunk_size: int = 16 * 2**20) -> Iterator[memoryview]:
        yield memoryview(self.header)
        for tensor in self.tensors:
            view = _raw_bytes(tensor)
            for start in range(0, len(view), chunk_size):
                yield view[start:start + chunk_size]


def tensor_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> TensorFile:
    """Lay out a safetensors file (sorted by name) over the given CPU tensors."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    ordered = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            tensor = tensor.detach().to("cpu").contiguous()
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"tensor {name}: dtype {tensor.dtype} cannot be stored")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        ordered.append(tensor)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return TensorFile(struct.pack("<Q", len(encoded)) + encoded, ordered)


def read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise FormatError("file too short to be safetensors")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(MAX_HEADER, len(data) - 8):
        raise FormatError("safetensors header length is out of range")
    try:
        header = json.loads(data[8:8 + length])
    except ValueError:
        raise FormatError("safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise FormatError("safetensors header is not an object")
    return header.get("__metadata__") or {}


def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into tensors; never executes anything from the file."""
    read_metadata(data)
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure means a damaged or foreign file
        raise FormatError(f"not a valid safetensors file ({exc})") from None


# -- nested state <-> (skeleton, tensors) -------------------------------------------------

def flatten(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into a JSON-able skeleton and the tensors it references."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = node
            return {"__tensor__": name}
        if isinstance(node, dict):
            return {"__dict__": [[walk_key(k), walk(v)] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {"__tuple__": [walk(v) for v in node]}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store a {type(node).__name__} in a checkpoint")

    def walk_key(key: Any) -> Any:
        if isinstance(key, (str, int)) and not isinstance(key, bool):
            return key
        raise TypeError(f"cannot store a dict key of type {type(key).__name__}")

    return walk(tree), tensors


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "__tensor__" in node:
                name = node["__tensor__"]
                if name not in tensors:
                    raise FormatError(f"skeleton references missing tensor {name!r}")
                return tensors[name]
            if "__dict__" in node:
                return {key: walk(value) for key, value in node["__dict__"]}
            if "__tuple__" in node:
                return tuple(walk(v) for v in node["__tuple__"])
            raise FormatError("unknown node in checkpoint skeleton")
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    try:
        return walk(skeleton)
    except (TypeError, ValueError, KeyError) as exc:
        raise FormatError(f"malformed checkpoint skeleton ({exc})") from None


def tree_file(tree: Any) -> TensorFile:
    skeleton, tensors = flatten(tree)
    return tensor_file(tensors, {SKELETON_KEY: json.dumps(skeleton)})


def load_tree(data: bytes) -> Any:
    metadata = read_metadata(data)
    if SKELETON_KEY not in metadata:
        raise FormatError("file carries no state skeleton")
    try:
        skeleton = json.loads(metadata[SKELETON_KEY])
    except ValueError:
        raise FormatError("state skeleton is not JSON") from None
    return unflatten(skeleton, load_tensors(data))
