"""Packed data sets: tar shards in the WebDataset layout plus a data manifest, in any fsspec store.

`dist-train data pack` writes them (`pack.py`); `open_packed(url)` reads them, verified
against the manifest, with a node-local cache (`dataset.py`, `cache.py`). The format is
described in docs/data.md.
"""

from dist_train.data.packed.dataset import PackedDataset, PackedSplit, ShardError, is_packed_url, open_packed

__all__ = ["open_packed", "PackedDataset", "PackedSplit", "ShardError", "is_packed_url"]
