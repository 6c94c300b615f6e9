"""examples/ddp_loop.py, run as a script, with one fault for tests: `HAND_LOOP_KILL_AT=STEP` makes rank 0
SIGKILL itself when the loop asks to save STEP, before anything of that save is written (the
checkpoints before it are committed; the steps since the last one are redone after a restart)."""

import os
import runpy
import signal
import sys
from pathlib import Path

from dist_train.checkpoint.manager import CheckpointManager

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_loop.py"
KILL_AT = int(os.environ.get("HAND_LOOP_KILL_AT", "0"))

if KILL_AT:
    original = CheckpointManager.save

    def save(self, step, state, **kwargs):
        if step >= KILL_AT and self.env.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, step, state, **kwargs)

    CheckpointManager.save = save

sys.argv[0] = str(EXAMPLE)
runpy.run_path(str(EXAMPLE), run_name="__main__")
