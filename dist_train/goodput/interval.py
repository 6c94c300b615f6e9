"""When to checkpoint: `--checkpoint-every N | DURATION | auto`.

`auto` uses Young's first-order optimum (Young 1974; Daly 2006 refines it for large
costs): interval = sqrt(2 * C * MTBF), where C is the checkpoint's cost to the training
thread and MTBF the mean time between interruptions. Assumptions: interruptions arrive
as a Poisson process (exponential gaps) independent of the job, C << MTBF, and restart
costs do not depend on the interval. C is measured as the run goes (an EWMA of the
training thread's stall per save; with async saves the stall plus the slow-down of the
steps that ran while the save was written), MTBF comes from `--mtbf` or the run dir's
attempt history (interruptions over run time, with a prior of one interruption per
hour for a new run). The interval is re-evaluated after every save, bounded by
`--checkpoint-every-min/-max`, and turned into steps with the measured step time.

Every rank must save at the same step: only rank 0 decides, and its decision travels
with the step-boundary vote the trainer casts anyway (distributed/vote.py), so all
ranks see it at the same boundary. Fixed step counts stay a pure function of the step
(`--deterministic` resume bit-exact).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any

PRIOR_MTBF_S = 3600.0    # a new run: one interruption an hour, until its own history says otherwise
PRIOR_COST_S = 1.0       # before the first save is measured
EWMA = 0.5               # weight of the newest measurement
CHANGE = 0.1             # relative change of the interval that is logged and recorded

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")


def parse_duration(text: Any) -> float | None:
    """Seconds of "90s", "10m", "2h", "1.5d"; None when it is not a duration."""
    match = _DURATION.match(str(text).lower())
    return float(match.group(1)) * _UNITS[match.group(2)] if match else None


@dataclass(frozen=True)
class Every:
    """A parsed interval: `steps` or `seconds` (one of them), or `auto`."""
    steps: int | None = None
    seconds: float | None = None
    auto: bool = False


def parse_every(value: Any) -> Every:
    """`N`, a duration, or auto; ValueError with what is accepted."""
    text = str(value).strip().lower()
    if text == "auto":
        return Every(auto=True)
    if re.fullmatch(r"\d+", text):
        if int(text) <= 0:
            raise ValueError("must be > 0 (steps), a duration such as 10m, or auto")
        return Every(steps=int(text))
    seconds = parse_duration(text)
    if seconds is None:
        raise ValueError("must be a number of steps, a duration (90s, 10m, 2h) or auto")
    if seconds <= 0:
        raise ValueError("must be a duration > 0")
    return Every(seconds=seconds)


def check_every(value: Any) -> str | None:
    try:
        parse_every(value)
    except ValueError as exc:
        return str(exc)
    return None


def check_bound(value: Any) -> str | None:
    try:
        every = parse_every(value)
    except ValueError:
        return "must be a number of steps or a duration (90s, 10m, 2h)"
    return "must be a number of steps or a duration, not auto" if every.auto else None


def check_mtbf(value: Any) -> str | None:
    seconds = parse_duration(value)
    return None if seconds is not None and seconds > 0 else "must be a duration > 0 (90s, 10m, 2h)"


def young_daly(cost_s: float, mtbf_s: float) -> float:
    """The interval (seconds of training) that maximises expected goodput, to first order."""
    return math.sqrt(2.0 * max(cost_s, 0.0) * max(mtbf_s, 0.0))


def mtbf_from_history(report: dict[str, Any] | None) -> tuple[float, str]:
    """(MTBF seconds, where it came from) from a goodput report of the earlier attempts."""
    if not report or not report.get("attempts"):
        return PRIOR_MTBF_S, "prior"
    interruptions = sum(1 for a in report["attempts"] if a["ended"] in ("killed", "preempted", "failed"))
    # the prior counts as one hour without... one interruption: a few attempts cannot swing it to zero
    return (report["elapsed_s"] + PRIOR_MTBF_S) / (interruptions + 1), "history"


class Schedule:
    """Rank 0's answer to "save at this step?" (pure function of the step for a fixed step count)."""

    def __init__(self, every: Every | None, mtbf_s: float | None = None, mtbf_source: str = "flag",
                 low: Every | None = None, high: Every | None = None):
        self.every, self.low, self.high = every, low, high
        self.mtbf_s, self.mtbf_source = mtbf_s or PRIOR_MTBF_S, mtbf_source if mtbf_s else "prior"
        self.step_time: float | None = None
        self.cost: float | None = None
        self.interval_s: float | None = every.seconds if every and every.seconds else None
        self.last_save = time.time()
        self.last_save_step = 0
        self.changes: list[dict[str, Any]] = []

    @property
    def timed(self) -> bool:
        """Whether saves depend on measurements (then rank 0 decides and the vote carries it)."""
        return self.every is not None and self.every.steps is None

    def fixed_due(self, step: int) -> bool:
        return self.every is not None and self.every.steps is not None and step % self.every.steps == 0

    def observe_step(self, seconds: float) -> None:
        if seconds > 0:
            self.step_time = seconds if self.step_time is None else (1 - EWMA / 5) * self.step_time + EWMA / 5 * seconds

    def observe_save(self, step: int, cost_s: float) -> dict[str, Any] | None:
        """A save of `step` cost the training thread `cost_s`: re-evaluate; the change record if it moved."""
        self.last_save, self.last_save_step = time.time(), step
        if not (self.every and self.every.auto):
            return None
        self.cost = cost_s if self.cost is None else (1 - EWMA) * self.cost + EWMA * cost_s
        return self._evaluate(step)

    def _evaluate(self, step: int) -> dict[str, Any] | None:
        cost = self.cost if self.cost is not None else PRIOR_COST_S
        raw = young_daly(cost, self.mtbf_s)
        interval = min(max(raw, self._seconds(self.low, 0.0)), self._seconds(self.high, math.inf))
        previous = self.interval_s
        self.interval_s = interval
        if previous is not None and abs(interval - previous) <= CHANGE * previous:
            return None
        record = {"step": step, "interval_s": interval, "interval_steps": self.steps_of(interval),
                  "young_daly_s": raw, "cost_s": cost, "mtbf_s": self.mtbf_s, "mtbf_source": self.mtbf_source,
                  "step_time_s": self.step_time,
                  "min_s": self._seconds(self.low, None), "max_s": self._seconds(self.high, None)}
        self.changes.append(record)
        return record

    def start(self, step: int) -> dict[str, Any] | None:
        """The first decision (auto), once a step time has been measured."""
        self.last_save, self.last_save_step = time.time(), step
        return self._evaluate(step) if self.every and self.every.auto else None

    def steps_of(self, seconds: float) -> int | None:
        if self.step_time is None or self.step_time <= 0:
            return None
        return max(1, round(seconds / self.step_time))

    def _seconds(self, bound: Every | None, default):
        if bound is None:
            return default
        if bound.seconds is not None:
            return bound.seconds
        if self.step_time is None:
            return default
        return bound.steps * self.step_time

    def timed_due(self, step: int) -> bool:
        """Rank 0: has the chosen interval passed since the last save? (by steps when the step time is known)"""
        if not self.timed or self.interval_s is None:
            return False
        steps = self.steps_of(self.interval_s)
        if steps is not None:
            return step - self.last_save_step >= steps
        return time.time() - self.last_save >= self.interval_s


def make_schedule(cfg, storage=None, generation: int | None = None) -> Schedule:
    """The attempt's schedule from the checkpoint config; MTBF from `--mtbf`, else (rank 0, `storage` given)
    the run dir's earlier attempts, else the prior."""
    every = parse_every(cfg.checkpoint_every) if cfg.checkpoint_every is not None else None
    low = parse_every(cfg.checkpoint_every_min) if cfg.checkpoint_every_min else None
    high = parse_every(cfg.checkpoint_every_max) if cfg.checkpoint_every_max else None
    mtbf, source = (parse_duration(cfg.mtbf), "flag") if cfg.mtbf else (None, "prior")
    if mtbf is None and every is not None and every.auto and storage is not None:
        from dist_train.goodput.accounting import account
        from dist_train.goodput.events import read_records
        try:
            records = {g: e for g, e in read_records(storage).items() if generation is None or g < generation}
            mtbf, source = mtbf_from_history(account(records) if records else None)
        except Exception:  # noqa: BLE001 - an unreadable history: the prior
            mtbf, source = None, "prior"
    return Schedule(every, mtbf, source, low, high)
