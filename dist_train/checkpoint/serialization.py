"""Checkpoint file format: safetensors for tensors, JSON for everything else. No pickle anywhere.

A nested state (an optimizer's state_dict, RNG states, counters) is split into a
JSON *skeleton* and a flat name -> tensor map. Both go into one safetensors file
(the skeleton in its metadata), so loading a checkpoint can never execute code.

Writing streams the file: the header, then each tensor's bytes straight from its
memory, so a large state is hashed and written without another in-memory copy.

Reading trusts nothing in the file: `parse_layout` checks the header strictly (bounded
length, known dtypes, shapes that fit their byte ranges, tensors contiguous from the
header to the end of the file), then `TensorSink` allocates each tensor once and says
where each byte of the file goes, so `dist_train.checkpoint.reader` can read a file
straight into its tensors while hashing it.
"""

from __future__ import annotations

import bisect
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Iterator

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


# -- reading: a strict parser, since a checkpoint file may be hostile ----------------------

_CODES = {code: dtype for dtype, code in _DTYPES.items()}
MAX_DIMS = 64


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # offsets in the file (not in the data area): [start, end)
    end: int


@dataclass
class Layout:
    """Where each tensor's bytes are in a safetensors file, checked against the file's size.

    The tensors are contiguous and in file order, from the end of the header to the end of
    the file, so every byte of the file belongs to the header or to exactly one tensor.
    """
    header_size: int  # the 8-byte length plus the JSON header: the tensors' bytes start here
    file_size: int
    metadata: dict[str, str]
    entries: list[TensorEntry]


def header_size(prefix: Any, file_size: int) -> int:
    """8 + the header length that the first 8 bytes announce, checked against the file's size."""
    if file_size < 8 or len(prefix) < 8:
        raise FormatError("file too short to be safetensors")
    (length,) = struct.unpack_from("<Q", prefix, 0)
    if not 2 <= length <= min(MAX_HEADER, file_size - 8):
        raise FormatError("safetensors header length is out of range")
    return 8 + length


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, info: Any, data_start: int, data_size: int) -> TensorEntry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise FormatError(f"safetensors entry {name!r} lacks dtype, shape or data_offsets")
    dtype = _CODES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise FormatError(f"safetensors tensor {name!r} has an unknown dtype {str(info['dtype'])[:20]!r}")
    shape = info["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"safetensors tensor {name!r} has a malformed shape")
    offsets = info["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise FormatError(f"safetensors tensor {name!r} has malformed data offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise FormatError(f"safetensors tensor {name!r} lies outside the file")
    if math.prod(shape) * dtype.itemsize != end - begin:
        raise FormatError(f"safetensors tensor {name!r}: its shape and dtype do not fit its byte length")
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def parse_layout(header: Any, file_size: int) -> Layout:
    """The layout of a safetensors file of `file_size` bytes from its first bytes (at least the header).

    Strict: any header that could make a reader allocate more than the file holds, read
    outside it, or read one byte twice is a FormatError.
    """
    size = header_size(header, file_size)
    if len(header) < size:
        raise ValueError("parse_layout needs the whole header")
    try:
        raw = json.loads(bytes(header[8:size]).decode("utf-8"))
    except (ValueError, RecursionError):
        raise FormatError("safetensors header is not JSON") from None
    if not isinstance(raw, dict):
        raise FormatError("safetensors header is not an object")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("safetensors metadata is not a map of strings")
    entries = sorted((_entry(name, info, size, file_size - size) for name, info in raw.items()),
                     key=lambda e: (e.start, e.end))
    cursor = size
    for entry in entries:
        if entry.start != cursor:
            raise FormatError(f"safetensors tensor {entry.name!r} overlaps another or leaves a gap")
        cursor = entry.end
    if cursor != file_size:
        raise FormatError("safetensors data does not end where the file ends")
    return Layout(size, file_size, metadata, entries)


class TensorSink:
    """One fresh CPU tensor per entry of a layout, and the memory each byte range of the data goes to.

    A reader fills the tensors' memory straight from the file (`views`); the tensors are
    independent, writable and aligned for their dtype (each is its own allocation), so
    they can be handed to an optimizer that keeps them.
    """

    def __init__(self, layout: Layout):
        self.layout = layout
        self.tensors: dict[str, torch.Tensor] = {}
        self._starts: list[int] = []
        self._views: list[memoryview] = []
        self._bools: list[torch.Tensor] = []
        for entry in layout.entries:
            if entry.end == entry.start:
                self.tensors[entry.name] = torch.empty(entry.shape, dtype=entry.dtype)
                continue
            raw = torch.empty(entry.end - entry.start, dtype=torch.uint8)
            self.tensors[entry.name] = raw.view(entry.dtype).view(entry.shape)
            self._starts.append(entry.start)
            self._views.append(memoryview(raw.numpy()))
            if entry.dtype == torch.bool:
                self._bools.append(raw)

    def views(self, start: int, end: int) -> list[memoryview]:
        """The destination memory of file bytes [start, end), in order (within the data area)."""
        out = []
        index = bisect.bisect_right(self._starts, start) - 1
        while start < end:
            view, begin = self._views[index], self._starts[index]
            piece = view[start - begin:min(len(view), end - begin)]
            out.append(piece)
            start += len(piece)
            index += 1
        return out

    def finish(self) -> dict[str, torch.Tensor]:
        """The tensors, once every byte was filled in (a bool byte other than 0 or 1 is refused)."""
        for raw in self._bools:
            if bool(raw.gt(1).any()):
                raise FormatError("safetensors bool tensor holds a value other than 0 or 1")
        return self.tensors


def _parse_bytes(data: Any) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    layout = parse_layout(view, len(view))
    sink = TensorSink(layout)
    position = layout.header_size
    for dest in sink.views(layout.header_size, layout.file_size):
        dest[:] = view[position:position + len(dest)]
        position += len(dest)
    return layout.metadata, sink.finish()


def read_metadata(data: Any) -> dict[str, str]:
    """The metadata of safetensors bytes (the whole header is checked, no tensor is made)."""
    view = memoryview(data)
    return parse_layout(view, len(view)).metadata


def load_tensors(data: Any) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into tensors (one copy each); never executes anything from the file."""
    return _parse_bytes(data)[1]


def tree_from(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> Any:
    """The nested state a file's skeleton describes, over its tensors."""
    if SKELETON_KEY not in metadata:
        raise FormatError("file carries no state skeleton")
    try:
        skeleton = json.loads(metadata[SKELETON_KEY])
    except (ValueError, RecursionError):
        raise FormatError("state skeleton is not JSON") from None
    return unflatten(skeleton, tensors)


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
    except (TypeError, ValueError, KeyError, RecursionError) as exc:
        raise FormatError(f"malformed checkpoint skeleton ({str(exc)[:200]})") from None


def tree_file(tree: Any) -> TensorFile:
    skeleton, tensors = flatten(tree)
    return tensor_file(tensors, {SKELETON_KEY: json.dumps(skeleton)})


def load_tree(data: Any) -> Any:
    return tree_from(*_parse_bytes(data))
