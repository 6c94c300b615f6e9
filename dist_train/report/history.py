"""A run's history from `metrics.jsonl` and its checkpoints, as the finished run saw it.

A preempted attempt may have logged steps past its last committed checkpoint;
the attempt that resumed re-did them. Each resume event (`{"event": "resume",
"step": S, "generation": G}`) therefore drops what earlier attempts logged after
step S, and lines of attempts older than G that arrive later (a zombie) are
ignored: the curves show what the surviving attempt computed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from dist_train.checkpoint import catalog
from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.storage import Storage
from dist_train.errors import UserError
from dist_train.training.metrics import METRICS

SPLITS = ("train", "val")


@dataclass
class Resume:
    step: int
    generation: int | None
    from_generation: Any = None


@dataclass
class History:
    points: dict[str, list[dict[str, Any]]]  # split -> records sorted by step
    resumes: list[Resume] = field(default_factory=list)
    generations: list[int] = field(default_factory=list)
    skipped_lines: int = 0

    def series(self, split: str, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric; missing or non-finite values become NaN (a gap in a plot)."""
        steps, values = [], []
        for record in self.points.get(split, []):
            value = record.get(key)
            steps.append(record["step"])
            values.append(float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan)
        return steps, values


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_metrics(text: str) -> History:
    kept: dict[tuple[str, int], dict[str, Any]] = {}
    resumes: list[Resume] = []
    generations: set[int] = set()
    newest_generation = -1
    skipped = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            skipped += 1  # e.g. the last line of an attempt killed mid-write
            continue
        if not isinstance(record, dict) or not _is_step(record.get("step")):
            skipped += 1
            continue
        generation = record.get("generation")
        if isinstance(generation, int):
            if generation < newest_generation:
                continue
            generations.add(generation)
        if record.get("event") == "resume":
            step = record["step"]
            kept = {key: r for key, r in kept.items() if key[1] <= step}
            resumes.append(Resume(step, generation, record.get("from")))
            if isinstance(generation, int):
                newest_generation = max(newest_generation, generation)
        elif record.get("split") in SPLITS:
            kept[(record["split"], record["step"])] = record
    points = {split: sorted((r for (s, _), r in kept.items() if s == split), key=lambda r: r["step"])
              for split in SPLITS}
    return History(points, resumes, sorted(generations), skipped)


def read_history(run_dir: Storage) -> History:
    try:
        data = run_dir.read(METRICS)
    except FileNotFoundError:
        if not _exists(run_dir):
            raise UserError(f"run dir not found: {run_dir.display_url}") from None
        raise UserError(f"no {METRICS} in {run_dir.display_url} (has a run been started there?)") from None
    except Exception as exc:  # noqa: BLE001 - unreachable store, no access
        raise UserError(f"cannot read {run_dir.url(METRICS)}: {describe_error(exc)}") from None
    return parse_metrics(data.decode("utf-8", errors="replace"))


def _exists(storage: Storage) -> bool:
    try:
        return storage.exists("") or bool(storage.list(""))
    except Exception:  # noqa: BLE001
        return False


def committed_checkpoints(run_dir: Storage, level: str = "size") -> tuple[list[catalog.Verdict], int]:
    """The valid checkpoints (oldest first) and how many checkpoint folders there are in all."""
    try:
        verdicts = catalog.scan(run_dir, level)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot list checkpoints of {run_dir.display_url}: {describe_error(exc)}") from None
    return [v for v in verdicts if v.valid], len(verdicts)
