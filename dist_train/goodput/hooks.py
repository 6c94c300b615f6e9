"""What the training loop tells goodput: step timings, save stalls, commits, the end of the attempt.

One object per attempt on every rank; only rank 0 has a recorder (the record is the
run's, not a rank's) and decides timed saves (see interval.py: the decision travels
with the step-boundary vote).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from dist_train.goodput.events import GoodputRecorder
from dist_train.goodput.interval import Schedule

log = logging.getLogger(__name__)


class GoodputHooks:
    def __init__(self, schedule: Schedule, recorder: GoodputRecorder | None = None, metrics=None):
        self.schedule = schedule
        self.recorder = recorder
        self.metrics = metrics          # MetricsLog (rank 0): interval changes are recorded there too
        self._requested = False         # rank 0 asked the vote for a timed save not yet taken
        self._pending: tuple[int, float, float] | None = None   # async save: (step, stall, excess so far)
        self._started = False
        self.exited = False

    # -- steps ----------------------------------------------------------------------------------

    def step(self, step: int, t0: float, t1: float, data_wait: float, committed_step: int | None) -> None:
        seconds = t1 - t0
        if self._pending is not None:
            saved, stall, excess = self._pending
            if self.schedule.step_time is not None:
                excess += max(0.0, seconds - self.schedule.step_time)   # slowed down by the save in flight
            if committed_step is not None and committed_step >= saved:
                self._pending = None
                self._changed(self.schedule.observe_save(saved, stall + excess))
            else:
                self._pending = (saved, stall, excess)
        else:
            self.schedule.observe_step(seconds)
        if not self._started and self.schedule.step_time is not None:
            self._started = True
            self._changed(self.schedule.start(step))
        if self.recorder is not None:
            self.recorder.step(step, t0, t1, data_wait)

    # -- saves ------------------------------------------------------------------------------------

    def fixed_due(self, step: int) -> bool:
        return self.schedule.fixed_due(step)

    def vote_flag(self, step: int, is_rank0: bool) -> int:
        """Rank 0's timed-save request for this boundary (once per save: the vote answers one boundary later)."""
        if not is_rank0 or self._requested or not self.schedule.timed_due(step):
            return 0
        self._requested = True
        return 1

    def saved(self, step: int, t0: float, t1: float, reason: str, asynchronous: bool, committed: bool) -> None:
        self._requested = False
        if self.recorder is not None:
            self.recorder.event("ckpt", step=step, t0=t0, t1=t1, reason=reason)
        stall = t1 - t0
        if asynchronous and not committed:
            self._pending = (step, stall, 0.0)
        else:
            self._changed(self.schedule.observe_save(step, stall))

    def committed(self, step: int) -> None:
        if self.recorder is not None:
            self.recorder.event("commit", step=step)

    def _changed(self, record: dict[str, Any] | None) -> None:
        if record is None or self.recorder is None:
            return
        steps = record["interval_steps"]
        log.info("checkpoint interval %.1fs%s: sqrt(2 x cost %.3fs x MTBF %.0fs (%s)) = %.1fs, bounds [%s, %s]",
                 record["interval_s"], f" (~{steps} steps)" if steps else "", record["cost_s"], record["mtbf_s"],
                 record["mtbf_source"], record["young_daly_s"], _shown(record["min_s"]), _shown(record["max_s"]))
        self.recorder.event("interval", **record)
        if self.metrics is not None:
            self.metrics.write({"event": "checkpoint_interval", "time": time.time(), **record})

    # -- the end ----------------------------------------------------------------------------------

    def notice(self) -> None:
        if self.recorder is not None:
            self.recorder.event("notice")

    def exit(self, reason: str) -> None:
        if self.recorder is not None and not self.exited:
            self.exited = True
            self.recorder.close(reason)

    def flush(self) -> None:
        if self.recorder is not None:
            self.recorder.flush()


def _shown(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def publish(hooks: GoodputHooks | None, tracker, step: int) -> None:
    """TensorBoard (`--tensorboard`): the run's goodput so far, under goodput/ (rank 0, at the attempt's end)."""
    if hooks is None or hooks.recorder is None or tracker is None:
        return
    from dist_train.goodput.accounting import account
    from dist_train.goodput.events import read_records
    try:
        hooks.recorder.flush()
        report = account(read_records(hooks.recorder.storage))
    except Exception as exc:  # noqa: BLE001 - reporting must never stop training
        log.warning("could not compute goodput for TensorBoard: %s", exc)
        return
    scalars = {"goodput": report["goodput"], "elapsed_s": report["elapsed_s"],
               "productive_s": report["productive_s"], **{f"badput_{k}_s": v for k, v in report["badput_s"].items()}}
    tracker.log(step, scalars, "goodput")
