"""The step-boundary vote: every rank's stop flags, combined so that all ranks stop at the same step.

The all-reduce is started at one boundary and read at the next, so it runs during a
step of compute instead of making every step wait for the slowest rank twice (once
here, once in DDP's gradient all-reduce). A stop request is therefore acted on one
step later, still at the same step on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_train.distributed.env import DistEnv


class BoundaryVote:
    def __init__(self, env: DistEnv):
        self.env = env
        self._pending: tuple[dist.Work, torch.Tensor] | None = None

    def cast(self, flags: list[int]) -> list[int] | None:
        """Send this boundary's flags; get the agreed (max) flags of the previous one, None at the first."""
        if not self.env.distributed:
            return flags
        tensor = torch.tensor(flags, dtype=torch.int64, device=self.env.collective_device)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, async_op=True)
        previous, self._pending = self._pending, (work, tensor)
        return self._collect(previous)

    def settle(self) -> list[int] | None:
        """The outcome of the vote still in flight (before the ranks leave the loop)."""
        previous, self._pending = self._pending, None
        return self._collect(previous)

    @staticmethod
    def _collect(pending: tuple[dist.Work, torch.Tensor] | None) -> list[int] | None:
        if pending is None:
            return None
        work, tensor = pending
        work.wait()
        return [int(v) for v in tensor.tolist()]
