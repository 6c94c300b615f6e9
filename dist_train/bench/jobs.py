"""Launching real torchrun jobs for the benchmarks, and reading their timings back.

Every job runs under `torchrun --standalone` with OMP_NUM_THREADS=1 per rank (on two
cores, two ranks get one core each), from the same Python and the same dist_train.
Step times are read from wall-clock stamps each job writes every `log_every` steps:
`metrics.jsonl` for dist_train, stdout for the baseline loop.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import dist_train

PACKAGE_ROOT = Path(dist_train.__file__).resolve().parent.parent
BASELINES = Path(__file__).resolve().parent / "baselines"
JOB_TIMEOUT = 900
_COMMITTED = re.compile(r"committed \S+ \(step (\d+), ([\d.]+) MB, ([\d.]+)s\)")


class JobFailed(RuntimeError):
    pass


def job_env() -> dict[str, str]:
    """The caller's environment without torchrun/AWS leftovers; one thread per rank."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC_", "GROUP_RANK",
                                "LOCAL_WORLD_SIZE", "ROLE_"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def torchrun(nproc: int, target: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *target]


def launch(cmd: list[str], timeout: float = JOB_TIMEOUT) -> tuple[float, subprocess.CompletedProcess]:
    """Run a job to its end; returns (wall-clock time it was started, result)."""
    started = time.time()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=job_env(), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise JobFailed(f"job timed out after {timeout:.0f}s: {' '.join(cmd[-12:])}") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stderr or "").strip().splitlines()[-15:])
        raise JobFailed(f"job exited with {result.returncode}: {' '.join(cmd[-12:])}\n{tail}")
    return started, result


@dataclass
class Workload:
    """The compute-bound training job both sides run: synthetic images, per-rank batch, steps."""
    model: str = "cnn"
    shape: str = "3,32,32"
    batch: int = 64
    warmup: int = 5
    measure: int = 20
    log_every: int = 5
    classes: int = 10

    @property
    def steps(self) -> int:
        return self.warmup + self.measure

    def samples(self, world: int) -> int:
        """A data set large enough that the measured steps never cross an epoch end."""
        return (self.steps + 4) * world * self.batch + 16

    def as_dict(self) -> dict:
        return {"model": self.model, "shape": self.shape, "batch_per_rank": self.batch, "warmup_steps": self.warmup,
                "measured_steps": self.measure, "log_every": self.log_every}


@dataclass
class Timing:
    step_seconds: float  # steady state: (last stamp - first stamp) / steps between them
    window_seconds: list[float] = field(default_factory=list)  # per log window, per step
    save_seconds: float | None = None  # the last "committed ... (Ns)" of the job, if any
    saves: int = 0


def steady_state(stamps: list[tuple[int, float]], warmup: int) -> tuple[float, list[float]]:
    """Seconds per step between the stamp at `warmup` and the last stamp, and per window."""
    stamps = sorted((s, t) for s, t in stamps if s >= warmup)
    if len(stamps) < 2:
        raise JobFailed(f"too few timing stamps after warm-up: {stamps}")
    (s0, t0), (s1, t1) = stamps[0], stamps[-1]
    windows = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(stamps, stamps[1:])]
    return (t1 - t0) / (s1 - s0), windows


def dist_train_args(w: Workload, run_dir: str, world: int, extra: list[str] | None = None,
                    steps: int | None = None) -> list[str]:
    return ["-m", "dist_train", "train", "--run-dir", run_dir, "--dataset", "synthetic",
            "--synthetic-size", str(w.samples(world)), "--synthetic-shape", w.shape,
            "--synthetic-classes", str(w.classes), "--val-fraction", "0", "--test-fraction", "0",
            "--model", w.model, "--batch-size", str(w.batch), "--epochs", "1",
            "--max-steps", str(steps or w.steps), "--log-every", str(w.log_every), "--no-progress",
            "--optimizer", "adam", "--lr", "0.001", *(extra or [])]


def run_dist_train(w: Workload, run_dir: str, world: int, extra: list[str] | None = None) -> Timing:
    _, result = launch(torchrun(world, dist_train_args(w, run_dir, world, extra)))
    stamps = []
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("split") == "train":
                stamps.append((record["step"], record["time"]))
    seconds, windows = steady_state(stamps, w.warmup)
    commits = _COMMITTED.findall(result.stderr or "")
    return Timing(seconds, windows, float(commits[-1][2]) if commits else None, len(commits))


def run_baseline(w: Workload, world: int) -> Timing:
    script = str(BASELINES / "ddp_loop.py")
    _, result = launch(torchrun(world, [script, "--model", w.model, "--batch-size", str(w.batch), "--shape", w.shape,
                                        "--classes", str(w.classes), "--size", str(w.samples(world)),
                                        "--steps", str(w.steps), "--log-every", str(w.log_every),
                                        "--repo", str(PACKAGE_ROOT)]))
    stamps = [(r["step"], r["time"]) for r in map(json.loads, _json_lines(result.stdout))]
    seconds, windows = steady_state(stamps, w.warmup)
    return Timing(seconds, windows)


def _json_lines(text: str) -> list[str]:
    return [line for line in (text or "").splitlines() if line.startswith("{")]
