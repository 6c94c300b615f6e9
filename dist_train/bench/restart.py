"""Restarting from the node-local tier: the same checkpoint read from `--local-cache` against S3 (moto).

One training state (Linear layers + Adam, `workload.build_state`) is saved once by a
`CheckpointManager` whose run dir is `s3://BUCKET/run` on a local moto server and whose
`local_cache` is a folder on the benchmark's disk: the durable commit to S3, then the
copy the cache keeps (same manifest, same bytes). Then, alternating, each side resumes
the way a restarted worker does, with a fresh S3 client (no connection kept from the
previous side, as in a new process):

- cache: `CheckpointManager(run_dir, local_cache=DIR).find()`: the run dir is listed on
  S3 and its newest manifest read and checked there (the run dir stays the only commit
  point), then the files are read from DIR, sizes and sha256 verified, tensors built;
- s3: `CheckpointManager(run_dir).find()`: the same discovery, then the files are read
  from S3 (parallel ranged GETs), verified and built the same way.

Timed: `find()`, from the listing of the run dir to the verified payload in memory, each
side starting with the C heap's free memory handed back (`load.fresh_heap`). Not timed: the
manager's construction (the S3 client is created and the bucket checked with one HEAD), which
a process pays once at start, before the model is built, whichever side it then reads; its
seconds are in the raw numbers (`construct_s`). `restart_load_ratio` = cache / s3.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid

from dist_train.bench.load import fresh_heap
from dist_train.bench.measure import Figure, alternate, log
from dist_train.bench.s3 import moto_server
from dist_train.bench.workload import build_state, single_process_env


def _fresh_s3_clients() -> None:
    """Forget cached S3 filesystems (their connection pools): each side connects like a new process."""
    with contextlib.suppress(Exception):
        import s3fs
        s3fs.S3FileSystem.clear_instance_cache()


class RestartBench:
    def __init__(self, work_dir: str, state_bytes: int, repeats: int, bucket: str):
        self.cache_dir = os.path.join(work_dir, "restart", "local-cache")
        self.run_dir = f"s3://{bucket}/run"
        self.repeats = repeats
        self.state_bytes = state_bytes
        self.construct_s: list[float] = []

    def prepare(self) -> None:
        """One committed checkpoint in the S3 run dir, and its copy in the local cache."""
        from dist_train.checkpoint.manager import CheckpointManager

        log.info("restart: building a %.0f MB training state, saving it to S3 (moto) and the local cache",
                 self.state_bytes / 2**20)
        state = build_state(self.state_bytes)
        manager = CheckpointManager(self.run_dir, env=single_process_env(), local_cache=self.cache_dir)
        manager.save(1, {"model": state.model, "optimizer": state.optimizer})
        if not manager.close() or manager.last_committed is None:
            raise RuntimeError("the benchmark's save to S3 failed (see the log above)")
        self.manifest = manager.last_committed.manifest
        self.name = manager.last_committed.name
        self.nbytes = sum(entry["size"] for entry in self.manifest["files"].values())
        if not os.path.isfile(os.path.join(self.cache_dir, self.name, "model.safetensors")):
            raise RuntimeError(f"the local cache {self.cache_dir} did not keep {self.name}")
        del state, manager

    def _resume(self, cache: str | None) -> float:
        """Seconds of `find()` on a manager built with a fresh S3 client (its construction is not timed)."""
        from dist_train.checkpoint.manager import CheckpointManager

        _fresh_s3_clients()
        started = time.perf_counter()
        manager = CheckpointManager(self.run_dir, env=single_process_env(), local_cache=cache)
        self.construct_s.append(time.perf_counter() - started)
        fresh_heap()
        started = time.perf_counter()
        payload = manager.find()
        seconds = time.perf_counter() - started
        if payload is None or payload.manifest != self.manifest:
            raise RuntimeError("the benchmark's resume did not find the checkpoint it saved")
        if manager.restored_from_cache != (cache is not None):
            where = "the local cache" if manager.restored_from_cache else "S3"
            raise RuntimeError(f"the benchmark's resume read {where}, not the side it measures")
        del payload, manager
        return seconds

    def from_cache(self) -> float:
        return self._resume(self.cache_dir)

    def from_s3(self) -> float:
        return self._resume(None)

    def run(self) -> list[Figure]:
        self.prepare()
        log.info("restart: warm-up, then %d repetitions of resume from the local cache / from S3 (%.0f MB)",
                 self.repeats, self.nbytes / 2**20)
        self.from_cache()
        self.from_s3()
        self.construct_s.clear()
        r = alternate(self.repeats, {"cache": self.from_cache, "s3": self.from_s3})
        figure = Figure("restart_load_ratio", "resume load from the node-local cache (--local-cache) / "
                        "from S3 (moto), same checkpoint, CheckpointManager.find()", "<= 0.2")
        figure.ratios = [a / b for a, b in zip(r["cache"], r["s3"])]
        files = {name: entry["size"] for name, entry in self.manifest["files"].items()}
        figure.raw = {"checkpoint_bytes": self.nbytes, "files": files,
                      "cache_s": r["cache"], "s3_s": r["s3"],
                      "cache_MBps": [self.nbytes / s / 1e6 for s in r["cache"]],
                      "s3_MBps": [self.nbytes / s / 1e6 for s in r["s3"]], "cpus": os.cpu_count(),
                      "construct_s": self.construct_s}
        figure.notes.append("both sides list the S3 run dir and read its newest manifest first (the run dir is "
                            "the only commit point); they differ in where the files are read from")
        figure.notes.append("the cache is a folder under --work-dir (warm page cache); moto runs in its own "
                            "process on the same machine, so the S3 side is loopback HTTP, not a network")
        return [figure]

    def close(self) -> None:
        shutil.rmtree(os.path.dirname(self.cache_dir), ignore_errors=True)


def run(work_dir: str, state_bytes: int, repeats: int) -> list[Figure]:
    import boto3

    with moto_server() as endpoint:
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        bench = RestartBench(work_dir, state_bytes, repeats, bucket)
        try:
            return bench.run()
        finally:
            bench.close()
            _fresh_s3_clients()


__all__ = ["run", "RestartBench"]
