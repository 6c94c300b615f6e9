"""Run attempts and fencing: a replaced (zombie) attempt can never commit over a newer one.

Each attempt registers the next generation number in `_attempts/` with a conditional
create, so two attempts can never share one. Its checkpoint folders carry that
generation in their names (no attempt writes into another's folders), and before
each commit the writer checks that no newer generation has registered.
"""

from __future__ import annotations

import json
import os
import socket
import uuid

from dist_train.checkpoint.manifest import utc_now
from dist_train.checkpoint.storage import Storage
from dist_train.errors import SupersededError

ATTEMPTS = "_attempts"


def new_writer_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


class AttemptRegistry:
    def __init__(self, storage: Storage):
        self.storage = storage

    def latest(self) -> int:
        numbers = [int(e.name[:-5]) for e in self.storage.list(ATTEMPTS)
                   if e.name.endswith(".json") and e.name[:-5].isdigit()]
        return max(numbers, default=0)

    def register(self, writer_id: str, resumed_from: str | None) -> int:
        """Claim the next generation number; conditional create makes it ours alone."""
        info = {"writer_id": writer_id, "started_at": utc_now(), "resumed_from": resumed_from}
        for _ in range(1000):
            generation = self.latest() + 1
            if self.storage.create_exclusive(f"{ATTEMPTS}/{generation:06d}.json", json.dumps(info).encode()):
                return generation
        raise SupersededError("could not claim a run attempt number (too many concurrent attempts)")

    def check_current(self, generation: int) -> None:
        newest = self.latest()
        if newest > generation:
            raise SupersededError(f"attempt {newest} has taken over this run dir; attempt {generation} "
                                  "stops without committing")
