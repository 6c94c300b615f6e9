"""Process-group setup from torchrun's environment, and the few collectives the job needs.

The rest of the code asks a `DistEnv` (rank, world size, device) and never reads
`os.environ` itself. Without torchrun (no `RANK` in the environment) the job runs
as one process with world size 1 and no process group.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @classmethod
    def current(cls) -> "DistEnv":
        """This process's place in an already initialized process group (or a single process).

        For library use (a hand-written loop that called `init_process_group` itself).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return cls(0, 1, 0, torch.device("cpu"), None)
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def local_world_size(self) -> int:
        """Ranks on this node (torchrun's LOCAL_WORLD_SIZE); fewer than `world_size` in a multi-node job."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)) if self.distributed else 1

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s object on every rank (rank 0 decides, the others follow)."""
        if not self.distributed:
            return obj
        holder = [obj if self.rank == src else None]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's object, in rank order, on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_rank0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather_objects(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum of each value over all ranks, in float64 so counts stay exact."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.collective_device)
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_reduce_max(self, values: list[int]) -> list[int]:
        tensor = torch.tensor(values, dtype=torch.int64, device=self.collective_device)
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [int(v) for v in tensor.tolist()]

    def agree(self, error: str | None) -> None:
        """Every rank raises the same UserError when any rank found one (collective)."""
        from dist_train.errors import UserError

        errors = [e for e in self.all_gather_objects(error) if e]
        if errors:
            raise UserError(errors[0])

    def on_every_rank(self, action: Callable[[], Any]) -> Any:
        """Run `action` on every rank; a UserError on any rank stops them all with the same line."""
        from dist_train.errors import UserError

        result, error = None, None
        try:
            result = action()
        except UserError as exc:
            error = str(exc)
        self.agree(error)
        return result

    @property
    def collective_device(self) -> torch.device:
        """nccl only moves CUDA tensors; gloo and single-process use the CPU."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def torchrun_launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


_AGENT_WATCHED = False


def stop_with_agent(poll_s: float = 0.5, agent: int | None = None) -> None:
    """A worker whose torchrun agent died stops as if preempted (SIGTERM to itself).

    torchrun starts every worker in a session of its own, so an agent killed with SIGKILL (OOM
    killer, `kill -9`, a lost container) leaves its workers training and writing checkpoints
    into a run dir a restarted job may already own. A daemon thread notices the parent pid
    change and sends this process SIGTERM: while training that is the preemption path (commit
    at the next step boundary, exit 75, or exit at the deadline), before and after it the
    default (exit at once). Not `PR_SET_PDEATHSIG`: it fires when the *thread* that forked the
    worker exits (torch 2.14 forks from the agent's run thread, but an agent run from a
    short-lived thread would stop healthy workers) and is Linux-only; torch's DataLoader workers
    watch their parent the same way. Only under torch's elastic agent (`TORCHELASTIC_RUN_ID`):
    workers started by hand with RANK/WORLD_SIZE may legitimately outlive a launching shell.

    `agent`: the parent pid as the process saw it first (the CLI reads it before importing torch),
    so an agent killed during the worker's start-up is noticed too; default: the parent now.
    """
    global _AGENT_WATCHED
    if not torchrun_launched() or "TORCHELASTIC_RUN_ID" not in os.environ or _AGENT_WATCHED:
        return  # one watch a process (the CLI starts it, and every CheckpointManager asks for it)
    _AGENT_WATCHED = True
    import signal
    import threading
    import time

    agent = os.getppid() if agent is None else agent

    def watch() -> None:
        while os.getppid() == agent:
            time.sleep(poll_s)
        log.warning("the torchrun agent (pid %d) is gone: stopping this worker as if preempted", agent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="agent-watch", daemon=True).start()


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from dist_train.errors import UserError
            raise UserError("--device cuda was asked for but CUDA is not available on this machine")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU), or run as one process."""
    if not torchrun_launched():
        return DistEnv(0, 1, 0, _pick_device(device, 0), None)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = _pick_device(device, local_rank)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if backend == "nccl":
        kwargs["device_id"] = torch_device
    dist.init_process_group(**kwargs)
    return DistEnv(rank, world_size, local_rank, torch_device, backend)


def teardown(env: DistEnv | None) -> None:
    if env is not None and env.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[DistEnv]:
    """The process group for the length of a job; always torn down, also on errors."""
    env = init_distributed(device)
    try:
        yield env
    except Exception as exc:
        if env.distributed and peer_lost(exc):
            leave_after_lost_peer(env, exc)
        raise
    finally:
        teardown(env)


PEER_LOST = ("closed by peer", "reset by peer", "Broken pipe", "remote process exited")


def peer_lost(exc: BaseException) -> bool:
    """A collective failed because another rank's process is gone (it failed first, or was killed)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("gloo" in text or "NCCL" in text) and any(p in text for p in PEER_LOST)


def leave_after_lost_peer(env: DistEnv, exc: BaseException) -> None:
    """Stop the way torchrun stops the survivors of a failed worker: by SIGTERM, with one line, no traceback.

    Once one worker exits (a rank that found bad input alone exits 2), torch's agent terminates
    the others; but a peer waiting in a collective sees the closed connection first and would
    crash with a traceback and exit 1, and the launcher would report a crash instead of the
    first worker's status. Dying of the agent's signal ourselves makes the outcome the same
    whichever comes first. Only under torch's elastic agent (which stops the rest anyway).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import signal
    import time

    from dist_train.errors import exit_now, printable

    detail = " ".join(str(exc).split())
    detail = detail.split("] ", 1)[1] if detail.startswith("[") and "] " in detail else detail  # gloo's source line
    log.error("stopping: another rank's process is gone (its own error is above): %s", printable(detail, 100))
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not keep us here
            pass
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the signal is delivered at once; this is not reached unless SIGTERM is blocked
    exit_now(1)


def configure_logging(env: DistEnv, level: int = logging.INFO) -> None:
    """Rank 0 logs at `level`; other ranks only warnings and errors, tagged with their rank."""
    prefix = "" if env.world_size == 1 else f"[rank {env.rank}] "
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("dist_train")
    root.handlers[:] = [handler]
    root.setLevel(level if env.is_rank0 else logging.WARNING)
    root.propagate = False
