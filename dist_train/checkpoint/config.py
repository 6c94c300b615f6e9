"""Configuration of the run dir, checkpoint cadence, retention and resume."""

from __future__ import annotations

from dataclasses import dataclass

from dist_train.config.fields import option, positive
from dist_train.goodput.interval import check_bound, check_every, check_mtbf


def _resume(value: str) -> str | None:
    if value in ("auto", "never") or "/" in value or ":" in value:
        return None
    return "must be auto, never, or a checkpoint URL"


@dataclass
class CheckpointConfig:
    run_dir: str = option("runs/default", "where checkpoints and metrics go: a path, file://, s3://bucket/prefix "
                          "or any fsspec URL", kind=str)
    storage_options: dict = option({}, "JSON object passed to the fsspec filesystem (e.g. endpoint_url)",
                                   kind="json", secret=True)
    checkpoint_every: str | None = option(None, "commit a checkpoint every N optimizer steps, every DURATION "
                                          "(90s, 10m, 2h) of training, or auto: the interval that maximises "
                                          "goodput from the measured save cost and --mtbf (docs/goodput.md); also "
                                          "at each epoch end and at the end", kind=str, nullable=True,
                                          check=check_every)
    mtbf: str | None = option(None, "mean time between interruptions for --checkpoint-every auto (90m, 2h); "
                              "default: estimated from the run dir's attempts, 1h for a new run", kind=str,
                              nullable=True, check=check_mtbf)
    checkpoint_every_min: str | None = option(None, "lower bound of --checkpoint-every auto: steps or a duration",
                                              kind=str, nullable=True, check=check_bound)
    checkpoint_every_max: str | None = option(None, "upper bound of --checkpoint-every auto: steps or a duration",
                                              kind=str, nullable=True, check=check_bound)
    keep_last: int | None = option(None, "keep only the newest N committed checkpoints", kind=int,
                                   nullable=True, check=positive)
    keep_best: int | None = option(None, "also keep the N checkpoints with the lowest validation loss",
                                   kind=int, nullable=True, check=positive)
    keep_every: int | None = option(None, "also keep every checkpoint whose step is a multiple of N",
                                    kind=int, nullable=True, check=positive)
    resume: str = option("auto", "auto: newest valid checkpoint in the run dir; never; or a checkpoint URL",
                         kind=str, check=_resume)
    async_checkpoint: bool = option(False, "write checkpoints in the background while training goes on",
                                    kind=bool)
    verify: str = option("sha256", "how resume checks a checkpoint before loading it", kind=str,
                         choices=("sha256", "size"))
    checkpoint_writers: str | None = option(None, "who writes a checkpoint: all (every rank writes and hashes "
                                            "its share in parallel; the default with --parallelism fsdp) or rank0 "
                                            "(rank 0 writes everything; the default with ddp)", kind=str,
                                            nullable=True, choices=("all", "rank0"))
    local_cache: str | None = option(None, "node-local folder (e.g. /dev/shm/NAME or a local NVMe path) that "
                                     "also keeps the newest committed checkpoint, for fast restarts", kind=str,
                                     nullable=True)
    local_cache_keep: int = option(1, "checkpoints the local cache keeps", kind=int, check=positive)
    strict_fencing: bool = option(False, "refuse a run dir whose store cannot create a file only if absent "
                                  "(e.g. an S3 server that ignores If-None-Match) instead of falling back to "
                                  "best-effort fencing", kind=bool)
