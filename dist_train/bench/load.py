"""Checkpoint loading: dist_train's verified read against `torch.load(weights_only=True)`.

The same training state (weights + Adam moments, `workload.build_state`) is saved twice
on the same disk: as a dist_train checkpoint folder (the three safetensors files and a
manifest of their sizes and sha256) and with `torch.save` as one file. Then, alternating,
on a warm page cache:

- verified: `state.read_payload` as resume calls it: every file read, its size and sha256
  checked, every tensor built (`dist_train/checkpoint/reader.py`);
- torch_load: `torch.load(path, weights_only=True)` of the same weights and Adam state;
- old_path: the read path before reader.py, kept here as a baseline: each file read whole
  into bytes, hashed in a second pass, then parsed by `safetensors.torch.load` (a copy of
  every tensor), one file after the other;
- hash_floor: sha256 of the largest file's bytes from memory. sha256 is sequential, so no
  verified load can beat it: it is the floor of `verified` on any number of cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from typing import Any

import torch

from dist_train.bench.measure import Figure, Stopwatch, alternate, log
from dist_train.bench.workload import build_state
from dist_train.checkpoint.serialization import FormatError, SKELETON_KEY, TensorFile, tensor_file, tree_file, unflatten
from dist_train.checkpoint.state import read_payload
from dist_train.checkpoint.storage import Storage


def write_checkpoint(folder: Storage, files: dict[str, TensorFile]) -> dict[str, Any]:
    """The files written (fsynced) through the storage seam, and a manifest listing them."""
    folder.makedirs("")
    listed: dict[str, Any] = {}
    for name, tf in files.items():
        digest = hashlib.sha256()

        def hashed(tf: TensorFile = tf, digest: Any = digest):
            for chunk in tf.chunks():
                digest.update(chunk)
                yield chunk
        folder.write(name, hashed(), tf.size)
        listed[name] = {"size": tf.size, "sha256": digest.hexdigest()}
    manifest = {"files": listed}
    folder.write_bytes("manifest.json", json.dumps(manifest).encode())
    return manifest


def old_read_payload(folder: Storage, manifest: dict[str, Any]) -> dict[str, Any]:
    """The read path before reader.py: read whole, hash in a second pass, then copy out each tensor."""
    import safetensors.torch

    out: dict[str, Any] = {}
    for name, entry in manifest["files"].items():
        data = folder.read(name)
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise RuntimeError(f"benchmark checkpoint file {name} does not verify")
        (length,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8:8 + length]).get("__metadata__") or {}
        tensors = safetensors.torch.load(data)
        if SKELETON_KEY in metadata:
            out[name] = unflatten(json.loads(metadata[SKELETON_KEY]), tensors)
        else:
            out[name] = tensors
    return out


class LoadBench:
    def __init__(self, work_dir: str, state_bytes: int, repeats: int):
        self.root = os.path.join(work_dir, "load")
        self.repeats = repeats
        log.info("load: building a training state of %.0f MB (Linear layers + Adam)", state_bytes / 2**20)
        state = build_state(state_bytes)
        model, optimizer = state.model.state_dict(), state.optimizer.state_dict()
        trainer = {"progress": {"step": 1, "epoch": 0}, "sampler": {"epoch": 0, "position": 0}, "rng": []}
        self.folder = Storage(os.path.join(self.root, "ckpt"))
        self.manifest = write_checkpoint(self.folder, {"model.safetensors": tensor_file(model, {"format": "pt"}),
                                                      "optimizer.safetensors": tree_file(optimizer),
                                                      "trainer.safetensors": tree_file(trainer)})
        self.nbytes = sum(entry["size"] for entry in self.manifest["files"].values())
        self.torch_path = os.path.join(self.root, "state.pt")
        torch.save({"model": model, "optimizer": optimizer}, self.torch_path)
        with open(self.torch_path, "rb+") as handle:
            os.fsync(handle.fileno())
        self.torch_bytes = os.path.getsize(self.torch_path)
        largest = max(self.manifest["files"], key=lambda n: self.manifest["files"][n]["size"])
        self.largest = self.folder.read(largest)
        del state, model, optimizer

    def verified(self) -> float:
        with Stopwatch() as watch:
            payload = read_payload(self.folder, self.manifest, verify_sha=True)
        if not payload.model:
            raise FormatError("benchmark checkpoint read back without its model")
        del payload
        return watch.seconds

    def torch_load(self) -> float:
        with Stopwatch() as watch:
            state = torch.load(self.torch_path, weights_only=True)
        del state
        return watch.seconds

    def old_path(self) -> float:
        with Stopwatch() as watch:
            state = old_read_payload(self.folder, self.manifest)
        del state
        return watch.seconds

    def hash_floor(self) -> float:
        with Stopwatch() as watch:
            hashlib.sha256(self.largest).digest()
        return watch.seconds

    def run(self) -> list[Figure]:
        sides = {"verified": self.verified, "torch_load": self.torch_load, "old_path": self.old_path,
                 "hash_floor": self.hash_floor}
        log.info("load: warm-up (page cache), then %d repetitions of verified read / torch.load / old read path",
                 self.repeats)
        for side in sides.values():
            side()
        r = alternate(self.repeats, sides)
        raw = {"checkpoint_bytes": self.nbytes, "torch_save_bytes": self.torch_bytes,
               "largest_file_bytes": len(self.largest), "verified_s": r["verified"], "torch_load_s": r["torch_load"],
               "old_path_s": r["old_path"], "hash_floor_s": r["hash_floor"],
               "verified_MBps": [self.nbytes / s / 1e6 for s in r["verified"]],
               "torch_load_MBps": [self.torch_bytes / s / 1e6 for s in r["torch_load"]],
               "floor_ratio": [h / t for h, t in zip(r["hash_floor"], r["torch_load"])], "cpus": os.cpu_count()}
        figure = Figure("load_ratio", "verified checkpoint load (read + size + sha256 + tensors) / "
                        "torch.load(weights_only=True) of the same state", "<= 1.2")
        figure.ratios = [a / b for a, b in zip(r["verified"], r["torch_load"])]
        figure.raw = raw
        figure.notes.append("floor_ratio: sha256 of the largest file alone / torch.load; sha256 is sequential, "
                            "so the verified load cannot go below it")
        old = Figure("load_ratio_old_path", "the read path before reader.py (read whole, hash, "
                     "safetensors.torch.load) / torch.load(weights_only=True)", "")
        old.ratios = [a / b for a, b in zip(r["old_path"], r["torch_load"])]
        old.raw = {"old_path_s": r["old_path"], "torch_load_s": r["torch_load"],
                   "old_over_verified": [o / v for o, v in zip(r["old_path"], r["verified"])]}
        return [figure, old]

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def run(work_dir: str, state_bytes: int, repeats: int) -> list[Figure]:
    bench = LoadBench(work_dir, state_bytes, repeats)
    try:
        return bench.run()
    finally:
        bench.close()


__all__ = ["run", "LoadBench", "old_read_payload", "write_checkpoint"]
