"""One read per job: the ranks split a checkpoint's replicated files, then exchange them.

Under DDP every rank needs the same bytes (model, optimizer, trainer and RNG entries; the
small entries of a sharded checkpoint). Read on every rank, an N-rank restore pulls N
times the checkpoint from the store and hashes it N times. Here the files are planned
over the ranks (`plan`: each file to one rank, largest first to the least loaded rank, so
the split is even, disjoint and covering); each rank reads and verifies (sha256) only its
files, and broadcasts each as a uint8 tensor (on the collective device: CUDA under nccl,
the CPU under gloo) piece by piece while it lands (`pieces`, `exchange_order`), so the
exchange runs while the store still serves the rest. A verification problem on any rank is
gathered before any byte is used, so every rank raises the same `CorruptCheckpoint` and
the caller falls back to the next candidate as before; then every rank parses each file
with the same strict layout checks the direct read uses (`reader.parse_in_place`, the
tensors as views of the received buffer), so the state is bit-identical.

`choose` is the manager's restore path around it: rank 0 proposes candidates newest first
(`locate`, the resolver), every rank reads (`read`: this node's local cache first,
`read_cached`; a sharded checkpoint's shards through DCP's planner, `load_resharded`), and
all ranks agree on the one they load.

Split reads are used on stores where every byte is a network fetch (`Storage.is_local` False). On local
disk every rank reads (a warm page cache serves the second reader at memory speed, and a
broadcast would only add a copy): see docs/checkpoint-loading.md.
"""

from __future__ import annotations

import heapq
import logging
from typing import TYPE_CHECKING, Any, Collection, Sequence

import torch

from dist_train.checkpoint import catalog
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint import resolver, state
from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.reader import CorruptCheckpoint, LoadedFile, parse_in_place, read_bytes
from dist_train.checkpoint.state import Payload
from dist_train.checkpoint.storage import Storage
from dist_train.distributed.env import DistEnv
from dist_train.errors import UserError

if TYPE_CHECKING:
    from dist_train.checkpoint.manager import Check, CheckpointManager

log = logging.getLogger("dist_train.checkpoint.manager")  # the resume lines keep the logger they always had
PIECE = 16 * 2**20  # a broadcast: one ranged GET (reader.REMOTE_RANGE); what is left after the last byte lands


def plan(sizes: dict[str, int], world_size: int, loads: Sequence[int] = ()) -> dict[str, int]:
    """Owner rank of each file: largest first to the least-loaded rank (ties: lowest rank), deterministic.

    Every rank computes the same plan from the manifest, so no plan is exchanged. `loads`: bytes
    each rank already has to read (files given to it otherwise), zero by default.
    """
    loads = [(loads[rank] if rank < len(loads) else 0, rank) for rank in range(max(1, world_size))]
    heapq.heapify(loads)
    owners: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        load, rank = heapq.heappop(loads)
        owners[name] = rank
        heapq.heappush(loads, (load + sizes[name], rank))
    return owners


def should_split(env: DistEnv, folder: Storage) -> bool:
    """Split the reads: several ranks in a process group, and a store where each byte is fetched."""
    return env.world_size > 1 and env.backend is not None and not folder.is_local


def exchange_order(sizes: dict[str, int], owners: dict[str, int], names: Sequence[str],
                   piece: int = PIECE) -> list[tuple[str, int, int]]:
    """The pieces (file, begin, end) in the order they cross the network, the same on every rank: by when
    their reader has them (the bytes its rank has read up to the piece's end, each rank reading its files
    in `names` order; ties: lower owner rank). The ranks read side by side at about the same rate, so
    each rank's pieces go out as they land, interleaved with the others': no file waits for another
    rank to finish its reading (collectives match by call order, so the order must be shared)."""
    order: list[tuple[int, int, str, int, int]] = []
    read_by: dict[int, int] = {}
    for name in names:
        owner = owners[name]
        base = read_by.get(owner, 0)
        order += [(base + end, owner, name, begin, end) for begin, end in pieces(sizes[name], piece)]
        read_by[owner] = base + sizes[name]
    order.sort(key=lambda p: (p[0], p[1]))  # stable: a rank's pieces keep its reading order
    return [(name, begin, end) for _, _, name, begin, end in order]


def pieces(size: int, piece: int = PIECE) -> list[tuple[int, int]]:
    """The byte ranges a file crosses the network in (the same on every rank; one when it is small)."""
    return [(begin, min(size, begin + piece)) for begin in range(0, size, piece)] or [(0, 0)]


def read_files_split(env: DistEnv, folder: Storage, manifest: dict[str, Any], names: Sequence[str],
                     verify_sha: bool, trees: Collection[str] = ()) -> dict[str, LoadedFile]:
    """`reader.read_files`, with each file read once per job (collective: every rank calls it alike).

    The reader of a file broadcasts it piece by piece (asynchronously) as the pieces land, in the
    shared `exchange_order`, while it goes on reading and the other ranks read theirs: the network
    carries the checkpoint while the store still serves it, and what is left when the last byte
    arrives is about one piece. Every rank receives straight into one buffer per file (the reader
    reads straight into the buffer it sends). The bytes are used (parsed, as views of that buffer:
    `reader.parse_in_place`) only after every rank's verdict is known. A rank that met a problem
    still sends every piece it owes (whatever its buffer holds), so the collectives stay matched,
    and reads nothing more.
    """
    import torch.distributed as dist

    files = manifest.get("files") or {}
    missing = [name for name in names if name not in files]
    if missing:
        raise CorruptCheckpoint(f"manifest does not list {missing[0]}")
    sizes = {name: int(files[name]["size"]) for name in names}
    owners = plan(sizes, env.world_size)
    device = env.collective_device
    on_host = device.type == "cpu"
    mine = [name for name in names if owners[name] == env.rank]
    hosts = {name: torch.empty(sizes[name], dtype=torch.uint8) for name in mine}
    buffers = {name: hosts[name] if name in hosts and on_host else torch.empty(sizes[name], dtype=torch.uint8,
                                                                                 device=device) for name in names}
    order = exchange_order(sizes, owners, names, PIECE)
    landed = {name: 0 for name in mine}  # bytes of each of this rank's files read so far (in order)
    works: list[Any] = []
    cursor = 0

    def post() -> None:
        """Every piece up to the next one this rank has not read yet (receives are posted at once)."""
        nonlocal cursor
        while cursor < len(order):
            name, begin, end = order[cursor]
            if name in landed:
                if landed[name] < end:
                    return
                if not on_host:
                    buffers[name][begin:end].copy_(hosts[name][begin:end])
            works.append(dist.broadcast(buffers[name][begin:end], src=owners[name], async_op=True))
            cursor += 1

    def progress(name: str, upto: int) -> None:
        landed[name] = upto
        post()

    post()
    problem = None
    for name in mine:  # in `names` order: the first problem is the one a direct read reports
        if problem is None:
            try:
                read_bytes(folder, manifest, name, verify_sha, into=hosts[name].numpy(),
                           progress=lambda upto, name=name: progress(name, upto))
            except CorruptCheckpoint as exc:
                problem = str(exc)
            except Exception as exc:  # noqa: BLE001 - unreadable: the checkpoint is skipped on every rank
                problem = f"unreadable ({describe_error(exc)})"
        progress(name, sizes[name])  # what was not sent yet (all of it after a problem): the peers wait for it
    post()
    for work in works:
        work.wait()
    problems = [p for p in env.all_gather_objects(problem) if p]
    if problems:  # known to every rank before any byte is used
        raise CorruptCheckpoint(problems[0])
    out: dict[str, LoadedFile] = {}
    for name in names:
        buffer = buffers.pop(name)
        out[name] = parse_in_place(files[name], name, buffer if buffer.device.type == "cpu" else buffer.cpu(),
                                   name in trees)
    return out


def read_payload(env: DistEnv, folder: Storage, manifest: dict[str, Any], verify_sha: bool = True,
                 skip: tuple[str, ...] = ()) -> Payload:
    """`state.read_payload` for every rank of a job at once: split reads where they pay, else a direct read."""
    if not should_split(env, folder):
        return state.read_payload(folder, manifest, verify_sha=verify_sha, skip=skip)
    names = [name for name in state.entry_names(manifest) if name not in skip]
    files = read_files_split(env, folder, manifest, [state.file_name(name) for name in names], verify_sha,
                             trees={state.file_name(name) for name in names if name != state.MODEL})
    loaded = {name: files[state.file_name(name)] for name in names}
    return Payload(manifest, {name: f.tensors if name == state.MODEL else f.tree for name, f in loaded.items()})


def warm_up(env: DistEnv, storage: Storage) -> None:
    """On ranks other than 0, open this process's connection to the store in the background (one cheap
    request), while rank 0 lists the run dir and proposes a candidate.

    The S3 client and its connection are made at a process's first request: ~0.1-0.17 s here
    (SeaweedFS on loopback). Rank 0 pays it in its listing; without this every other rank pays it
    again at its first ranged GET of a split read, after the candidate is known: on the 2-rank
    restore's critical path, about 15% of a 1 s restore (docs/checkpoint-loading.md). No data byte
    is read (a HEAD of a name that does not exist); a failure is left to the real reads to report.
    """
    if env.world_size <= 1 or env.is_rank0 or storage.is_local:
        return
    import threading

    def touch() -> None:
        try:
            storage.exists(".dist-train-warm-up")
        except Exception:  # noqa: BLE001 - only a warm-up: the reads that follow report any trouble
            pass

    threading.Thread(target=touch, name="ckpt-warm-up", daemon=True).start()


# -- choosing the checkpoint to restore (the manager's restore path) ---------------------------------

def choose(mgr: "CheckpointManager", source: str, check: "Check | None") -> Payload | None:
    """Rank 0 proposes candidates newest first; every rank reads and verifies; all agree (collective)."""
    env = mgr.env
    warm_up(env, mgr.storage)  # the other ranks' first request to the store, while rank 0 lists
    error, located = None, None
    if env.is_rank0:
        try:
            located = locate(mgr, source)
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
        problem, payload, verdicts = _read_candidate(mgr, url, manifest, shares_cached=True)
        if any(served for _, _, served in verdicts) and any(p for p, _, _ in verdicts):
            # a node's cached share may be what failed: the run dir decides, never a cache
            if env.is_rank0:
                log.warning("reading %s again from the run dir, without the local cache", url)
            problem, payload, verdicts = _read_candidate(mgr, url, manifest, shares_cached=False)
        problems = [p for p, _, _ in verdicts if p]
        if not problems:
            if mgr.cache is not None and env.world_size > 1:
                cached = [rank for rank, (_, hit, _) in enumerate(verdicts) if hit]
                log.info("local cache: %s", "every rank read its node's copy" if len(cached) == env.world_size
                         else f"ranks {cached} read their node's copy, the others the run dir" if cached
                         else "no rank had a copy; read the run dir")
            log.info("resuming from %s (step %d, epoch %d)", url, manifest["step"], manifest["epoch"])
            mgr.resumed_url = url
            return payload
        if located is not None and located.explicit or source not in ("auto", "never"):
            env.agree(f"--resume {url} is not a valid checkpoint: {problems[0]}")
        if env.is_rank0:
            resolver.log_skip(catalog.Verdict(catalog.CheckpointRef(0, 0, url), url, False, problems[0]))
            corrupt = [p for p in problems if not p.startswith("unreadable (")]  # bytes, not the store
            if corrupt:
                resolver.mark_corrupt(located, url, corrupt[0])  # not history: retention deletes it first


def _read_candidate(mgr: "CheckpointManager", url: str, manifest: dict[str, Any],
                    shares_cached: bool) -> tuple[str | None, Payload | None, list[Any]]:
    """This rank's reading of a candidate, and every rank's verdict: (problem, read whole from the node's
    cache, read any file from it) per rank (collective)."""
    env = mgr.env
    problem, payload, served = None, None, set()
    mgr.restored_from_cache = False
    try:
        payload = None if mgr._resharding(manifest) else read_cached(mgr, url, manifest)
        folder: Any = Storage(url, mgr.options)
        if shares_cached and _caches_shares_of(mgr, manifest):
            folder, served = cached_shares(mgr, url, manifest, folder)
        if should_split(env, folder):  # the split read is collective: all ranks take part if one needs it
            if any(env.all_gather_objects(payload is None)):
                fresh = read(mgr, folder, manifest)
                payload = payload if payload is not None else fresh
        elif payload is None:
            payload = read(mgr, folder, manifest)
    except CorruptCheckpoint as exc:
        problem = str(exc)
    except Exception as exc:  # noqa: BLE001 - unreadable: treat as invalid, try the next
        problem = f"unreadable ({describe_error(exc)})"
    if problem and served:
        name = catalog.folder_name(url)
        log.warning("local cache: dropped this rank's cached files of %s (%s)", name, problem)
        mgr.cache.discard_files(name, served)
    return problem, payload, env.all_gather_objects((problem, mgr.restored_from_cache, bool(served)))


def _caches_shares_of(mgr: "CheckpointManager", manifest: dict[str, Any]) -> bool:
    """A sharded checkpoint of this world size, a local cache, hashes checked: read shares from the cache.

    The same on every rank (flags and manifest), so all ranks take the same (collective) path."""
    from dist_train.checkpoint.sharded import SHARDED_FIELD, is_sharded

    return (mgr.cache is not None and mgr.verify == "sha256" and is_sharded(manifest)
            and (manifest.get(SHARDED_FIELD) or {}).get("world_size") == mgr.env.world_size)


def cached_shares(mgr: "CheckpointManager", url: str, manifest: dict[str, Any],
                  run_dir: Storage) -> tuple[Any, set[str]]:
    """The folder a same-size sharded restore reads: the files this rank reads and verifies (its own
    shards, its part of the small entries) from its node's cache where held, the rest from the run dir."""
    from dist_train.checkpoint.dcp import files_to_load
    from dist_train.checkpoint.index import verifiers
    from dist_train.checkpoint.local_cache import CacheOverlay

    env = mgr.env
    files = manifest["files"]
    shards = files_to_load(manifest)
    mine = [n for n, rank in verifiers(manifest, shards, env.world_size).items() if rank == env.rank]
    small = [state.file_name(n) for n in state.entry_names(manifest) if n not in ("model", "optimizer")]
    owners = plan({n: int(files[n]["size"]) for n in small}, env.world_size)
    mine += [n for n in small if owners[n] == env.rank]
    name = catalog.folder_name(url)
    overlay = mgr.cache.overlay(name, manifest, run_dir, sorted(mine))
    if overlay is None:
        return CacheOverlay(run_dir, run_dir, set()), set()
    mgr.restored_from_cache = overlay.served == set(mine)
    if mgr.restored_from_cache:
        log.info("reading this rank's share of %s from the local cache %s (verified against the run dir's "
                 "manifest)", name, mgr.cache.folder)
    return overlay, set(overlay.served)


def load_resharded(mgr: "CheckpointManager", state: dict[str, Any], payload: Payload) -> tuple[str, ...]:
    """Model (and optimizer) through DCP's planner: any saved world size or layout into this one."""
    from dist_train.checkpoint.dcp import load_state
    from dist_train.checkpoint.manager import unwrap

    optimizer = state.get("optimizer")
    load_state(mgr.env, payload.folder, payload.manifest, unwrap(state["model"]), optimizer, verify_sha=False)
    return ("model", "optimizer") if optimizer is not None else ("model",)


def read(mgr: "CheckpointManager", folder: Storage, manifest: dict[str, Any]) -> Payload:
    """This rank's reading of a candidate: whole entries, and (resharding) its share of the shards' hashes."""
    if not mgr._resharding(manifest):
        return read_payload(mgr.env, folder, manifest, verify_sha=mgr.verify == "sha256")
    from dist_train.checkpoint.dcp import files_to_load
    from dist_train.checkpoint.index import verify_share

    if mgr.verify == "sha256":
        problem = verify_share(folder, manifest, mgr.env.rank, mgr.env.world_size, files_to_load(manifest))
        if problem:
            raise CorruptCheckpoint(problem)
    payload = read_payload(mgr.env, folder, manifest, verify_sha=mgr.verify == "sha256",
                                 skip=("model", "optimizer"))
    payload.folder = folder
    return payload


def read_cached(mgr: "CheckpointManager", url: str, manifest: dict[str, Any]) -> Payload | None:
    """This node's cached copy of the chosen checkpoint, verified while read; None: read the run dir."""
    name = catalog.folder_name(url)
    folder = mgr.cache.lookup(name, manifest) if mgr.cache is not None else None
    if folder is None:
        return None
    try:
        payload = state.read_payload(folder, manifest, verify_sha=True)
    except Exception as exc:  # noqa: BLE001 - a damaged cache is ignored, never trusted
        log.warning("local cache: ignored %s (%s); reading the run dir", name, describe_error(exc))
        mgr.cache.discard(name)
        return None
    log.info("resuming from the local cache %s (verified against %s)", folder.display_url, url)
    mgr.restored_from_cache = True
    return payload


def locate(mgr: "CheckpointManager", source: str) -> resolver.Located | None:
    if source in ("auto", "never"):
        refs = catalog.newest_first(catalog.list_checkpoints(mgr.storage))
        if source == "never":
            committed = [r for r in refs if mgr.storage.exists(f"{r.name}/{mf.MANIFEST}")]
            if committed:
                raise UserError(
                    f"run dir {mgr.storage.display_url} already holds {len(committed)} checkpoint(s) "
                    f"(newest {committed[0].name}); --resume never would start over beside them. "
                    "Use --resume auto to continue, or a new --run-dir")
            return None
        return resolver.Located(mgr.storage, refs, explicit=False)
    return resolver.locate(source, mgr.options, what="--resume")
