"""Goodput accounting: the records of all attempts turned into where the wall time went.

Elapsed time runs from the first attempt's start to the last attempt's end (or now,
for a run still going) and is split into categories that sum to it exactly:

- productive: compute of steps whose work survived (the attempt that trained a step
  was not undone: the next attempt resumed from a checkpoint at or after that step,
  or the attempt finished/stopped cleanly with its final save);
- startup: process start to the first step, without the restore;
- restore: finding, reading and verifying the checkpoint;
- checkpoint: training-thread stalls for saves;
- lost_work: steps (with their data waits) that a later attempt redid because the
  attempt that trained them died after its last commit;
- downtime: from an attempt's end to the next attempt's start;
- data_wait: surviving steps' time waiting for the loader;
- other: the rest (validation, the end of an attempt after its last step, ...).

How an attempt ended: its `exit` event's reason; with no exit event, `killed` when a
later attempt exists (the record just stops), else `running`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

CATEGORIES = ("startup", "restore", "checkpoint", "lost_work", "downtime", "data_wait", "other")


@dataclass
class Attempt:
    generation: int
    start: float
    end: float
    ended: str
    world: int | None = None
    resumed_step: int | None = None        # the checkpoint step this attempt restored (None: fresh start)
    restore: tuple[float, float] | None = None
    first_step: float | None = None
    steps: list[list[float]] = field(default_factory=list)   # [step, t0, t1, data_wait]
    stalls: list[tuple[float, float, int]] = field(default_factory=list)
    commits: list[tuple[int, float]] = field(default_factory=list)
    steps_lost: int = 0
    lost_from: float | None = None      # the start of the first lost step (timeline hatching)
    badput: dict[str, float] = field(default_factory=dict)
    productive: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "start": self.start, "end": self.end, "ended": self.ended,
                "steps_trained": len(self.steps), "steps_lost": self.steps_lost, "world_size": self.world,
                "resumed_step": self.resumed_step,
                "last_commit": self.commits[-1][0] if self.commits else None,
                "productive_s": self.productive, "badput_s": dict(self.badput),
                "commits": [[step, t] for step, t in self.commits], "phases": self.phases()}

    def phases(self) -> list[list[Any]]:
        """[phase, t0, t1] spans for a timeline: startup, restore, train, checkpoint, lost (drawn in that order)."""
        out: list[list[Any]] = []
        first = self.first_step if self.first_step is not None else self.end
        if self.restore:
            out.append(["startup", self.start, self.restore[0]])
            out.append(["restore", self.restore[0], self.restore[1]])
            out.append(["startup", self.restore[1], first])
        else:
            out.append(["startup", self.start, first])
        if self.steps:
            out.append(["train", self.steps[0][1], max(row[2] for row in self.steps)])
        out.extend(["checkpoint", t0, t1] for t0, t1, _ in self.stalls)
        if self.lost_from is not None:
            out.append(["lost", self.lost_from, max(row[2] for row in self.steps)])
        return [p for p in out if p[2] > p[1]]


def parse_attempt(generation: int, events: list[dict[str, Any]]) -> Attempt | None:
    start = next((e["t"] for e in events if e["e"] == "start"), None)
    if start is None:
        return None
    attempt = Attempt(generation, float(start), float(start), "running")
    last = float(start)
    for event in events:
        kind = event["e"]
        t = event.get("t")
        if isinstance(t, (int, float)):
            last = max(last, float(t))
        if kind == "start":
            attempt.world = event.get("world")
        elif kind == "restore":
            attempt.restore = (float(event["t0"]), float(event["t1"]))
            attempt.resumed_step = event.get("step")
            last = max(last, float(event["t1"]))
        elif kind == "steps":
            for row in event.get("s", []):
                attempt.steps.append([int(row[0]), float(row[1]), float(row[2]), float(row[3])])
                last = max(last, float(row[2]))
        elif kind == "ckpt":
            attempt.stalls.append((float(event["t0"]), float(event["t1"]), int(event.get("step", -1))))
            last = max(last, float(event["t1"]))
        elif kind == "commit":
            attempt.commits.append((int(event["step"]), float(event["t"])))
        elif kind == "exit":
            attempt.ended = str(event.get("reason", "failed"))
    attempt.steps.sort(key=lambda row: row[1])
    attempt.end = last
    if attempt.steps:
        attempt.first_step = attempt.steps[0][1]
    return attempt


def account(records: dict[int, list[dict[str, Any]]], now: float | None = None) -> dict[str, Any]:
    """The run's goodput from {generation: events}: the contract's keys plus per-attempt detail."""
    attempts = [a for a in (parse_attempt(g, events) for g, events in sorted(records.items())) if a is not None]
    attempts.sort(key=lambda a: (a.start, a.generation))
    for i, attempt in enumerate(attempts):
        if attempt.ended == "running" and i + 1 < len(attempts):
            attempt.ended = "killed"
    if attempts and attempts[-1].ended == "running":
        attempts[-1].end = max(attempts[-1].end, now if now is not None else time.time())
    totals = {name: 0.0 for name in CATEGORIES}
    productive = 0.0
    for i, attempt in enumerate(attempts):
        following = attempts[i + 1] if i + 1 < len(attempts) else None
        badput = _attempt_badput(attempt, following)
        for name, value in badput.items():
            totals[name] += value
        productive += attempt.productive
    elapsed = (attempts[-1].end - attempts[0].start) if attempts else 0.0
    # downtime between attempts; other = what is left, so everything sums to elapsed
    for previous, attempt in zip(attempts, attempts[1:]):
        gap = max(0.0, attempt.start - previous.end)
        previous.badput["downtime"] = gap
        totals["downtime"] += gap
    accounted = productive + sum(totals.values()) - totals["other"]
    totals["other"] = max(0.0, elapsed - accounted)
    if accounted > elapsed:  # overlapping attempts (a zombie beside its successor): never a negative share
        elapsed = accounted
    for attempt in attempts:
        attempt.badput.setdefault("downtime", 0.0)
    return {"elapsed_s": elapsed, "productive_s": productive,
            "goodput": productive / elapsed if elapsed > 0 else 0.0,
            "badput_s": totals, "attempts": [a.as_dict() for a in attempts],
            "intervals": _intervals(records)}


def _attempt_badput(attempt: Attempt, following: Attempt | None) -> dict[str, float]:
    """Fill the attempt's productive time and badput (all but downtime and other)."""
    survived_to = _survived_to(attempt, following)
    restore = (attempt.restore[1] - attempt.restore[0]) if attempt.restore else 0.0
    startup_end = attempt.first_step if attempt.first_step is not None else attempt.end
    startup = max(0.0, startup_end - attempt.start - restore)
    lost = data_wait = productive = 0.0
    for step, t0, t1, wait in attempt.steps:
        length = max(0.0, t1 - t0)
        if survived_to is not None and step > survived_to:
            lost += length
            attempt.steps_lost += 1
            if attempt.lost_from is None:
                attempt.lost_from = t0
        else:
            wait = min(wait, length)
            data_wait += wait
            productive += length - wait
    checkpoint = sum(max(0.0, t1 - t0) for t0, t1, _ in attempt.stalls)
    span = attempt.end - attempt.start
    attempt.productive = productive
    attempt.badput = {"startup": startup, "restore": restore, "checkpoint": checkpoint, "lost_work": lost,
                      "data_wait": data_wait}
    attempt.badput["other"] = max(0.0, span - productive - sum(attempt.badput.values()))
    return {**attempt.badput}


def _survived_to(attempt: Attempt, following: Attempt | None) -> int | None:
    """The last step of this attempt whose work survived; None: all of them."""
    if attempt.ended in ("finished", "preempted", "superseded") and following is None:
        return None
    if following is not None:
        # the next attempt continued from its restored checkpoint: later steps were redone
        return following.resumed_step if following.resumed_step is not None else -1
    if attempt.ended == "running":
        return None  # still going: its steps are not lost (yet)
    return attempt.commits[-1][0] if attempt.commits else (attempt.resumed_step or -1)


def _intervals(records: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The checkpoint-interval decisions of `--checkpoint-every auto`, in order."""
    out = []
    for generation, events in sorted(records.items()):
        out.extend({"generation": generation, **{k: v for k, v in e.items() if k != "e"}}
                   for e in events if e["e"] == "interval")
    return out
