"""A real `dist-train` process (via `hooked_cli.py`) that pauses at chosen storage operations.

The test acts while the job waits (fills a disk, starts a newer attempt, changes permissions), then
releases it: exact interleavings instead of sleeps and luck.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from support.forkserver import REPO, SCRIPT


class HookedJob:
    def __init__(self, argv: list[str], workdir: Path, pauses: list[str], env: dict[str, str] | None = None,
                 prefix: list[str] | None = None):
        from conftest import PYTHON, base_env

        workdir.mkdir(parents=True, exist_ok=True)
        self.paused = workdir / "paused"
        self.release_file = workdir / "release"
        self.log_path = workdir / "job.log"
        full_env = base_env(env)
        full_env.update({"DT_HOOK_PAUSE": "|".join(pauses), "DT_HOOK_PAUSED": str(self.paused),
                         "DT_HOOK_RELEASE": str(self.release_file)})
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([*(prefix or []), PYTHON, str(SCRIPT), *argv], stdout=log,
                                         stderr=subprocess.STDOUT, env=full_env, cwd=REPO, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log_path.read_text()

    def wait_paused(self, index: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        marker = Path(f"{self.paused}.{index}")
        while not marker.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"job exited ({self.proc.returncode}) before pause {index}:\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job did not reach pause {index}:\n{self.output}")
            time.sleep(0.02)

    def release(self, index: int) -> None:
        Path(f"{self.release_file}.{index}").touch()

    def finish(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait()
