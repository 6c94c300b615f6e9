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

from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint import restore
from dist_train.checkpoint.fencing import AttemptRegistry, new_writer_id
from dist_train.checkpoint.local_cache import LocalCache
from dist_train.checkpoint.retention import RetentionPolicy
from dist_train.checkpoint.saver import Checkpointer
from dist_train.checkpoint.state import Payload, Snapshot, SnapshotBuffers, to_cpu_tree
from dist_train.checkpoint.storage import Storage
from dist_train.checkpoint.writer import CheckpointWriter, Committed, clean_stale
from dist_train.determinism import restore_rng_state
from dist_train.distributed.env import DistEnv, stop_with_agent
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
        stop_with_agent()  # a hand-written loop's workers, too, stop when their torchrun agent dies
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
        self._saved_reason: str | None = None  # of the newest save, named when a second save of its step is skipped
        self.cache = LocalCache(local_cache, self.storage.display_url, local_cache_keep) if local_cache else None
        self.restored_from_cache = False

    @classmethod
    def from_config(cls, config: Any, env: DistEnv | None = None, *, writers: str | None = None,
                    **overrides: Any) -> "CheckpointManager":
        """The manager a `CheckpointConfig` (the `--run-dir`, `--keep-*`, `--local-cache` ... flags) describes.

        `writers`: rank0 or all (the trainer resolves --checkpoint-writers against the parallelism);
        `overrides`: any other constructor argument (on_commit, max_consecutive_failures).
        """
        return cls(config.run_dir, config.keep_last, config.async_checkpoint, config.storage_options,
                   keep_best=config.keep_best, keep_every=config.keep_every, verify=config.verify, env=env,
                   strict_fencing=config.strict_fencing, local_cache=config.local_cache,
                   local_cache_keep=config.local_cache_keep,
                   writers=writers or config.checkpoint_writers or "rank0", **overrides)

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
        return restore.choose(self, source, check)

    def _load_resharded(self, state: dict[str, Any], payload: Payload) -> tuple[str, ...]:
        return restore.load_resharded(self, state, payload)

    def _resharding(self, manifest: dict[str, Any]) -> bool:
        """Model and optimizer go through DCP's planner (resharded): a sharded checkpoint, or an FSDP model."""
        from dist_train.checkpoint.sharded import is_sharded
        return is_sharded(manifest) or self._fsdp_target

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
            if self.cache is not None:  # every rank of a node adds its share: the node's leader claims it first
                if env.local_rank == 0:
                    self.cache.claim()
                env.barrier()
        self._saver = Checkpointer(env, self.storage, writer, self.policy, self.async_save,
                                   self.max_consecutive_failures, self._committed, commit,
                                   node_copy=self._node_copy if self._leads_a_cached_node() else None,
                                   rng_everywhere=self._caches_every_node() or self._caches_shares_on_many_nodes(),
                                   share_committed=self._cache_share if self._caches_shares() else None)
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

        if self._saver.last_step == step:  # one checkpoint a step: the first save's reason stays in its manifest
            if self.env.is_rank0:
                log.info("save(step %d, reason %r) writes nothing: step %d was saved already (%s)", step, reason,
                         step, f"reason {self._saved_reason!r}" if self._saved_reason else "the checkpoint resumed from")
            return
        self._saved_reason = reason
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
        if self.env.is_rank0 or (self._caches_shares() and self.env.local_rank == 0):  # the node's cached copy
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

    def _caches_every_node(self) -> bool:
        """A multi-node job whose checkpoints rank 0 writes whole: every node keeps its own cached copy."""
        return self.cache is not None and self.writers == "rank0" and self.env.local_world_size < self.env.world_size

    def _caches_shares(self) -> bool:
        """A sharded checkpoint (every rank writes its share) with a local cache: each rank caches its share."""
        return self.cache is not None and self.writers == "all"

    def _caches_shares_on_many_nodes(self) -> bool:
        """Every node's leader needs every rank's RNG state for its copy of the small entries."""
        return self._caches_shares() and self.env.local_world_size < self.env.world_size

    def _cache_share(self, committed: Committed, snap: Snapshot) -> None:
        """This rank's shard files into its node's copy; the node's leader adds the small whole entries."""
        files: dict[str, Any] = dict(snap.shard.files()) if snap.shard is not None else {}
        leader = self.env.local_rank == 0
        if leader:
            files.update(snap.files())
        self.cache.store_share(committed.name, files, prune=leader)

    def _leads_a_cached_node(self) -> bool:
        return self._caches_every_node() and self.env.local_rank == 0 and not self.env.is_rank0

    def _node_copy(self, snap: Snapshot) -> None:
        """This node's cached copy, from this rank's replica (the commit may still be in flight: one spare)."""
        from dist_train.checkpoint.catalog import checkpoint_name

        self.cache.store(checkpoint_name(self.generation, snap.step), snap.files(), spare=1)

    def _committed(self, committed: Committed, snap: Snapshot) -> None:
        if self.cache is not None and not self._caches_shares():
            self.cache.store(committed.name, snap.files())
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
