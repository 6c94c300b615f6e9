"""A `dist-train` process with storage hooks that pauses at chosen storage operations.

The test acts while the job waits (fills a disk, starts a newer attempt, changes permissions), then
releases it: exact interleavings instead of sleeps and luck. The process is forked from the shared
fork server, or, when it needs a command prefix (e.g. `setpriv` to drop capabilities), started as
`python tests/support/hooked_cli.py ...`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from support.forkserver import REPO, SCRIPT, shared


class HookedJob:
    def __init__(self, argv: list[str], workdir: Path, pauses: list[str], env: dict[str, str] | None = None,
                 prefix: list[str] | None = None):
        from conftest import PYTHON, base_env

        workdir.mkdir(parents=True, exist_ok=True)
        self.paused = workdir / "paused"
        self.release_file = workdir / "release"
        self.log_path = workdir / "job.log"
        self.log_path.touch()
        hooks = {"DT_HOOK_PAUSE": "|".join(pauses), "DT_HOOK_PAUSED": str(self.paused),
                 "DT_HOOK_RELEASE": str(self.release_file)}
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.status: int | None = None
        if prefix:
            with open(self.log_path, "w") as log:
                self.proc = subprocess.Popen([*prefix, PYTHON, str(SCRIPT), *argv], stdout=log,
                                             stderr=subprocess.STDOUT, env={**base_env(env), **hooks}, cwd=REPO,
                                             start_new_session=True)
        else:
            self.pid = shared().start(argv, self.log_path, env, hooks)

    @property
    def output(self) -> str:
        return self.log_path.read_text()

    def _exited(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is not None
        try:
            with open(f"/proc/{self.pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except OSError:
            return True

    def wait_paused(self, index: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        marker = Path(f"{self.paused}.{index}")
        while not marker.exists():
            if self._exited():
                raise AssertionError(f"job exited ({self.finish()}) before pause {index}:\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job did not reach pause {index}:\n{self.output}")
            time.sleep(0.02)

    def release(self, index: int) -> None:
        Path(f"{self.release_file}.{index}").touch()

    def finish(self, timeout: float = 120) -> int | None:
        """The exit status (None when killed by a signal)."""
        if self.status is not None or (self.proc is None and self.pid is None):
            return self.status
        if self.proc is not None:
            self.status = self.proc.wait(timeout=timeout)
        else:
            self.status, _ = shared().wait(self.pid, timeout)
            self.pid = None
        return self.status

    def kill(self) -> None:
        """Make sure nothing is left running (a no-op after `finish`)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        elif self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            shared().wait(self.pid, 30)
            self.pid = None
