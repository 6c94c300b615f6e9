"""Trackers: TensorBoard event files next to metrics.jsonl (rank 0 only).

`--tensorboard` writes to `RUN_DIR/tensorboard/` with TensorBoard's own writer: the
train loss and learning rate at log steps, validation metrics at each validation. A
resumed run opens its writer with `purge_step` = the first step it redoes, so
TensorBoard's reader drops what an interrupted attempt logged past its checkpoint:
no step appears twice. Object stores cannot append: events are written to a local
folder and uploaded with each checkpoint commit and at the end, like metrics.jsonl.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from dist_train.checkpoint.faults import describe_error
from dist_train.checkpoint.storage import Storage

log = logging.getLogger(__name__)
FOLDER = "tensorboard"


class TensorBoardTracker:
    def __init__(self, storage: Storage, resumed_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.storage = storage
        self._remote = not storage.appendable
        if self._remote:
            self._local = tempfile.mkdtemp(prefix="dist-train-tb-")
        else:
            storage.makedirs(FOLDER)
            self._local = storage.local_path(FOLDER)
        purge = resumed_step + 1 if resumed_step is not None else None
        self.writer = SummaryWriter(self._local, purge_step=purge, flush_secs=30)

    def log(self, step: int, scalars: dict[str, float | None], prefix: str) -> None:
        for name, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def flush(self) -> None:
        """Make the events so far durable: flushed locally, uploaded for a remote run dir."""
        self.writer.flush()
        if not self._remote:
            return
        try:
            for name in sorted(os.listdir(self._local)):
                with open(os.path.join(self._local, name), "rb") as handle:
                    self.storage.write_bytes(f"{FOLDER}/{name}", handle.read())
        except Exception as exc:  # noqa: BLE001 - trackers must never stop training
            log.warning("could not upload TensorBoard events to %s: %s", self.storage.url(FOLDER),
                        describe_error(exc))

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self._remote:
            shutil.rmtree(self._local, ignore_errors=True)  # uploaded: the local folder was only staging
