"""Metrics: exact global sums across ranks, and `metrics.jsonl` in the run dir.

Local run dirs get each line appended and flushed at once. Object stores cannot
append, so the file is rewritten from memory at every checkpoint and at close (the
points where the run's state is persisted anyway, and the same in every run of a
job); lines of earlier attempts are read first and kept.

A resumed attempt redoes the steps after its checkpoint that a dead attempt (SIGKILL, a
crash) had already logged. Those lines describe training that the run's state no longer
contains, so on resume they are dropped: every line with a `step` beyond the resumed step
(events such as `resume` stay), the local file rewritten atomically (temporary file, then
rename) before the first new line; the `resume` event counts them (`dropped`). So each
step appears once in metrics.jsonl, as in TensorBoard, and always the values of the
attempt whose state the run continues from.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch

from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.storage import Storage
from dist_train.distributed.env import DistEnv

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"


class MetricSums:
    """Weighted per-sample loss and metric sums, kept on the device; one all-reduce gives global means.

    The metric names come from the task's first scores; ranks agree on them (every rank
    runs the same task), and a rank that saw no sample takes rank 0's names.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] | None = None
        self.sums: torch.Tensor | None = None

    def add(self, losses: torch.Tensor, metrics: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
        if self.names is None:
            self.names = sorted(metrics)
            self.sums = torch.zeros(2 + len(self.names), dtype=torch.float64, device=self.device)
        values = [(losses.detach().float() * weight).sum(), weight.sum()]
        values += [(metrics[name].detach().float() * weight).sum() for name in self.names]
        self.sums += torch.stack(values).double()

    def reduce(self, env: DistEnv, agree_names: bool = False) -> dict[str, float]:
        """Global means {"loss", "count", metric...} over all ranks (collective); resets the sums."""
        if agree_names:
            names = env.broadcast_object(self.names)
            if self.names is None and names is not None:
                self.names = names
                self.sums = torch.zeros(2 + len(names), dtype=torch.float64, device=self.device)
        if self.sums is None:
            return {"loss": math.nan, "count": 0}
        reduced = self.sums.to(env.collective_device)
        if env.distributed:
            torch.distributed.all_reduce(reduced)
        values = reduced.tolist()
        self.sums.zero_()
        count = values[1]
        if not count:
            return {"loss": math.nan, "count": 0}
        out = {"loss": values[0] / count, "count": int(count)}
        out.update({name: value / count for name, value in zip(self.names or [], values[2:])})
        return out


class MetricsLog:
    def __init__(self, storage: Storage | None, resumed_step: int | None = None):
        self.storage = storage
        self._lines: list[str] = []
        self._handle = None
        self.dropped = 0  # lines of steps redone after resume_step, dropped (see the module docstring)
        if storage is None:
            return
        if storage.appendable:
            storage.makedirs("")
            path = storage.local_path(METRICS)
            if resumed_step is not None and os.path.exists(path):
                with open(path, encoding="utf-8") as handle:
                    lines = handle.read().splitlines()
                kept = superseded(lines, resumed_step)
                self.dropped = len(lines) - len(kept)
                if self.dropped:
                    temporary = f"{path}.tmp-{os.getpid()}"
                    with open(temporary, "w", encoding="utf-8") as handle:
                        handle.write("".join(line + "\n" for line in kept))
                        handle.flush()
                        os.fsync(handle.fileno())
                    os.replace(temporary, path)
            self._handle = open(path, "a", encoding="utf-8")
        else:
            try:
                self._lines = storage.read(METRICS).decode().splitlines()
            except FileNotFoundError:
                self._lines = []
            if resumed_step is not None:
                kept = superseded(self._lines, resumed_step)
                self.dropped, self._lines = len(self._lines) - len(kept), kept

    def write(self, record: dict[str, Any]) -> None:
        if self.storage is None:
            return
        line = json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                           for k, v in record.items()})
        if self._handle is not None:
            self._handle.write(line + "\n")
            self._handle.flush()
            return
        self._lines.append(line)

    def flush(self) -> None:
        if self.storage is None or self._handle is not None:
            return
        try:
            self.storage.write_bytes(METRICS, ("\n".join(self._lines) + "\n").encode())
        except Exception as exc:  # noqa: BLE001 - metrics must never stop training
            log.warning("could not write %s: %s", self.storage.url(METRICS), describe_error(exc))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        else:
            self.flush()


def superseded(lines: list[str], resumed_step: int) -> list[str]:
    """The lines a resume at `resumed_step` keeps: all but the records of steps after it."""
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            kept.append(line)  # not ours to judge (a torn last line stays as it was)
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if "event" not in record and isinstance(step, int) and step > resumed_step:
            continue
        kept.append(line)
    return kept
