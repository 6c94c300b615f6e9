"""Local checkpoint I/O: the stall of an async save, and sync-save throughput against raw writes.

All three are measured in one alternation per repetition, on the same state, into the
same folder, each into fresh files that are deleted right after:

- sync save: `Checkpointer.save` without `--async-checkpoint` (serialize, sha256, model
  digest, manifest, fsync, rename, fsync of the run dir);
- async save: the same `Checkpointer` in async mode inside a real training loop of the
  workload model; its stall is what the training thread spent blocked (in `save()` and
  waiting for the snapshot before the next optimizer update);
- raw write: `os.write` of the same number of bytes from memory plus one `fsync`.

A second alternation compares the writer thread with a writer process (`process_writer`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dist_train.bench.measure import Figure, Stopwatch, alternate, log, median
from dist_train.bench.workload import WIDTH, TrainingState, build_state, clear_dir, make_checkpointer
from dist_train.checkpoint.saver import Checkpointer
from dist_train.checkpoint.state import SnapshotBuffers

RAW_CHUNK = 16 * 2**20
BATCH = 32  # samples per step of the workload model: its steps are compute-bound
MAX_STEPS_PER_SAVE = 400


class StepLoop:
    """Real training steps of the workload model: forward, backward, (fence), Adam update."""

    def __init__(self, state: TrainingState, batch: int = BATCH):
        self.state = state
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(batch, WIDTH, generator=generator)
        self.targets = torch.randn(batch, WIDTH, generator=generator)

    def step(self, checkpointer: Checkpointer | None = None) -> float:
        with Stopwatch() as watch:
            loss = F.mse_loss(self.state.model(self.inputs), self.targets)
            loss.backward()
            if checkpointer is not None:
                checkpointer.wait_snapshot()  # what Trainer._optimizer_step does
            self.state.optimizer.step()
            self.state.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
        return watch.seconds

    def base_step_seconds(self, steps: int = 3) -> float:
        return median([self.step() for _ in range(steps)])


@dataclass
class AsyncResult:
    stall: float  # training thread blocked by the save
    lost: float  # extra wall time of the steps that ran while the save was written, stall included
    steps: int  # steps that overlapped the write
    base_step: float


class CheckpointBench:
    def __init__(self, work_dir: str, state_bytes: int, repeats: int):
        self.root = os.path.join(work_dir, "checkpoint_io")
        os.makedirs(self.root, exist_ok=True)
        self.repeats = repeats
        log.info("building a training state of %.0f MB (Linear layers + Adam)", state_bytes / 2**20)
        self.state = build_state(state_bytes)
        self.loop = StepLoop(self.state)
        self.sync = make_checkpointer(os.path.join(self.root, "sync"), async_mode=False)
        self.async_ = make_checkpointer(os.path.join(self.root, "async"), async_mode=True)
        self.buffers = SnapshotBuffers()
        self.raw_dir = os.path.join(self.root, "raw")
        os.makedirs(self.raw_dir, exist_ok=True)
        self._source: memoryview | None = None
        self.saved_bytes = 0

    # -- the three sides --------------------------------------------------------------------

    def sync_save(self) -> float:
        before = self.sync.stall_seconds
        self.state.step += 1
        self.sync.save(self.state.step, self.state.snapshot_fn(), "bench")
        seconds = self.sync.stall_seconds - before
        self._check(self.sync)
        files = self.sync.last_committed.manifest["files"]
        self.saved_bytes = sum(entry["size"] for entry in files.values())
        clear_dir(self.sync.storage.root)
        return seconds

    def async_save(self) -> AsyncResult:
        ck = self.async_

        def save(step: int) -> None:
            ck.save(step, self.state.snapshot_fn(self.buffers), "bench")

        result = self._in_loop(save, lambda: ck.writing, lambda: ck.stall_seconds, ck)
        ck.wait_written()
        self._check(ck)
        clear_dir(ck.storage.root)
        return result

    def _in_loop(self, save, writing, stall_of, checkpointer) -> AsyncResult:
        loop = self.loop
        base = loop.base_step_seconds()
        stall_before = stall_of()
        started = time.perf_counter()
        self.state.step += 1
        save(self.state.step)
        steps = 0
        while writing() and steps < MAX_STEPS_PER_SAVE:
            loop.step(checkpointer)
            steps += 1
        elapsed = time.perf_counter() - started
        return AsyncResult(stall_of() - stall_before, max(0.0, elapsed - steps * base), steps, base)

    def raw_write(self) -> float:
        nbytes = self.saved_bytes or self.state.nbytes
        if self._source is None or len(self._source) != nbytes:
            data = torch.empty(nbytes, dtype=torch.uint8)
            data.random_(0, 256, generator=torch.Generator().manual_seed(1))
            self._source = memoryview(data.numpy())
        path = os.path.join(self.raw_dir, f"raw-{time.monotonic_ns()}.bin")
        with Stopwatch() as watch:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for start in range(0, nbytes, RAW_CHUNK):
                    view = self._source[start:start + RAW_CHUNK]
                    while view:
                        view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        os.unlink(path)
        return watch.seconds

    @staticmethod
    def _check(ck: Checkpointer) -> None:
        if ck.consecutive_failures or ck.last_committed is None:
            raise RuntimeError("a benchmark save failed (see the log above)")

    # -- figures --------------------------------------------------------------------------------

    def run(self) -> tuple[Figure, Figure]:
        log.info("checkpoint I/O: warm-up (first saves allocate buffers and page cache)")
        self.sync_save()
        self.async_save()
        self.raw_write()
        log.info("checkpoint I/O: %d repetitions of sync save / async save in a training loop / raw write",
                 self.repeats)
        results = alternate(self.repeats, {"sync": self.sync_save, "async": self.async_save, "raw": self.raw_write})
        sync, asyncs, raw = results["sync"], results["async"], results["raw"]
        nbytes = self.saved_bytes
        stall = Figure("stall_ratio", "async-save stall / sync save time", "<= 0.05")
        stall.ratios = [a.stall / s for a, s in zip(asyncs, sync)]
        stall.raw = {"state_bytes": nbytes, "sync_save_s": sync, "async_stall_s": [a.stall for a in asyncs],
                     "async_time_lost_s": [a.lost for a in asyncs],
                     "steps_during_write": [a.steps for a in asyncs],
                     "base_step_s": [a.base_step for a in asyncs],
                     "time_lost_over_sync": [a.lost / s for a, s in zip(asyncs, sync)],
                     "batch": BATCH, "torch_threads": torch.get_num_threads()}
        stall.notes.append("stall: training thread blocked in save() plus waiting for the snapshot copy before "
                           "the next optimizer update; time_lost_over_sync also counts the slowdown of the steps "
                           "that ran while the background write competed for the CPU")
        eff = Figure("save_efficiency", "raw write+fsync time / sync save time", ">= 0.80")
        eff.ratios = [r / s for r, s in zip(raw, sync)]
        eff.raw = {"bytes": nbytes, "sync_save_s": sync, "raw_write_fsync_s": raw,
                   "sync_MBps": [nbytes / s / 1e6 for s in sync], "raw_MBps": [nbytes / r / 1e6 for r in raw]}
        return stall, eff

    def thread_vs_process(self) -> Figure:
        """The same async save, written by the checkpointer's thread or by a child process."""
        from dist_train.bench.process_writer import ProcessWriter

        writer = ProcessWriter(self.state, os.path.join(self.root, "process"))
        try:
            def by_process() -> AsyncResult:
                result = self._in_loop(writer.save, writer.poll, lambda: writer.stall_seconds, None)
                writer.wait()
                clear_dir(os.path.join(self.root, "process"))
                return result

            log.info("checkpoint I/O: writer thread vs writer process, %d repetitions", self.repeats)
            by_process()  # warm-up
            results = alternate(self.repeats, {"thread": self.async_save, "process": by_process})
        finally:
            writer.close()
        thread, process = results["thread"], results["process"]
        figure = Figure("async_thread_vs_process", "training time lost to an async save: writer "
                        "process / writer thread", "")
        figure.ratios = [p.lost / t.lost if t.lost > 0 else float("nan") for p, t in zip(process, thread)]
        figure.raw = {"thread_stall_s": [t.stall for t in thread], "process_stall_s": [p.stall for p in process],
                      "thread_time_lost_s": [t.lost for t in thread],
                      "process_time_lost_s": [p.lost for p in process],
                      "thread_steps_during_write": [t.steps for t in thread],
                      "process_steps_during_write": [p.steps for p in process]}
        return figure

    def close(self) -> None:
        self.async_.finish()
        clear_dir(self.root)


def run(work_dir: str, state_bytes: int, repeats: int, compare_process: bool = True) -> list[Figure]:
    bench = CheckpointBench(work_dir, state_bytes, repeats)
    try:
        figures = list(bench.run())
        if compare_process:
            try:
                figures.append(bench.thread_vs_process())
            except Exception as exc:  # noqa: BLE001 - an optional comparison must not sink the rest
                figure = Figure("async_thread_vs_process", "writer process / writer thread", "")
                figure.error = repr(exc)
                figures.append(figure)
        return figures
    finally:
        bench.close()


__all__ = ["run", "CheckpointBench", "StepLoop"]
