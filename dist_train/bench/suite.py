"""Which benchmarks run at which size, in which order, and the one entry point that runs them."""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from dist_train.bench.jobs import Workload
from dist_train.bench.measure import Figure, log

FAMILIES = ("io", "load", "restart", "s3", "training", "resume")
# Run only when asked for (`--only sharded`) until the default run's budget and smoke test include it.
EXTRA_FAMILIES = ("sharded", "goodput", "data")
# Each family and the figures it produces (so a failed family still reports its keys).
FIGURES = {"io": [("stall_ratio", "<= 0.05"), ("save_efficiency", ">= 0.80"), ("async_thread_vs_process", "")],
           "load": [("load_ratio", "<= 1.2"), ("load_ratio_old_path", ""), ("restore_vs_dcp", "<= 1.5")],
           "restart": [("restart_load_ratio", "<= 0.2"), ("restore_bytes_ratio", "<= 1.05"),
                       ("restore_scaling", "<= 1.1"), ("restore_sha256_ratio", "<= 1.1"), ("restore_cpu_ratio", ""),
                       ("restore_scaling_seaweedfs", "<= 1.1")],
           "s3": [("s3_efficiency", ">= 0.85")],
           "training": [("trainer_overhead", "<= 1.03"), ("ddp_scaling", ">= 0.85"), ("checkpoint_overhead", "<= 1.035")],
           "resume": [("resume_ratio", "<= 1.5")],
           "sharded": [("sharded_save_speedup", ">= 1.5"), ("sharded_save_speedup_s3", ""),
                       ("sharded_vs_dcp_save", ""), ("fsdp_overhead", "")],
           "goodput": [("auto_vs_best_fixed", ">= 0.97"), ("lost_work_accuracy", "")],
           "data": [(key + server, target) for server in ("", "_seaweedfs") for key, target in (
               ("packed_warm_vs_folder", ">= 0.9"), ("packed_cold_vs_folder", ""), ("packed_cold_vs_boto3", ">= 0.8"),
               ("packed_vs_webdataset", ""), ("packed_vs_mds", ""), ("packed_bytes_read_ratio", "<= 1.05"))]}
# The sharded family's own sizes (local state, S3 state, repetitions, timed steps): --quick about a minute.
SHARDED_SIZES = {"tiny": (4 * 2**20, 2 * 2**20, 1, 2), "quick": (64 * 2**20, 32 * 2**20, 3, 5),
                 "full": (512 * 2**20, 256 * 2**20, 5, 10)}
MB = 2**20


@dataclass
class Settings:
    name: str
    repeats: int  # A/B repetitions of the torchrun families (training, resume) and of S3
    io_repeats: int  # of the local checkpoint I/O family (seconds each: more repetitions are cheap)
    state_bytes: int  # training state saved by the I/O benchmarks
    s3_bytes: int
    workload: Workload = field(default_factory=Workload)
    compare_process: bool = True

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["workload"] = self.workload.as_dict()
        return out


def settings_for(name: str) -> Settings:
    if name == "tiny":  # the test suite's smoke run: every code path, no meaningful numbers
        return Settings("tiny", 1, 1, 4 * MB, 4 * MB, Workload("mlp", "3,8,8", 8, 2, 4, 2))
    if name == "quick":
        return Settings("quick", 3, 5, 200 * MB, 128 * MB, Workload("cnn", "3,32,32", 128, 4, 16, 4))
    return Settings("full", 5, 7, 1024 * MB, 512 * MB, Workload("resnet18", "3,32,32", 64, 5, 20, 5))


def _family(name: str, settings: Settings, work_dir: str, shared: dict[str, Any]) -> list[Figure]:
    if name == "io":
        from dist_train.bench import checkpoint_io
        return checkpoint_io.run(work_dir, settings.state_bytes, settings.io_repeats, settings.compare_process)
    if name == "load":
        from dist_train.bench import load
        restore_bytes = {"tiny": settings.state_bytes, "quick": load.RESTORE_BYTES // 4}.get(settings.name,
                                                                                           load.RESTORE_BYTES)
        return load.run(work_dir, settings.state_bytes, settings.io_repeats, restore_bytes)
    if name == "restart":
        from dist_train.bench import restart
        from dist_train.bench import restore_scale
        return [*restart.run(work_dir, settings.state_bytes, settings.io_repeats),
                *restore_scale.run(work_dir, settings.state_bytes, max(1, settings.repeats))]
    if name == "s3":
        from dist_train.bench import s3
        return s3.run(settings.s3_bytes, settings.repeats)
    if name == "training":
        from dist_train.bench import training
        return training.run(work_dir, settings.workload, settings.repeats, shared)
    if name == "sharded":
        from dist_train.bench import sharded
        local, remote, repeats, steps = SHARDED_SIZES[settings.name]
        return sharded.run(work_dir, local, remote, repeats, steps)
    if name == "goodput":
        from dist_train.bench import goodput
        return goodput.run(work_dir, settings.name)
    if name == "data":
        from dist_train.bench import data
        return data.run(work_dir, settings.name, settings.repeats)
    from dist_train.bench import resume
    return resume.run(work_dir, settings.workload, settings.repeats, shared.get("checkpointed_run"))


def run_suite(settings: Settings, families: tuple[str, ...] = FAMILIES, work_dir: str | None = None,
              progress: Callable[[str], None] | None = None) -> tuple[list[Figure], dict[str, Any]]:
    """Run the chosen families; a family that fails reports an error on its figures, the rest go on."""
    import torch

    from dist_train.bench.report import machine_info

    base = work_dir or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="dist-train-bench-", dir=base)
    started = time.perf_counter()
    meta: dict[str, Any] = {"started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "settings": settings.as_dict(), "families": list(families),
                            "machine": machine_info(scratch), "family_seconds": {}}
    figures: list[Figure] = []
    shared: dict[str, Any] = {}  # the training family leaves a run dir with a checkpoint for the resume family
    threads = torch.get_num_threads()
    try:
        for family in families:
            log.info("== %s", family)
            t0 = time.perf_counter()
            # In-process benchmarks run like one torchrun rank: one intra-op thread (torchrun's default).
            torch.set_num_threads(1)
            try:
                figures.extend(_family(family, settings, scratch, shared))
            except Exception as exc:  # noqa: BLE001 - one broken family must not hide the others
                log.error("benchmark family %s failed: %s", family, exc)
                log.debug("%s", traceback.format_exc())
                for key, target in FIGURES[family]:
                    if not any(f.key == key for f in figures):
                        figures.append(Figure(key, f"{family} benchmark", target, error=f"{type(exc).__name__}: {exc}"))
            finally:
                torch.set_num_threads(threads)
            meta["family_seconds"][family] = round(time.perf_counter() - t0, 1)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    meta["duration_s"] = round(time.perf_counter() - started, 1)
    from dist_train.bench.report import _load
    meta["load_average_end"] = _load()
    return figures, meta


def configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    for name, level in (("dist_train.bench", logging.INFO),
                        ("dist_train", logging.INFO if verbose else logging.WARNING)):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
