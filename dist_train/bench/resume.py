"""Resume latency: from launching the job to its first trained step, against a minimal process.

A: `torchrun ... dist-train train --resume auto` on a run dir holding one checkpoint:
   Python and torch start, dist_train is imported, the process group forms, the data
   set and model are built, rank 0 lists the run dir and checks the newest manifest,
   every rank reads the files and verifies their sha256, the state is restored, DDP
   wraps the model, one step is trained and its metrics line written (its time stamp).
B: `torchrun ... baselines/read_checkpoint.py FOLDER`: Python and torch start, the
   process group forms, every rank reads the same files into memory, a barrier.

Both are timed from the moment the launcher is started, so both include torchrun's
own start. The checkpoint was just written, so both read it from the page cache.
"""

from __future__ import annotations

import json
import os
import shutil

from dist_train.bench.jobs import BASELINES, JobFailed, Workload, dist_train_args, launch, torchrun
from dist_train.bench.measure import Figure, alternate, log


def _checkpoints(run_dir: str) -> list[str]:
    return sorted(name for name in os.listdir(run_dir) if name.startswith("ckpt-"))


class ResumeBench:
    def __init__(self, work_dir: str, workload: Workload, repeats: int, run_dir: str | None = None):
        self.given = run_dir is not None
        self.run_dir = run_dir or os.path.join(work_dir, "resume", "run")
        self.w = workload
        self.repeats = repeats
        self.step = 2
        self.dynamo_import: list[float] = []

    def prepare(self) -> None:
        """A run dir with one committed checkpoint (the training benchmark's, or a short job's)."""
        if not self.given:
            log.info("resume: writing a checkpoint to resume from (%s, %d steps, 2 ranks)", self.w.model, self.step)
            os.makedirs(os.path.dirname(self.run_dir), exist_ok=True)
            launch(torchrun(2, dist_train_args(self.w, self.run_dir, 2, steps=self.step)))
        names = _checkpoints(self.run_dir)
        if not names:
            raise JobFailed("the run dir to resume from holds no checkpoint")
        for name in names[:-1]:
            shutil.rmtree(os.path.join(self.run_dir, name))
        self.keep = {names[-1]}
        self.folder = os.path.join(self.run_dir, names[-1])
        with open(os.path.join(self.folder, "manifest.json"), encoding="utf-8") as handle:
            self.step = json.load(handle)["step"]
        self.nbytes = sum(os.path.getsize(os.path.join(self.folder, f)) for f in os.listdir(self.folder))

    def resumed(self) -> float:
        metrics = os.path.join(self.run_dir, "metrics.jsonl")
        if os.path.exists(metrics):
            os.unlink(metrics)
        args = dist_train_args(self.w, self.run_dir, 2, steps=self.step + 1,
                               extra=["--log-every", "1", "--resume", "auto"])
        started, _ = launch(torchrun(2, args))
        first = None
        with open(metrics, encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                if record.get("split") == "train" and record.get("step") == self.step + 1:
                    first = record["time"]
        for name in _checkpoints(self.run_dir):  # back to the same single checkpoint for the next repetition
            if name not in self.keep:
                shutil.rmtree(os.path.join(self.run_dir, name))
        if first is None:
            raise JobFailed("the resumed job did not train a step after the checkpoint (did it resume?)")
        return first - started

    def baseline(self) -> float:
        started, result = launch(torchrun(2, [str(BASELINES / "read_checkpoint.py"), self.folder]))
        stamp = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")][-1]
        self.dynamo_import.append(stamp["dynamo_import_s"])
        return stamp["time"] - started

    def run(self) -> list[Figure]:
        self.prepare()
        log.info("resume: %d repetitions of resume-to-first-step / start-and-read (2 ranks, %.1f MB checkpoint)",
                 self.repeats, self.nbytes / 1e6)
        r = alternate(self.repeats, {"resume": self.resumed, "baseline": self.baseline})
        figure = Figure("resume_ratio", "launch to first resumed step / launch + read", "<= 1.5")
        figure.ratios = [a / b for a, b in zip(r["resume"], r["baseline"])]
        figure.raw = {"checkpoint_bytes": self.nbytes, "resume_to_first_step_s": r["resume"],
                      "start_and_read_s": r["baseline"], "ranks": 2, "workload": self.w.as_dict(),
                      "torch_dynamo_import_s": self.dynamo_import,
                      "ratio_without_dynamo_import": [(a - d) / b for a, b, d in
                                                      zip(r["resume"], r["baseline"], self.dynamo_import)]}
        figure.notes.append("both sides are timed from the torchrun launch; both read a page-cached checkpoint")
        figure.notes.append("torch_dynamo_import_s: building any torch.optim optimizer imports torch._dynamo, "
                            "which the baseline never does; timed in the baseline process after its stamp")
        return [figure]


def run(work_dir: str, workload: Workload, repeats: int, run_dir: str | None = None) -> list[Figure]:
    """resume_ratio; `run_dir` (left by the training benchmark) saves writing a checkpoint first."""
    bench = ResumeBench(work_dir, workload, repeats, run_dir)
    try:
        return bench.run()
    finally:
        shutil.rmtree(bench.run_dir if bench.given else os.path.dirname(bench.run_dir), ignore_errors=True)
