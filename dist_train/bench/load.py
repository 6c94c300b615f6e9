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

Each side starts with the C heap's free memory handed back (`fresh_heap`), like a resuming
process, and is timed in wall seconds and CPU seconds (all threads): on a machine whose
cores other jobs hold, the CPU seconds say what each side costs.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import struct
import time
import warnings
from typing import Any, Callable

import torch

from dist_train.bench.measure import Figure, alternate, log
from dist_train.bench.workload import build_state
from dist_train.checkpoint.digest import file_entry, hash_threads
from dist_train.checkpoint.serialization import FormatError, SKELETON_KEY, TensorFile, tensor_file, tree_file, unflatten
from dist_train.checkpoint.state import read_payload
from dist_train.checkpoint.storage import Storage


def _sha256(tf: TensorFile) -> str:
    digest = hashlib.sha256()
    for chunk in tf.chunks():
        digest.update(chunk)
    return digest.hexdigest()


def write_checkpoint(folder: Storage, files: dict[str, TensorFile], chunked: bool = True) -> dict[str, Any]:
    """The files written (fsynced) through the storage seam, and a manifest listing them: with chunk
    digests as the writer records them (digest.py), or (`chunked=False`) as versions before them did."""
    folder.makedirs("")
    listed: dict[str, Any] = {}
    for name, tf in files.items():
        folder.write(name, tf.chunks(), tf.size)
        listed[name] = file_entry(tf.chunks()) if chunked else {"size": tf.size, "sha256": _sha256(tf)}
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


def _malloc_trim() -> Callable[[], None]:
    """Hand the C heap's free memory back to the kernel (glibc), or do nothing elsewhere."""
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return lambda: trim(0) and None


_trim = _malloc_trim()


def fresh_heap() -> None:
    """Start a side the way a resuming process starts: no freed tensor memory left to reuse.

    Otherwise whichever side runs after a large free reuses its pages (no page faults, a
    third of torch.load's CPU time here) and the ratio depends on the order of the sides.
    """
    gc.collect()
    _trim()


class _Timed:
    """Wall seconds and CPU seconds (every thread of this process) of a block."""

    def __enter__(self) -> "_Timed":
        fresh_heap()
        self.started, self.cpu_started = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self.cpu_seconds = time.process_time() - self.cpu_started


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
        self.whole_manifest = {"files": {name: {"size": e["size"], "sha256": e["sha256"]}
                                         for name, e in self.manifest["files"].items()}}  # as before chunking
        self.nbytes = sum(entry["size"] for entry in self.manifest["files"].values())
        self.torch_path = os.path.join(self.root, "state.pt")
        torch.save({"model": model, "optimizer": optimizer}, self.torch_path)
        with open(self.torch_path, "rb+") as handle:
            os.fsync(handle.fileno())
        self.torch_bytes = os.path.getsize(self.torch_path)
        largest = max(self.manifest["files"], key=lambda n: self.manifest["files"][n]["size"])
        self.largest = self.folder.read(largest)
        del state, model, optimizer

    def verified(self) -> _Timed:
        with _Timed() as watch:
            payload = read_payload(self.folder, self.manifest, verify_sha=True)
        if not payload.model:
            raise FormatError("benchmark checkpoint read back without its model")
        del payload
        return watch

    def verified_whole(self) -> _Timed:
        """The same read against a manifest without chunk digests (checkpoints of earlier versions)."""
        with _Timed() as watch:
            payload = read_payload(self.folder, self.whole_manifest, verify_sha=True)
        del payload
        return watch

    def torch_load(self) -> _Timed:
        with _Timed() as watch:
            state = torch.load(self.torch_path, weights_only=True)
        del state
        return watch

    def old_path(self) -> _Timed:
        with _Timed() as watch:
            state = old_read_payload(self.folder, self.manifest)
        del state
        return watch

    def hash_floor(self) -> _Timed:
        with _Timed() as watch:
            hashlib.sha256(self.largest).digest()
        return watch

    def run(self) -> list[Figure]:
        sides = {"verified": self.verified, "torch_load": self.torch_load, "old_path": self.old_path,
                 "hash_floor": self.hash_floor, "verified_whole": self.verified_whole}
        log.info("load: warm-up (page cache), then %d repetitions of verified read / torch.load / old read path",
                 self.repeats)
        for side in sides.values():
            side()
        timed = alternate(self.repeats, sides)
        r = {side: [t.seconds for t in runs] for side, runs in timed.items()}
        cpu = {side: [t.cpu_seconds for t in runs] for side, runs in timed.items()}
        raw = {"checkpoint_bytes": self.nbytes, "torch_save_bytes": self.torch_bytes,
               "largest_file_bytes": len(self.largest), "verified_s": r["verified"], "torch_load_s": r["torch_load"],
               "old_path_s": r["old_path"], "hash_floor_s": r["hash_floor"],
               "verified_cpu_s": cpu["verified"], "torch_load_cpu_s": cpu["torch_load"],
               "old_path_cpu_s": cpu["old_path"], "hash_floor_cpu_s": cpu["hash_floor"],
               "cpu_ratio": [a / b for a, b in zip(cpu["verified"], cpu["torch_load"])],
               "verified_MBps": [self.nbytes / s / 1e6 for s in r["verified"]],
               "torch_load_MBps": [self.torch_bytes / s / 1e6 for s in r["torch_load"]],
               "floor_ratio": [h / t for h, t in zip(r["hash_floor"], r["torch_load"])], "cpus": os.cpu_count(),
               "hash_threads": hash_threads(), "verified_whole_s": r["verified_whole"],
               "verified_whole_cpu_s": cpu["verified_whole"],
               "load_ratio_whole_sha256": [a / b for a, b in zip(r["verified_whole"], r["torch_load"])]}
        figure = Figure("load_ratio", "verified checkpoint load (read + size + sha256 + tensors) / "
                        "torch.load(weights_only=True) of the same state", "<= 1.2")
        figure.ratios = [a / b for a, b in zip(r["verified"], r["torch_load"])]
        figure.raw = raw
        figure.notes.append("floor_ratio: sha256 of the largest file alone, one core / torch.load: the floor of "
                            "a manifest without chunk digests (load_ratio_whole_sha256: that load, measured); "
                            "chunk digests verify on hash_threads cores, below that floor")
        figure.notes.append("cpu_ratio: CPU seconds (all threads) of the verified load / of torch.load: the work "
                            "done, steadier than wall time when other processes hold the cores")
        old = Figure("load_ratio_old_path", "the read path before reader.py (read whole, hash, "
                     "safetensors.torch.load) / torch.load(weights_only=True)", "")
        old.ratios = [a / b for a, b in zip(r["old_path"], r["torch_load"])]
        old.raw = {"old_path_s": r["old_path"], "torch_load_s": r["torch_load"],
                   "old_over_verified": [o / v for o, v in zip(r["old_path"], r["verified"])],
                   "old_cpu_over_verified_cpu": [o / v for o, v in zip(cpu["old_path"], cpu["verified"])]}
        return [figure, old]

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class RestoreBench:
    """A hand-written loop's verified restore against DCP's unverified in-place load of the same state.

    The same model + Adam state (`workload.build_state`) is saved once by
    `CheckpointManager.save` and once by `torch.distributed.checkpoint.save`; then, alternating:
    `CheckpointManager.restore` (every byte checked against the manifest's digests, state
    loaded into the live model and optimizer) and `dcp.load` into the same live tensors (no check).
    """

    def __init__(self, work_dir: str, state_bytes: int, repeats: int):
        from dist_train.checkpoint.manager import CheckpointManager
        from dist_train.bench.workload import single_process_env

        self.root = os.path.join(work_dir, "restore")
        self.repeats = repeats
        log.info("restore: building a training state of %.0f MB (Linear layers + Adam)", state_bytes / 2**20)
        self.state = build_state(state_bytes)
        self.live = {"model": self.state.model, "optimizer": self.state.optimizer}
        self.manager = CheckpointManager(os.path.join(self.root, "run"), env=single_process_env())
        self.manager.save(1, self.live)
        self.manager.wait()
        self.dcp_dir = os.path.join(self.root, "dcp")
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():  # "no process group: a single process" is the point here
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(self._dcp_state(), checkpoint_id=self.dcp_dir)
        self.nbytes = self.state.nbytes

    def _dcp_state(self) -> dict[str, Any]:
        return {"model": self.state.model.state_dict(), "optimizer": self.state.optimizer.state_dict()}

    def restore(self) -> _Timed:
        with _Timed() as watch:
            step = self.manager.restore(self.live)
        if step != 1:
            raise RuntimeError(f"benchmark restore found step {step}, expected 1")
        return watch

    def dcp_load(self) -> _Timed:
        import torch.distributed.checkpoint as dcp

        state = self._dcp_state()
        with warnings.catch_warnings(), _Timed() as watch:
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=self.dcp_dir)
        return watch

    def run(self) -> list[Figure]:
        sides = {"restore": self.restore, "dcp_load": self.dcp_load}
        log.info("restore: warm-up, then %d repetitions of CheckpointManager.restore / dcp.load", self.repeats)
        for side in sides.values():
            side()
        timed = alternate(self.repeats, sides)
        r = {side: [t.seconds for t in runs] for side, runs in timed.items()}
        cpu = {side: [t.cpu_seconds for t in runs] for side, runs in timed.items()}
        figure = Figure("restore_vs_dcp", "single-process verified restore of model + Adam via "
                        "CheckpointManager.restore / DCP's unverified in-place dcp.load of the same state", "<= 1.5")
        figure.ratios = [a / b for a, b in zip(r["restore"], r["dcp_load"])]
        figure.raw = {"state_bytes": self.nbytes, "restore_s": r["restore"], "dcp_load_s": r["dcp_load"],
                      "restore_cpu_s": cpu["restore"], "dcp_load_cpu_s": cpu["dcp_load"],
                      "cpu_ratio": [a / b for a, b in zip(cpu["restore"], cpu["dcp_load"])],
                      "hash_threads": hash_threads(), "cpus": os.cpu_count()}
        return [figure]

    def close(self) -> None:
        self.manager.close()
        shutil.rmtree(self.root, ignore_errors=True)


RESTORE_BYTES = 480 * 2**20  # the figure: ~480 MB of model + Adam state (--quick: a quarter)


def run(work_dir: str, state_bytes: int, repeats: int, restore_bytes: int | None = None) -> list[Figure]:
    figures: list[Figure] = []
    bench = LoadBench(work_dir, state_bytes, repeats)
    try:
        figures += bench.run()
    finally:
        bench.close()
    try:
        restore = RestoreBench(work_dir, restore_bytes or state_bytes, repeats)
    except Exception as exc:  # noqa: BLE001 - reported as the figure's error, the load figures stand
        failed = Figure("restore_vs_dcp", "CheckpointManager.restore / dcp.load", "<= 1.5")
        failed.error = f"{type(exc).__name__}: {exc}"
        return figures + [failed]
    try:
        figures += restore.run()
    finally:
        restore.close()
    return figures


__all__ = ["run", "LoadBench", "RestoreBench", "old_read_payload", "write_checkpoint"]
