"""An async checkpoint writer in a separate process: the measured alternative to the writer thread.

The training process copies the state into shared-memory buffers (made once) and
sends the step number; the child process serializes, hashes and commits with the
same `CheckpointWriter`. Nothing of the child can hold the training process's GIL,
but the copy must happen in the training thread (the child cannot read the parent's
private memory). Only the benchmark uses it, to answer "thread or process?".
"""

from __future__ import annotations

import time
from typing import Any

import torch

from dist_train.bench.workload import TrainingState
from dist_train.determinism import capture_rng_state


def _shared_like(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return torch.empty_like(tree, device="cpu").share_memory_()
    if isinstance(tree, dict):
        return {k: _shared_like(v) for k, v in tree.items()}
    return tree


def _copy_into(dst: Any, src: Any) -> None:
    if isinstance(src, torch.Tensor):
        dst.copy_(src.detach())
    elif isinstance(src, dict):
        for key, value in src.items():
            _copy_into(dst[key], value)


def _serve(conn, run_dir: str, model: dict, optimizer_state: dict) -> None:
    from dist_train.checkpoint.manifest import model_digest
    from dist_train.checkpoint.state import Snapshot
    from dist_train.checkpoint.storage import Storage
    from dist_train.checkpoint.writer import CheckpointWriter

    torch.set_num_threads(1)
    storage = Storage(run_dir)
    storage.makedirs("")
    writer = CheckpointWriter(storage, 1, "bench-process-writer", None)
    conn.send("ready")
    while True:
        message = conn.recv()
        if message is None:
            break
        step, param_groups, trainer, fields = message
        started = time.perf_counter()
        try:
            snap = Snapshot(step, {"model": model, "optimizer": {"state": optimizer_state, "param_groups": param_groups},
                                  "trainer": trainer}, fields)
            fields = dict(fields, model_digest=model_digest(snap.model))
            writer.commit(step, snap.files(), fields)
            conn.send(("ok", time.perf_counter() - started))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
            conn.send(("error", repr(exc)))


class ProcessWriter:
    """Saves of `state` committed by a child process; `save` returns once the state is handed over."""

    def __init__(self, state: TrainingState, run_dir: str):
        ctx = torch.multiprocessing.get_context("spawn")
        self.state = state
        self.model = _shared_like(state.model.state_dict())
        self.optimizer_state = _shared_like(state.optimizer.state_dict()["state"])
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, run_dir, self.model, self.optimizer_state),
                                   daemon=True)
        self.process.start()
        if not self.conn.poll(120) or self.conn.recv() != "ready":
            raise RuntimeError("process writer did not start")
        self.in_flight = False
        self.stall_seconds = 0.0
        self.write_seconds: list[float] = []

    def save(self, step: int) -> None:
        started = time.perf_counter()
        self.wait()
        rng = [capture_rng_state()]
        _copy_into(self.model, self.state.model.state_dict())
        optimizer = self.state.optimizer.state_dict()
        _copy_into(self.optimizer_state, optimizer["state"])
        trainer = {"progress": {"step": step, "epoch": 0}, "sampler": {"epoch": 0, "position": 0}, "rng": rng}
        fields = {"epoch": 0, "world_size": 1, "model": {"name": "bench-linear"}}
        self.conn.send((step, optimizer["param_groups"], trainer, fields))
        self.in_flight = True
        self.stall_seconds += time.perf_counter() - started

    def poll(self) -> bool:
        """True while a save is still being written."""
        if self.in_flight and self.conn.poll():
            self._receive()
        return self.in_flight

    def wait(self) -> None:
        if self.in_flight:
            self._receive()

    def _receive(self) -> None:
        status, detail = self.conn.recv()
        self.in_flight = False
        if status != "ok":
            raise RuntimeError(f"process writer failed: {detail}")
        self.write_seconds.append(detail)

    def close(self) -> None:
        try:
            self.wait()
            self.conn.send(None)
        finally:
            self.process.join(30)
            if self.process.is_alive():
                self.process.kill()
