"""Training-loop figures from real torchrun jobs, alternated in one run.

Four jobs per repetition, all on the same compute-bound workload (synthetic images,
the same model, per-rank batch, optimizer and one thread per rank):

- `dist-train train`, 2 ranks                         (A)
- the minimal DDP loop `baselines/ddp_loop.py`, 2 ranks (B)   trainer_overhead = A / B (step time)
- `dist-train train`, 1 rank                          (C)   ddp_scaling = C / A (= 2-rank throughput / 2 x 1-rank)
- `dist-train train`, 2 ranks, async checkpoint every K (D)   checkpoint_overhead = D / A

K is chosen from the first A job: the largest divisor of the measured steps at which a
sync save (its time taken from A's final, synchronous, save) would cost >= 10% of the
wall time, so the checkpoints are as frequent as the overhead claim needs.
"""

from __future__ import annotations

import math
import os
import shutil

from dist_train.bench.jobs import Timing, Workload, run_baseline, run_dist_train
from dist_train.bench.measure import Figure, alternate, log, median

SYNC_COST = 0.10


def choose_every(save_seconds: float, step_seconds: float, measured_steps: int) -> int:
    """The largest K dividing `measured_steps` with save / (K x step) >= SYNC_COST (at least 1)."""
    limit = max(1, math.floor(save_seconds / (SYNC_COST * step_seconds)))
    return max(k for k in range(1, measured_steps + 1) if measured_steps % k == 0 and k <= limit)


class TrainingBench:
    def __init__(self, work_dir: str, workload: Workload, repeats: int, shared: dict | None = None):
        self.shared = shared if shared is not None else {}
        self.root = os.path.join(work_dir, "training")
        os.makedirs(self.root, exist_ok=True)
        self.w = workload
        self.repeats = repeats
        self.every: int | None = None
        self.calibration: Timing | None = None
        self._count = 0

    def _run_dir(self, name: str) -> str:
        self._count += 1
        return os.path.join(self.root, f"{name}-{self._count}")

    def _dist_train(self, world: int, extra: list[str] | None = None, name: str = "dt", keep: bool = False) -> Timing:
        run_dir = self._run_dir(name)
        try:
            return run_dist_train(self.w, run_dir, world, extra)
        finally:
            if keep:
                self.shared["checkpointed_run"] = run_dir  # its final checkpoint is what the resume family resumes
            else:
                shutil.rmtree(run_dir, ignore_errors=True)

    def two_ranks(self) -> Timing:
        timing = self._dist_train(2, name="dt2", keep="checkpointed_run" not in self.shared)
        if self.every is None:
            self.calibration = timing
            save = timing.save_seconds or 0.0
            self.every = choose_every(save, timing.step_seconds, self.w.measure)
            log.info("  sync save %.3fs, step %.3fs: checkpoint every %d steps (a sync save would cost %.0f%%)",
                     save, timing.step_seconds, self.every, 100 * save / (self.every * timing.step_seconds))
        return timing

    def baseline(self) -> Timing:
        return run_baseline(self.w, 2)

    def one_rank(self) -> Timing:
        return self._dist_train(1, name="dt1")

    def checkpointing(self) -> Timing:
        assert self.every is not None
        return self._dist_train(2, ["--checkpoint-every", str(self.every), "--async-checkpoint"], name="ckpt")

    def run(self) -> list[Figure]:
        log.info("training: %d repetitions of 4 torchrun jobs (%s, %s per rank, %d+%d steps)", self.repeats,
                 self.w.model, self.w.batch, self.w.warmup, self.w.measure)
        r = alternate(self.repeats, {"dist_train_2": self.two_ranks, "baseline_2": self.baseline,
                                     "dist_train_1": self.one_rank, "checkpoint_every_k": self.checkpointing})
        a, b, c, d = r["dist_train_2"], r["baseline_2"], r["dist_train_1"], r["checkpoint_every_k"]
        workload = self.w.as_dict()

        overhead = Figure("trainer_overhead", "step time / minimal DDP loop step time",
                          "<= 1.03")
        overhead.ratios = [x.step_seconds / y.step_seconds for x, y in zip(a, b)]
        overhead.raw = {"dist_train_step_s": [x.step_seconds for x in a],
                        "baseline_step_s": [y.step_seconds for y in b], "workload": workload,
                        "dist_train_window_step_s": [x.window_seconds for x in a],
                        "baseline_window_step_s": [y.window_seconds for y in b]}

        scaling = Figure("ddp_scaling", "2-rank throughput / 2 x 1-rank throughput", ">= 0.85")
        scaling.ratios = [one.step_seconds / two.step_seconds for one, two in zip(c, a)]
        scaling.raw = {"one_rank_step_s": [x.step_seconds for x in c], "two_rank_step_s": [x.step_seconds for x in a],
                       "one_rank_samples_per_s": [self.w.batch / x.step_seconds for x in c],
                       "two_rank_samples_per_s": [2 * self.w.batch / x.step_seconds for x in a],
                       "workload": workload}

        every = self.every or 1
        save = (self.calibration.save_seconds if self.calibration else None) or 0.0
        ckpt = Figure("checkpoint_overhead", f"step time, async checkpoint every {every} steps / none", "<= 1.035")
        ckpt.ratios = [x.step_seconds / y.step_seconds for x, y in zip(d, a)]
        ckpt.raw = {"every_k_steps": every, "sync_save_s": save,
                    "sync_save_cost_at_k": save / (every * median([x.step_seconds for x in a])),
                    "with_checkpoints_step_s": [x.step_seconds for x in d],
                    "without_step_s": [x.step_seconds for x in a],
                    "async_save_s_last": [x.save_seconds for x in d], "saves_per_job": [x.saves for x in d],
                    "workload": workload}
        return [overhead, scaling, ckpt]


def run(work_dir: str, workload: Workload, repeats: int, shared: dict | None = None) -> list[Figure]:
    """The training figures; with `shared`, one 2-rank run dir is kept there for the resume benchmark."""
    bench = TrainingBench(work_dir, workload, repeats, shared)
    try:
        return bench.run()
    finally:
        for name in os.listdir(bench.root):
            path = os.path.join(bench.root, name)
            if path != bench.shared.get("checkpointed_run"):
                shutil.rmtree(path, ignore_errors=True)
