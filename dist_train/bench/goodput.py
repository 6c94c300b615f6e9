"""`dist-train bench --only goodput`: goodput under seeded SIGKILLs, `auto` against a sweep of fixed intervals.

A real 2-rank torchrun job trains a fixed number of steps; the bench SIGKILLs the launcher
and its workers at seeded exponential times (mean `mtbf`; the same gaps, counted from
each attempt's first step so that start-up times, which vary with the machine's load, do
not move them, for every configuration) and restarts it until it finishes.
For each configuration: the run's goodput from `dist-train report --json`. Figures:

- `auto_vs_best_fixed`: goodput of `--checkpoint-every auto --mtbf <mtbf>` over the
  best fixed interval's (target >= 0.97);
- `lost_work_accuracy`: the lost work the accounting reports for the killed attempts
  over the lost work the bench measures itself (its kill time minus the newest
  commit before it, from the manifest's file time), target within 10% (0.9..1.1).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from dist_train.bench.jobs import job_env, torchrun
from dist_train.bench.measure import Figure, log


@dataclass
class GoodputSettings:
    steps: int
    mtbf_s: float
    fixed: tuple[int, ...]
    width: int = 1024
    batch: int = 32
    seed: int = 2024
    max_attempts: int = 30


SIZES = {"tiny": GoodputSettings(60, 8.0, (20,), width=64, max_attempts=6),
         "quick": GoodputSettings(1000, 20.0, (20, 80, 320)),
         "full": GoodputSettings(3000, 60.0, (25, 100, 250, 500, 1000, 2000))}


def kill_gaps(settings: GoodputSettings) -> list[float]:
    rng = random.Random(settings.seed)
    return [rng.expovariate(1.0 / settings.mtbf_s) for _ in range(settings.max_attempts)]


def _command(run_dir: str, settings: GoodputSettings, every: str) -> list[str]:
    flags = ["-m", "dist_train", "train", "--run-dir", run_dir, "--dataset", "synthetic",
             "--synthetic-size", "4096", "--synthetic-shape", "3,16,16", "--synthetic-classes", "10",
             "--val-fraction", "0", "--test-fraction", "0", "--model", "mlp", "--width", str(settings.width),
             "--batch-size", str(settings.batch), "--epochs", "1000", "--max-steps", str(settings.steps),
             "--log-every", "50", "--no-progress", "--checkpoint-every", every]
    if every == "auto":
        flags += ["--mtbf", f"{settings.mtbf_s:g}s"]
    return torchrun(2, flags)


def kill_tree(pid: int) -> None:
    """SIGKILL the launcher and every process below it at once, like losing the node (torchrun puts its
    workers in sessions of their own, and they stop gracefully when only their agent dies)."""
    found, stack = [pid], [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children", encoding="ascii") as handle:
                    children = [int(c) for c in handle.read().split()]
            except OSError:
                continue
            found += children
            stack += children
    for target in found:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _training(run_dir: str) -> bool:
    """Has the newest attempt trained a step? (its goodput record has a `steps` event)"""
    folder = os.path.join(run_dir, "_goodput")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if not names:
        return False
    with open(os.path.join(folder, names[-1]), encoding="utf-8") as handle:
        return '"e": "steps"' in handle.read()


def _wait_training(proc: subprocess.Popen, run_dir: str, gap: float) -> int:
    """The job's exit status if it ends within `gap` seconds of training (counted from its first step, so
    start-up times, which vary with the machine's load, do not move the kills); else TimeoutExpired."""
    before = set(os.listdir(os.path.join(run_dir, "_goodput"))) if os.path.isdir(os.path.join(run_dir, "_goodput")) \
        else set()
    while proc.poll() is None:
        folder = os.path.join(run_dir, "_goodput")
        if os.path.isdir(folder) and set(os.listdir(folder)) - before and _training(run_dir):
            return proc.wait(timeout=gap)
        time.sleep(0.05)
    return proc.returncode


def _newest_commit_time(run_dir: str) -> float | None:
    times = []
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        path = os.path.join(run_dir, name, "manifest.json")
        if name.startswith("ckpt-") and os.path.exists(path):
            times.append(os.path.getmtime(path))
    return max(times, default=None)


def run_configuration(work_dir: str, settings: GoodputSettings, every: str) -> dict:
    """Train to the end under the seeded kills; the report and the bench's own lost-work measurements."""
    run_dir = os.path.join(work_dir, f"goodput-{every}")
    gaps = kill_gaps(settings)
    measured: dict[int, float] = {}  # attempt number (1-based) -> kill time minus newest commit
    for attempt, gap in enumerate(gaps, start=1):
        started = time.time()
        proc = subprocess.Popen(_command(run_dir, settings, every), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=job_env(), start_new_session=True)
        try:
            status = _wait_training(proc, run_dir, gap)
        except subprocess.TimeoutExpired:
            before = _newest_commit_time(run_dir)
            kill_tree(proc.pid)
            killed = time.time()
            proc.wait()
            if before is not None and before >= started:
                measured[attempt] = killed - before
            continue
        if status == 0:
            break
        raise RuntimeError(f"goodput job ({every}) exited with {status}")
    else:
        raise RuntimeError(f"goodput job ({every}) did not finish in {settings.max_attempts} attempts")
    result = subprocess.run([sys.executable, "-m", "dist_train", "report", run_dir, "--json", "--no-plot"],
                            capture_output=True, text=True, env=job_env(), timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"dist-train report failed: {result.stderr.strip()[-500:]}")
    report = json.loads(result.stdout)
    return {"every": every, "report": report, "measured_lost": measured}


def run(work_dir: str, size: str) -> list[Figure]:
    settings = SIZES[size]
    results = []
    for every in ("auto", *map(str, settings.fixed)):
        log.info("goodput: --checkpoint-every %s, %d steps, kills every %.0fs on average", every, settings.steps,
                 settings.mtbf_s)
        results.append(run_configuration(work_dir, settings, every))
        report = results[-1]["report"]
        log.info("  goodput %.3f over %.1fs, %d attempts, lost work %.1fs", report["goodput"], report["elapsed_s"],
                 len(report["attempts"]), report["badput_s"]["lost_work"])
    goodputs = {r["every"]: r["report"]["goodput"] for r in results}
    best_fixed = max((k for k in goodputs if k != "auto"), key=lambda k: goodputs[k])
    versus = Figure("auto_vs_best_fixed", "goodput of --checkpoint-every auto over the best fixed interval's",
                    ">= 0.97", [goodputs["auto"] / goodputs[best_fixed]],
                    raw={"goodput": goodputs, "best_fixed": best_fixed, "mtbf_s": settings.mtbf_s,
                         "steps": settings.steps,
                         "intervals_chosen": results[0]["report"].get("intervals", [])[-3:],
                         "attempts": {r["every"]: len(r["report"]["attempts"]) for r in results}})
    reported = measured = 0.0
    for r in results:
        attempts = r["report"]["attempts"]
        for number, seconds in r["measured_lost"].items():
            if number <= len(attempts) and attempts[number - 1]["ended"] == "killed":
                reported += attempts[number - 1]["badput_s"]["lost_work"]
                measured += seconds
    accuracy = Figure("lost_work_accuracy", "lost work reported by the accounting over the bench's own "
                      "(kill time minus the newest commit)", "", [reported / measured if measured else float("nan")],
                      raw={"reported_s": reported, "measured_s": measured})
    accuracy.notes.append("target: within 10% (0.90 .. 1.10)")
    return [versus, accuracy]
