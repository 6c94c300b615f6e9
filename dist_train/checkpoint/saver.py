"""Saving checkpoints from a running job: when, by whom, in the foreground or the background.

Every rank calls `save` at the same step boundary (their RNG states are gathered to
rank 0); rank 0 alone writes. With `--async-checkpoint` the training thread only
copies the state into reused CPU buffers; serializing, hashing, uploading, the commit
and retention run in one background thread, with at most one save in flight.

A failed save is reported and the next one tries again; after
`max_consecutive_failures` the job stops (see README, "Failure policy"). A newer
attempt owning the run dir (`SupersededError`) stops the job at once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import traceback
from typing import Any, Callable

import torch

from dist_train.checkpoint import catalog
from dist_train.checkpoint.catalog import CheckpointRef
from dist_train.checkpoint.manifest import model_digest
from dist_train.checkpoint.retention import RetentionPolicy, delete_checkpoint, plan, val_loss_of
from dist_train.checkpoint.state import Snapshot
from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.storage import Storage
from dist_train.checkpoint.writer import CheckpointWriter, Committed
from dist_train.distributed.env import DistEnv
from dist_train.errors import StorageError, SupersededError
from dist_train.determinism import capture_rng_state

log = logging.getLogger(__name__)

SnapshotFn = Callable[[list[dict[str, Any]], bool], Snapshot]


class Checkpointer:
    def __init__(self, env: DistEnv, storage: Storage, writer: CheckpointWriter | None, policy: RetentionPolicy,
                 async_mode: bool, max_consecutive_failures: int = 3,
                 on_commit: Callable[[Committed, Snapshot], None] | None = None,
                 commit: Callable[[Snapshot], Committed] | None = None, *,
                 node_copy: Callable[[Snapshot], None] | None = None, rng_everywhere: bool = False,
                 share_committed: Callable[[Committed, Snapshot], None] | None = None):
        """`commit`, when given, is a collective commit every rank runs (sharded checkpoints: each
        rank writes its share); by default rank 0 alone writes `snap.files()` with `writer`.

        `node_copy`, on a rank that does not write (another node's local rank 0), takes the same
        snapshot and hands it to `node_copy` instead of committing it (that node's local cache);
        `rng_everywhere` (the same on every rank) gathers every rank's RNG state to every rank so
        such a snapshot is whole.

        `share_committed`, with a collective commit, runs on every rank once the checkpoint is
        committed (each rank's share into its node's local cache); it must not fail."""
        self.env = env
        self.commit = commit
        self.collective = commit is not None
        self.node_copy = node_copy
        self.rng_everywhere = rng_everywhere
        self.share_committed = share_committed
        self.storage = storage
        self.writer = writer
        self.policy = policy
        self.async_mode = async_mode
        self.max_consecutive_failures = max_consecutive_failures
        self.on_commit = on_commit
        self.last_step: int | None = None
        self.consecutive_failures = 0
        self.superseded: str | None = None
        self.last_committed: Committed | None = None
        self.stall_seconds = 0.0  # training-thread time spent in save(), for benchmarks
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-writer") \
            if (async_mode and (env.is_rank0 or self.collective or node_copy)) else None
        self._in_flight: concurrent.futures.Future | None = None
        self._snapshot_ready: threading.Event | None = None  # set once the deferred snapshot copy is done
        self._val_losses: dict[str, float | None] = {}

    # -- called by every rank -------------------------------------------------------------

    def mark_committed(self, step: int) -> None:
        """The run dir already holds a committed checkpoint of `step` (the one resumed from).

        A run resumed at its end, or preempted again before its first step, would otherwise
        commit the same state once more under the new attempt's name, and `--keep-last`
        would evict real history for the copy.
        """
        self.last_step = step

    def save(self, step: int, snapshot: SnapshotFn, reason: str) -> None:
        """Commit the state at `step` (collective: every rank calls it at the same boundary)."""
        if step == self.last_step:
            return
        self.last_step = step
        started = time.perf_counter()
        rng = capture_rng_state()
        rng_states = self.env.all_gather_objects(rng) if self.rng_everywhere else self.env.gather_objects(rng)
        if self.env.is_rank0 or self.collective or self.node_copy:
            self._wait_in_flight()
            snap = snapshot(rng_states, self.async_mode)
            snap.fields["reason"] = reason
            if self._pool is not None:
                ready = threading.Event() if snap.fill is not None else None
                self._snapshot_ready = ready
                self._in_flight = self._pool.submit(self._write, snap, ready)
            else:
                self._write(snap)
        self.stall_seconds += time.perf_counter() - started

    @property
    def must_stop(self) -> bool:
        """Rank 0's view: too many failed saves, or superseded (shared with the other ranks at a boundary)."""
        return self.superseded is not None or self.consecutive_failures >= self.max_consecutive_failures

    @property
    def writing(self) -> bool:
        """A background save is still being written (rank 0, async mode)."""
        return self._in_flight is not None and not self._in_flight.done()

    def wait_written(self) -> None:
        """Block until the save in flight is committed or has failed (failures are recorded, not raised)."""
        self._wait_in_flight()

    def wait_snapshot(self) -> None:
        """Called before every optimizer update: the state must not change while a snapshot is taken.

        An async save copies parameters and optimizer state in the writer thread while the
        next forward and backward pass run; only if that copy is slower than them does the
        training thread wait here (counted in `stall_seconds`).
        """
        ready = self._snapshot_ready
        if ready is None:
            return
        if not ready.is_set():
            started = time.perf_counter()
            ready.wait()
            self.stall_seconds += time.perf_counter() - started
        self._snapshot_ready = None

    def finish(self) -> bool:
        """Wait for the save in flight; True when the newest save succeeded."""
        self._wait_in_flight()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        return self.consecutive_failures == 0 and self.superseded is None

    # -- rank 0 -----------------------------------------------------------------------------

    def _wait_in_flight(self) -> None:
        if self._in_flight is not None:
            self._in_flight.result()  # _write never raises: failures are recorded
            self._in_flight = None

    def _write(self, snap: Snapshot, ready: threading.Event | None = None) -> None:
        if self.writer is None and self.node_copy is not None:
            self._copy_for_node(snap, ready)
            return
        assert self.writer is not None
        started = time.perf_counter()
        try:
            _complete(snap, ready)
            fields = dict(snap.fields)
            if self.commit is not None:
                committed = self.commit(snap)
            else:
                committed = self.writer.commit(snap.step, snap.files(), fields,
                                               deferred={"model_digest": lambda: model_digest(snap.model)})
        except SupersededError as exc:
            self.superseded = str(exc)
            log.error("checkpoint at step %d not committed: %s", snap.step, exc)
            return
        except (OSError, ValueError, RuntimeError, StorageError) as exc:  # StorageError: e.g. CommitConflict
            self.consecutive_failures += 1
            log.error("checkpoint at step %d failed (%d in a row, stop after %d): %s", snap.step,
                      self.consecutive_failures, self.max_consecutive_failures, describe_error(exc))
            log.debug("checkpoint failure traceback:\n%s", traceback.format_exc())
            return
        except Exception:  # noqa: BLE001 - a bug; keep the traceback, and do not lose the job
            self.consecutive_failures += 1
            log.exception("checkpoint at step %d failed unexpectedly", snap.step)
            return
        self.consecutive_failures = 0
        self.last_committed = committed
        if self.share_committed is not None:
            try:
                self.share_committed(committed, snap)
            except Exception as exc:  # noqa: BLE001 - the local cache is an optimisation
                log.warning("local cache: no copy of this rank's share of step %d (%s)", snap.step, describe_error(exc))
        if not self.env.is_rank0:
            return  # a collective commit's other ranks: rank 0 logs, tells the listeners, applies retention
        self._val_losses[committed.name] = val_loss_of(committed.manifest)
        log.info("committed %s (step %d, %.1f MB, %.2fs)", committed.url, snap.step,
                 sum(f["size"] for f in committed.manifest["files"].values()) / 1e6, time.perf_counter() - started)
        if self.on_commit:
            self.on_commit(committed, snap)
        self._apply_retention()

    def _copy_for_node(self, snap: Snapshot, ready: threading.Event | None) -> None:
        """A node leader's copy of the snapshot (its local cache); never fails the job."""
        try:
            _complete(snap, ready)
            self.node_copy(snap)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation
            log.warning("local cache: no copy of step %d on this node (%s)", snap.step, describe_error(exc))

    def _apply_retention(self) -> None:
        if not self.policy.active:
            return
        try:
            refs = catalog.list_checkpoints(self.storage)
            marked = catalog.corrupt_marks(self.storage)  # found corrupt at resume: not history, deleted first
            committed = [ref for ref in refs if ref.name not in marked and self._is_committed(ref)]
            for ref in plan(committed, self.policy, self._val_loss, [r for r in refs if r.name in marked]):
                if self.writer and self.writer.registry:
                    self.writer.registry.check_current(self.writer.generation)
                delete_checkpoint(self.storage, ref)
                self._val_losses.pop(ref.name, None)
                log.info("retention: deleted %s", self.storage.url(ref.name))
        except SupersededError as exc:
            self.superseded = str(exc)
        except Exception as exc:  # noqa: BLE001 - retention failures never stop training
            log.warning("retention pass failed: %s", describe_error(exc))

    def _is_committed(self, ref: CheckpointRef) -> bool:
        if ref.name in self._val_losses:
            return True
        try:
            manifest = catalog.read_manifest(self.storage.child(ref.name))
        except Exception:  # noqa: BLE001 - not committed (or unreadable): never counted, never deleted
            return False
        self._val_losses[ref.name] = val_loss_of(manifest)
        return True

    def _val_loss(self, ref: CheckpointRef) -> float | None:
        return self._val_losses.get(ref.name)


def _complete(snap: Snapshot, ready: threading.Event | None) -> None:
    """Finish the snapshot's deferred copies (then the training thread may update again: `ready`)."""
    try:
        if snap.fill is not None:
            snap.fill()
    finally:
        if ready is not None:
            ready.set()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # pinned non_blocking copies must have landed
