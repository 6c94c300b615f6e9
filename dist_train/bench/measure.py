"""Ratios measured side by side: alternate A and B, repeat, report the median and the spread.

On a shared machine absolute seconds drift from minute to minute; a ratio of two
things measured back to back, in alternating order (A B, B A, A B ...), cancels most
of that drift. Every figure keeps the raw numbers it was computed from.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("dist_train.bench")


@dataclass
class Figure:
    """One benchmark result: per-repetition ratios plus the raw measurements behind them."""
    key: str
    what: str
    target: str  # e.g. "<= 0.05"; "" for a figure reported for information
    ratios: list[float] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def defined(self) -> list[float]:
        """The repetitions whose ratio is defined (a zero denominator, e.g. no time lost, is not)."""
        return [r for r in self.ratios if math.isfinite(r)]

    @property
    def value(self) -> float | None:
        return statistics.median(self.defined) if self.defined else None

    @property
    def met(self) -> bool | None:
        if self.value is None or not self.target:
            return None
        op, bound = self.target.split()
        return self.value <= float(bound) if op == "<=" else self.value >= float(bound)

    def as_dict(self) -> dict[str, Any]:
        ratios = self.defined
        return {"value": _round(self.value), "what": self.what, "target": self.target, "met": self.met,
                "median": _round(self.value), "min": _round(min(ratios)) if ratios else None,
                "max": _round(max(ratios)) if ratios else None, "repeats": len(ratios),
                "ratios": [_round(r) for r in ratios], "raw": _round_tree(self.raw), "notes": self.notes,
                "error": self.error}


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _round_tree(tree: Any) -> Any:
    if isinstance(tree, float):
        return round(tree, 6)
    if isinstance(tree, dict):
        return {k: _round_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_round_tree(v) for v in tree]
    return tree


def alternate(repeats: int, sides: dict[str, Callable[[], Any]]) -> dict[str, list[Any]]:
    """Run each side once per repetition, reversing the order every other repetition (A B, B A, ...).

    Returns each side's results in repetition order, so results[i] of every side were
    measured within the same few seconds.
    """
    names = list(sides)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for rep in range(repeats):
        order = names if rep % 2 == 0 else list(reversed(names))
        for name in order:
            results[name].append(sides[name]())
        log.info("  repetition %d/%d done", rep + 1, repeats)
    return results


class Stopwatch:
    """`with Stopwatch() as w: ...` then `w.seconds`."""

    def __enter__(self) -> "Stopwatch":
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
