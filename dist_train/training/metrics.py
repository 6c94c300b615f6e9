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
    def __init__(self, storage: Storage | None):
        self.storage = storage
        self._lines: list[str] = []
        self._handle = None
        if storage is None:
            return
        if storage.appendable:
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
