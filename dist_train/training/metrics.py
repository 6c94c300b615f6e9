"""Metrics: exact global sums across ranks, and `metrics.jsonl` in the run dir.

Local run dirs get each line appended and flushed at once. Object stores cannot
append, so the file is rewritten from memory at every checkpoint and at close (the
points where the run's state is persisted anyway, and the same in every run of a
job); lines of earlier attempts are read first and kept.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.storage import Storage
from dist_train.distributed.env import DistEnv

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"


@dataclass
class Tally:
    """Summed loss, correct predictions and sample count: all-reduce the sums, then divide."""
    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0

    def add(self, loss_sum: float, correct: float, count: float) -> None:
        self.loss_sum += loss_sum
        self.correct += correct
        self.count += count

    def global_mean(self, env: DistEnv) -> tuple[float, float, int]:
        loss_sum, correct, count = env.all_reduce_sum([self.loss_sum, self.correct, self.count])
        if count == 0:
            return math.nan, math.nan, 0
        return loss_sum / count, correct / count, int(count)


class MetricsLog:
    def __init__(self, storage: Storage | None):
        self.storage = storage
        self._lines: list[str] = []
        self._handle = None
        if storage is None:
            return
        if storage.is_local:
            storage.makedirs("")
            self._handle = open(storage.local_path(METRICS), "a", encoding="utf-8")
        else:
            try:
                self._lines = storage.read(METRICS).decode().splitlines()
            except FileNotFoundError:
                self._lines = []

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
