"""`CheckpointManager`: the checkpoint store for any training loop, the trainer's included.

```python
mgr = CheckpointManager(run_dir, keep_last=3)
state = {"model": model, "optimizer": optimizer, "extra": my_stateful_object}
start = mgr.restore(state)      # newest valid checkpoint restored in place: its step, or None
for step in range(start or 0, total):
    ...
    mgr.save(step + 1, state)   # every rank, same step; rank 0 writes
mgr.close()
```

Values of `state`: objects with `state_dict()`/`load_state_dict()`, tensors, or plain
JSON data. Each entry becomes one file of the checkpoint (`model.safetensors` is plain
safetensors for deployment); the RNG states of every rank go into `rng.safetensors`.
The commit protocol, fencing, retention, verification and fallback are those of the
trainer, because the trainer saves through this same class.

The run dir is claimed (a new attempt generation registered, leftovers of older
attempts removed) before the first save, never by `restore`, so a job that fails
while starting writes nothing.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
from torch import nn

from dist_train.checkpoint import catalog
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint import resolver
from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.fencing import AttemptRegistry, new_writer_id
from dist_train.checkpoint.local_cache import LocalCache
from dist_train.checkpoint.retention import RetentionPolicy
from dist_train.checkpoint.saver import Checkpointer
from dist_train.checkpoint.state import (MODEL, CorruptCheckpoint, Payload, Snapshot, SnapshotBuffers, read_payload,
                                         to_cpu_tree)
from dist_train.checkpoint.storage import Storage
from dist_train.checkpoint.writer import CheckpointWriter, Committed, clean_stale
from dist_train.determinism import restore_rng_state
from dist_train.distributed.env import DistEnv
from dist_train.errors import UserError

log = logging.getLogger(__name__)

RNG = "rng"
RESERVED = (RNG,)
Check = Callable[[dict[str, Any]], "str | None"]


def unwrap(model: Any) -> Any:
    """The module inside DistributedDataParallel (its state_dict keys carry no `module.` prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def capture(value: Any) -> Any:
    """The savable tree of one state entry."""
    value = unwrap(value)
    if hasattr(value, "state_dict") and callable(value.state_dict):
        return value.state_dict()
    return value


def restore_entry(state: dict[str, Any], name: str, saved: Any) -> None:
    """Put `saved` back into `state[name]` in place (immutable values are replaced in the dict)."""
    target = unwrap(state[name])
    try:
        if hasattr(target, "load_state_dict") and callable(target.load_state_dict):
            target.load_state_dict(saved)
        elif isinstance(target, torch.Tensor):
            with torch.no_grad():
                target.copy_(saved)
        elif isinstance(target, dict) and isinstance(saved, dict):
            target.clear()
            target.update(saved)
        elif isinstance(target, list) and isinstance(saved, list):
            target[:] = saved
        else:
            state[name] = saved
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = " ".join(lines[:2])[:300] if lines else type(exc).__name__
        raise UserError(f"checkpoint entry {name!r} does not fit this run's {name}: {detail}") from None


class CheckpointManager:
    """Restore the newest valid checkpoint of a run dir, save new ones, keep the newest few.

    Under torchrun every rank calls every method at the same point (they are
    collectives); rank 0 writes. `async_save=True` writes in a background thread: the
    state is copied into CPU buffers before `save` returns, so training may go on.
    """

    def __init__(self, run_dir: str, keep_last: int | None = None, async_save: bool = False,
                 storage_options: dict | None = None, *, keep_best: int | None = None,
                 keep_every: int | None = None, verify: str = "sha256", env: DistEnv | None = None,
                 max_consecutive_failures: int = 3, on_commit: Callable[[Committed], None] | None = None,
                 strict_fencing: bool = False, local_cache: str | None = None, local_cache_keep: int = 1,
                 writers: str = "rank0"):
        if keep_last is not None and keep_last < 1:
            raise UserError(f"keep_last must be >= 1, got {keep_last}")
        if verify not in ("sha256", "size"):
            raise UserError(f"verify must be sha256 or size, got {verify!r}")
        self.env = env or DistEnv.current()
        self.options = dict(storage_options or {})
        self.storage = Storage(run_dir, self.options)
        self.env.on_every_rank(lambda: self.storage.check_reachable() if self.env.is_rank0 else None)
        self.verify = verify
        if writers not in ("rank0", "all"):
            raise UserError(f"writers must be rank0 or all, got {writers!r}")
        self.writers = writers  # all: every rank writes its share of the model and optimizer (sharded)
        self._sharded = None
        self._fsdp_target = False  # restoring into an FSDP model: model and optimizer load resharded
        self.policy = RetentionPolicy(keep_last, keep_best, keep_every)
        self.async_save = async_save
        self.max_consecutive_failures = max_consecutive_failures
        self.strict_fencing = strict_fencing  # refuse a store that ignores conditional writes (else: warn)
        self._listeners: list[Callable[[Committed], None]] = [on_commit] if on_commit else []
        self.generation: int | None = None
        self.resumed_from: dict[str, Any] | None = None  # manifest of the checkpoint restored
        self.resumed_url: str | None = None
        self.restored_rng = False
        self._saver: Checkpointer | None = None
        self._buffers = SnapshotBuffers()
        self._resumed_step: int | None = None
        self.cache = LocalCache(local_cache, self.storage.display_url, local_cache_keep) if local_cache else None
        self.restored_from_cache = False

    # -- restoring -------------------------------------------------------------------------

    def restore(self, state: dict[str, Any], *, source: str = "auto", check: Check | None = None) -> int | None:
        """Load the newest valid checkpoint into `state` in place; its step, or None for a fresh start.

        `source`: "auto" (this run dir), "never" (refuse a run dir that already holds
        checkpoints), or a URL (a checkpoint folder, or another run dir's newest valid one).
        `check(manifest)` may return a reason why a checkpoint cannot be this run's (a
        model of another architecture): a UserError, before anything is loaded.
        Corrupt or partial checkpoints are skipped and reported; all ranks load the same one.
        """
        _check_state(state)
        from dist_train.distributed.parallel import is_fsdp
        self._fsdp_target = "model" in state and is_fsdp(unwrap(state["model"]))
        payload = self._choose(source, check)
        if payload is None:
            return None
        resharded = ()
        if self._resharding(payload.manifest):
            resharded = self._load_resharded(state, payload)
        missing = [name for name in state if name not in payload.entries and name not in resharded]
        if missing:
            raise UserError(f"checkpoint {self.resumed_url} has no entry for "
                            f"{', '.join(map(repr, missing))} (it holds {', '.join(sorted(payload.entries))})")
        for name in state:
            if name not in resharded:
                restore_entry(state, name, payload.entries[name])
        self.restored_rng = self._restore_rng(payload.entries.get(RNG))
        self.resumed_from = payload.manifest
        if source == "auto":
            self._resumed_step = int(payload.manifest["step"])
        return int(payload.manifest["step"])

    def find(self, source: str = "auto", check: Check | None = None) -> Payload | None:
        """The checkpoint `restore` would load, read and verified, without loading it (collective)."""
        return self._choose(source, check)

    def _choose(self, source: str, check: Check | None) -> Payload | None:
        """Rank 0 proposes candidates newest first; every rank reads and verifies; all agree (collective)."""
        env = self.env
        error, located = None, None
        if env.is_rank0:
            try:
                located = self._locate(source)
            except UserError as exc:
                error = str(exc)
        env.agree(error)
        skipped: list[str] = []

        def on_skip(verdict) -> None:  # a named checkpoint gets one error line with the reason, no warning
            skipped.append(verdict.reason or "invalid")
            if not located.explicit:
                resolver.log_skip(verdict)

        pending = resolver.candidates(located, "size", on_skip) if located is not None else iter(())
        while True:
            candidate, error = None, None
            if env.is_rank0:
                try:
                    verdict = next(pending, None)
                    if verdict is not None:
                        candidate = (verdict.url, verdict.manifest)
                        reason = check(verdict.manifest) if check else None
                        if reason:
                            error = f"cannot resume from {verdict.url}: {reason}"
                    elif located is not None and located.explicit:
                        reason = f": {skipped[-1]}" if skipped else ""
                        error = f"--resume {located.display_url} is not a valid checkpoint{reason}"
                except Exception as exc:  # noqa: BLE001 - storage trouble during discovery is the user's to fix
                    error = f"cannot search {located.display_url} for checkpoints: {describe_error(exc)}"
            env.agree(error)
            candidate = env.broadcast_object(candidate)
            if candidate is None:
                if source not in ("auto", "never"):
                    raise UserError(f"--resume {source}: no valid checkpoint there")
                return None
            url, manifest = candidate
            problem, payload = None, None
            try:
                payload = None if self._resharding(manifest) else self._read_cached(url, manifest)
                if payload is None:
                    payload = self._read(Storage(url, self.options), manifest)
            except CorruptCheckpoint as exc:
                problem = str(exc)
            except Exception as exc:  # noqa: BLE001 - unreadable: treat as invalid, try the next
                problem = f"unreadable ({describe_error(exc)})"
            problems = [p for p in env.all_gather_objects(problem) if p]
            if not problems:
                log.info("resuming from %s (step %d, epoch %d)", url, manifest["step"], manifest["epoch"])
                self.resumed_url = url
                return payload
            if located is not None and located.explicit or source not in ("auto", "never"):
                env.agree(f"--resume {url} is not a valid checkpoint: {problems[0]}")
            if env.is_rank0:
                resolver.log_skip(catalog.Verdict(catalog.CheckpointRef(0, 0, url), url, False, problems[0]))

    def _load_resharded(self, state: dict[str, Any], payload: Payload) -> tuple[str, ...]:
        """Model (and optimizer) through DCP's planner: any saved world size or layout into this one."""
        from dist_train.checkpoint.dcp import load_state

        optimizer = state.get("optimizer")
        load_state(self.env, payload.folder, payload.manifest, unwrap(state["model"]), optimizer, verify_sha=False)
        return ("model", "optimizer") if optimizer is not None else ("model",)

    def _resharding(self, manifest: dict[str, Any]) -> bool:
        """Model and optimizer go through DCP's planner (resharded): a sharded checkpoint, or an FSDP model."""
        from dist_train.checkpoint.sharded import is_sharded
        return is_sharded(manifest) or self._fsdp_target

    def _read(self, folder: Storage, manifest: dict[str, Any]) -> Payload:
        """This rank's reading of a candidate: whole entries, and (resharding) its share of the shards' hashes."""
        if not self._resharding(manifest):
            return read_payload(folder, manifest, verify_sha=self.verify == "sha256")
        from dist_train.checkpoint.dcp import files_to_load
        from dist_train.checkpoint.index import verify_share

        if self.verify == "sha256":
            problem = verify_share(folder, manifest, self.env.rank, self.env.world_size, files_to_load(manifest))
            if problem:
                raise CorruptCheckpoint(problem)
        payload = read_payload(folder, manifest, verify_sha=self.verify == "sha256", skip=("model", "optimizer"))
        payload.folder = folder
        return payload

    def _read_cached(self, url: str, manifest: dict[str, Any]) -> Payload | None:
        """This node's cached copy of the chosen checkpoint, verified while read; None: read the run dir."""
        name = url.rstrip("/").rsplit("/", 1)[-1]
        folder = self.cache.lookup(name, manifest) if self.cache is not None else None
        if folder is None:
            return None
        try:
            payload = read_payload(folder, manifest, verify_sha=True)
        except Exception as exc:  # noqa: BLE001 - a damaged cache is ignored, never trusted
            log.warning("local cache: ignored %s (%s); reading the run dir", name, describe_error(exc))
            self.cache.discard(name)
            return None
        log.info("resuming from the local cache %s (same manifest as %s)", folder.display_url, url)
        self.restored_from_cache = True
        return payload

    def _locate(self, source: str) -> resolver.Located | None:
        if source in ("auto", "never"):
            refs = catalog.newest_first(catalog.list_checkpoints(self.storage))
            if source == "never":
                committed = [r for r in refs if self.storage.exists(f"{r.name}/{mf.MANIFEST}")]
                if committed:
                    raise UserError(
                        f"run dir {self.storage.display_url} already holds {len(committed)} checkpoint(s) "
                        f"(newest {committed[0].name}); --resume never would start over beside them. "
                        "Use --resume auto to continue, or a new --run-dir")
                return None
            return resolver.Located(self.storage, refs, explicit=False)
        return resolver.locate(source, self.options, what="--resume")

    def _restore_rng(self, states: list[dict[str, Any]] | None) -> bool:
        """This rank's saved RNG state when the world size is unchanged; False when there is none."""
        if not states or len(states) != self.env.world_size:
            return False
        restore_rng_state(states[self.env.rank])
        return True

    # -- saving ----------------------------------------------------------------------------

    def claim(self, config_yaml: str | None = None) -> int:
        """Register this attempt (the fencing generation) and tidy the run dir (collective, idempotent)."""
        if self.generation is not None:
            return self.generation
        env = self.env
        writer_id = new_writer_id()
        generation = 0
        # once per run: does the store honour If-None-Match? (warn and check-then-write, or refuse if strict)
        env.on_every_rank(lambda: self.storage.check_conditional_writes(self.strict_fencing) if env.is_rank0 else None)
        if env.is_rank0:
            self.storage.makedirs("")
            registry = AttemptRegistry(self.storage)
            resumed = self.resumed_from.get("generation") if self.resumed_from and self._resumed_step is not None \
                else None
            generation = registry.register(writer_id, str(resumed) if resumed is not None else None)
            removed = clean_stale(self.storage, generation)
            if removed:
                log.info("removed %d leftover staging or partial folder(s) of earlier attempts", len(removed))
            if config_yaml is not None:
                self.storage.write_bytes("config.yaml", config_yaml.encode())
            log.info("attempt %d on run dir %s", generation, self.storage.display_url)
        self.generation, writer_id = env.broadcast_object((generation, writer_id))
        registry = AttemptRegistry(self.storage) if env.is_rank0 else None
        writer = CheckpointWriter(self.storage, self.generation, writer_id, registry) \
            if env.is_rank0 or self.writers == "all" else None
        commit = None
        if self.writers == "all":
            from dist_train.checkpoint.sharded import ShardedSaver
            self._sharded = ShardedSaver(env, writer)
            commit = self._commit_sharded
            if self.cache is not None and env.is_rank0:
                log.warning("--local-cache keeps whole checkpoints only; with every rank writing its share "
                            "(--checkpoint-writers all) restarts read the run dir")
                self.cache = None
        self._saver = Checkpointer(env, self.storage, writer, self.policy, self.async_save,
                                   self.max_consecutive_failures, self._committed, commit)
        if self._resumed_step is not None:
            self._saver.mark_committed(self._resumed_step)
        return self.generation

    def save(self, step: int, state: Mapping[str, Any], *, epoch: int = 0, reason: str = "interval",
             metrics: dict[str, Any] | None = None, fields: dict[str, Any] | None = None,
             defer: Callable[[torch.Tensor], bool] | None = None) -> None:
        """Commit `state` as the checkpoint of `step` (collective; rank 0 writes, maybe in the background).

        A failed save is logged and the next one tries again (see `must_stop`). `defer`
        (the trainer's) names tensors whose copy may run in the writer thread because only
        the optimizer update changes them; it must call `wait_snapshot()` before that update.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise UserError(f"save: step must be a non-negative whole number, got {step!r}")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise UserError(f"save: epoch must be a non-negative whole number, got {epoch!r}")
        _check_state(state)
        self.claim()
        world_size = self.env.world_size

        def snapshot(rng_states: list[dict[str, Any]], copy: bool) -> Snapshot:
            if self.writers == "all":
                return self._sharded_snapshot(step, state, rng_states, copy, manifest_fields())
            trees = {name: capture(value) for name, value in state.items()}
            if copy:
                entries = {name: self._buffers.copy_tree(tree, name, defer) for name, tree in trees.items()}
                fill = self._buffers.take_pending()
            else:
                entries, fill = {name: to_cpu_tree(tree) for name, tree in trees.items()}, None
            entries[RNG] = rng_states
            return Snapshot(step, entries, manifest_fields(), fill)

        def manifest_fields() -> dict[str, Any]:
            out = dict(fields or {})
            out.update({"epoch": epoch, "world_size": world_size, "reason": reason, "entries": sorted(state)})
            if metrics:
                out["metrics"] = dict(metrics)
            return out

        self._saver.save(step, snapshot, reason)

    def _sharded_snapshot(self, step: int, state: Mapping[str, Any], rng_states: Any, copy: bool,
                          fields: dict[str, Any]) -> Snapshot:
        """Every rank's share of the model and optimizer; rank 0 also holds the whole small entries."""
        from dist_train.checkpoint.sharded import collect_state

        if "model" not in state:
            raise UserError("checkpoint writers 'all' need a state entry named 'model'")
        shard_state, pinned = collect_state(unwrap(state["model"]), state.get("optimizer"))
        shard = self._sharded.snapshot(step, shard_state, pinned, copy=copy)
        entries: dict[str, Any] = {}
        if self.env.is_rank0:
            for name, value in state.items():
                if name not in ("model", "optimizer"):
                    tree = capture(value)
                    entries[name] = self._buffers.copy_tree(tree, name) if copy else to_cpu_tree(tree)
            entries[RNG] = rng_states
        return Snapshot(step, entries, fields, None, shard)

    def _commit_sharded(self, snap: Snapshot) -> Committed:
        return self._sharded.commit(snap.shard, dict(snap.fields), snap.files() if self.env.is_rank0 else None)

    def add_commit_listener(self, listener: Callable[[Committed], None]) -> None:
        """Call `listener(committed)` on rank 0 after each commit (from the writer thread when async)."""
        self._listeners.append(listener)

    def _committed(self, committed: Committed, snap: Snapshot) -> None:
        if self.cache is not None:
            self.cache.store(committed.name, committed.manifest, snap.files())
        for listener in list(self._listeners):
            listener(committed)

    def wait_snapshot(self) -> None:
        if self._saver is not None:
            self._saver.wait_snapshot()

    @property
    def must_stop(self) -> bool:
        """Rank 0's view: too many failed saves in a row, or a newer attempt took over."""
        return self._saver is not None and self._saver.must_stop

    @property
    def superseded(self) -> str | None:
        return self._saver.superseded if self._saver is not None else None

    @property
    def last_committed(self) -> Committed | None:
        return self._saver.last_committed if self._saver is not None else None

    @property
    def stall_seconds(self) -> float:
        return self._saver.stall_seconds if self._saver is not None else 0.0

    def wait(self) -> None:
        """Block until a background save in flight is committed or has failed."""
        if self._saver is not None:
            self._saver.wait_written()

    def close(self) -> bool:
        """Finish the save in flight; True when the newest save succeeded (or nothing was saved)."""
        return self._saver.finish() if self._saver is not None else True

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_state(state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or not state:
        raise UserError("the checkpoint state must be a non-empty dict of name -> object")
    for name in state:
        if not isinstance(name, str) or not name or not mf.safe_relative_name(name + ".safetensors") \
                or "/" in name or name.startswith("."):
            raise UserError(f"checkpoint state entry name {name!r} must be a plain name (letters, digits, _.-)")
        if name in RESERVED:
            raise UserError(f"checkpoint state entry name {name!r} is reserved (dist_train stores RNG states there)")
