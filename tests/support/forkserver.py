"""Client of `hooked_cli.py --serve`: run many short CLI processes without importing torch each time.

Each request is a real, separate process (forked from a server that imported everything once) running
the same `dist_train.cli.main.main` as `python -m dist_train`, with the DT_HOOK_* test hooks.
"""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "support" / "hooked_cli.py"


@dataclass
class Result:
    rc: int | None
    signal: int | None
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class ForkServer:
    def __init__(self, env: dict[str, str], workdir: Path):
        self.env = env
        self.workdir = workdir
        self.count = 0
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        ready = self.proc.stdout.readline()
        if not ready.strip():
            raise RuntimeError("fork server did not start")

    def run(self, argv: list[str], env: dict[str, str] | None = None, hooks: dict[str, str] | None = None,
            timeout: float = 60, cwd: str | Path | None = None) -> Result:
        """One CLI process with the environment `base_env(env)` plus `hooks` (DT_HOOK_* variables)."""
        from conftest import base_env

        self.count += 1
        out, err = self.workdir / f"forked-{self.count}.out", self.workdir / f"forked-{self.count}.err"
        request = {"argv": argv, "env": {**base_env(env), **(hooks or {})}, "out": str(out), "err": str(err),
                   "timeout": timeout}
        if cwd is not None:
            request["cwd"] = str(cwd)
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        return Result(answer["rc"], answer["signal"], out.read_text() if out.exists() else "",
                      err.read_text() if err.exists() else "")

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None,
              hooks: dict[str, str] | None = None) -> int:
        """Start a CLI process and return its pid at once (stdout and stderr go to `log`); see `wait`."""
        from conftest import base_env

        request = {"argv": argv, "env": {**base_env(env), **(hooks or {})}, "out": str(log), "async": True}
        return int(self._ask(request)["pid"])

    def wait(self, pid: int, timeout: float = 120) -> tuple[int | None, int | None]:
        """(exit status, signal) of a process from `start`, killed if it outlives `timeout`."""
        answer = self._ask({"wait": pid, "timeout": timeout})
        return answer["rc"], answer["signal"]

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_SHARED: ForkServer | None = None


def shared() -> ForkServer:
    """One server for the whole pytest process (started on first use, stopped at exit)."""
    global _SHARED
    if _SHARED is None or _SHARED.proc.poll() is not None:
        from conftest import base_env

        _SHARED = ForkServer(base_env(), Path(tempfile.mkdtemp(prefix="dt-forks-")))
        atexit.register(_SHARED.close)
    return _SHARED


def read_ops(path: Path) -> list[tuple[int, str, str]]:
    """The DT_HOOK_LOG of a run: (number, operation, relative path) of each mutating storage operation."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        number, operation, rel = line.split("\t")
        rows.append((int(number), operation, rel))
    return rows
