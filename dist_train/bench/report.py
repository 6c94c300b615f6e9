"""The benchmark's output: a table for people, JSON for machines, and what machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from typing import Any

from dist_train.bench.measure import Figure


def machine_info(work_dir: str) -> dict[str, Any]:
    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            memory = int(next(line.split()[1] for line in handle if line.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration, ValueError):
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu or platform.processor(), "memory_bytes": memory,
            "disk": _disk(work_dir), "load_average": _load(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _disk(path: str) -> dict[str, Any]:
    info: dict[str, Any] = {"path": path}
    usage = shutil.disk_usage(path)
    info["free_bytes"] = usage.free
    try:
        out = subprocess.run(["df", "-PT", path], capture_output=True, text=True, timeout=10).stdout.splitlines()
        fields = out[-1].split()
        info.update({"device": fields[0], "fstype": fields[1]})
        name = os.path.basename(os.path.realpath(fields[0])).rstrip("0123456789")
        rotational = f"/sys/block/{name}/queue/rotational"
        if os.path.exists(rotational):
            with open(rotational, encoding="utf-8") as handle:
                info["rotational"] = handle.read().strip() == "1"
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return info


def to_json(figures: list[Figure], meta: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {figure.key: figure.as_dict() for figure in figures}
    out["meta"] = meta
    return out


def write_json(path: str, data: dict[str, Any]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.write("\n")


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"


def table(figures: list[Figure]) -> str:
    """A Markdown table: value is the median over repetitions, spread is min..max."""
    rows = [("figure", "value", "spread (min..max)", "reps", "target", "met", "what")]
    for figure in figures:
        d = figure.as_dict()
        if figure.error:
            rows.append((figure.key, "error", "-", "0", figure.target, "-", figure.error.splitlines()[0][:80]))
            continue
        met = {True: "yes", False: "NO", None: "-"}[d["met"]]
        rows.append((figure.key, _fmt(d["value"]), f"{_fmt(d['min'])}..{_fmt(d['max'])}", str(d["repeats"]),
                     figure.target, met, figure.what))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
