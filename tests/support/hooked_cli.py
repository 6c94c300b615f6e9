"""The real `dist-train` CLI with test hooks on `Storage`: log, pause at, or SIGKILL at a storage operation.

    python tests/support/hooked_cli.py train --run-dir ...      # hooks from DT_HOOK_* variables
    python tests/support/hooked_cli.py --serve                  # fork server (see below)

Variables (every mutating storage operation is numbered from 1 in the order it starts):
  DT_HOOK_LOG=FILE      append "N<TAB>operation<TAB>relative path" for each operation before it runs
  DT_HOOK_KILL_AT=N     SIGKILL this process just before operation N
  DT_HOOK_KILL_MID=1    ...or, when operation N writes a local file, after its first chunk reached the file
  DT_HOOK_PAUSE=GLOB[|GLOB...]   at the first operation whose "operation:path" matches the K-th GLOB
                        (K from 0), touch DT_HOOK_PAUSED.K and wait, before running it, until
                        DT_HOOK_RELEASE.K exists
  DT_HOOK_FAIL=GLOB     raise OSError (ENOSPC, "injected") at the first operation matching GLOB, once
  DT_HOOK_RANK=R        under torchrun (RANK set): kill, pause and fail act only on rank R
  DT_HOOK_COLLECTIVES=1 also number a sharded save's collectives (`ShardedSaver._gather`/`_broadcast`) as
                        operations "gather"/"broadcast" on "sharded", so a kill can land just before them
  DT_HOOK_RESTORE_LOG=FILE  after each `CheckpointManager.restore` that loaded a checkpoint, rank 0 appends
                        {"step", "world_size", "digest"} (`parallel.model_digest` of the model as loaded,
                        computed by every rank: collective under FSDP) as one JSON line
With WORLD_SIZE > 1 every rank numbers its own operations and writes DT_HOOK_LOG to FILE.rank<R>.

`--serve` imports torch and dist_train once, then reads one JSON request a line on stdin
({"argv": [...], "env": {...}, "out": FILE, "err": FILE, "timeout": S}) and answers each with one JSON line
({"rc": exit status or null, "signal": signal number or null}) after running the request in a
forked child: the same CLI code in a fresh process, without paying the import each time. With
"async": true the answer is {"pid": N} at once, and {"wait": N} later gives the exit status.
"""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def install_hooks() -> None:
    from dist_train.checkpoint import storage as storage_mod

    log_path = os.environ.get("DT_HOOK_LOG")
    kill_at = int(os.environ.get("DT_HOOK_KILL_AT") or 0)
    kill_mid = os.environ.get("DT_HOOK_KILL_MID") == "1"
    pauses = [p for p in (os.environ.get("DT_HOOK_PAUSE") or "").split("|") if p]
    paused_file, release_file = os.environ.get("DT_HOOK_PAUSED"), os.environ.get("DT_HOOK_RELEASE")
    fail = os.environ.get("DT_HOOK_FAIL")
    if os.environ.get("DT_HOOK_RESTORE_LOG"):
        _log_restores(os.environ["DT_HOOK_RESTORE_LOG"])
    if not (log_path or kill_at or pauses or fail):
        return
    rank = os.environ.get("RANK")
    if log_path and rank is not None and int(os.environ.get("WORLD_SIZE") or 1) > 1:
        log_path = f"{log_path}.rank{rank}"
    if os.environ.get("DT_HOOK_RANK") not in (None, "", rank):  # faults for another rank: only log here
        kill_at, kill_mid, pauses, fail = 0, False, [], None
    state = {"n": 0, "armed": False, "paused": set(), "failed": False}

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    counter = threading.Lock()  # object-store uploads run side by side: count every operation once

    def hook(operation: str, rel: str) -> None:
        with counter:
            state["n"] += 1
            number = state["n"]
            if log_path:
                with open(log_path, "a") as handle:
                    handle.write(f"{number}\t{operation}\t{rel}\n")
        for index, pattern in enumerate(pauses):
            if index not in state["paused"] and fnmatch.fnmatch(f"{operation}:{rel}", pattern):
                state["paused"].add(index)
                open(f"{paused_file}.{index}", "w").close()
                while not os.path.exists(f"{release_file}.{index}"):
                    time.sleep(0.02)
        if number == kill_at:
            if kill_mid and operation == "write":
                state["armed"] = True  # the chunk wrapper below kills once data reached the file
            else:
                die()
        if fail and not state["failed"] and fnmatch.fnmatch(f"{operation}:{rel}", fail):
            state["failed"] = True
            raise OSError(28, "No space left on device (injected)", rel)

    original_write = storage_mod.Storage.write

    def write(self, rel, chunks, size):
        if not (kill_mid and isinstance(self, storage_mod.LocalStorage)):
            return original_write(self, rel, chunks, size)

        def watched():
            for index, chunk in enumerate(chunks):
                if index == 1 and state["armed"]:
                    die()
                yield chunk
            if state["armed"]:
                die()  # a one-chunk file: all of it written, never fsynced or closed
        return original_write(self, rel, watched(), size)

    storage_mod.Storage.write = write
    storage_mod.Storage.hooks.append(hook)
    if os.environ.get("DT_HOOK_COLLECTIVES") == "1":
        from dist_train.checkpoint.sharded import ShardedSaver

        for name, operation in (("_gather", "gather"), ("_broadcast", "broadcast")):
            original = getattr(ShardedSaver, name)

            def collective(self, obj, _original=original, _operation=operation):
                hook(_operation, "sharded")
                return _original(self, obj)
            setattr(ShardedSaver, name, collective)


def _log_restores(path: str) -> None:
    """DT_HOOK_RESTORE_LOG: the digest of the model right after each restore that loaded a checkpoint."""
    from dist_train.checkpoint.manager import CheckpointManager
    from dist_train.distributed import parallel

    original = CheckpointManager.restore

    def restore(self, state, **kwargs):
        step = original(self, state, **kwargs)
        if step is not None:
            digest = parallel.model_digest(state["model"])  # every rank: collective under FSDP
            if self.env.is_rank0:
                with open(path, "a") as handle:
                    handle.write(json.dumps({"step": step, "world_size": self.env.world_size,
                                             "digest": digest}) + "\n")
        return step
    CheckpointManager.restore = restore


def run_cli(argv: list[str]) -> int:
    from dist_train.cli.main import main

    install_hooks()
    return int(main(argv) or 0)


def _child(request: dict) -> None:
    """In the forked child: become the requested process, run the CLI, never return."""
    rc = 1
    try:
        os.setpgid(0, 0)
        os.environ.clear()
        os.environ.update(request["env"])
        # what a fresh interpreter makes of PYTHONPATH (a user's package beside the job)
        for entry in reversed([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        for target, path in ((1, request["out"]), (2, request.get("err") or request["out"])):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request.get("cwd") or REPO)
        try:
            rc = run_cli(request["argv"])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001 - what the interpreter would print
            import traceback
            traceback.print_exc()
            rc = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(rc)


def serve() -> None:
    # Everything a job imports, loaded once before forking (no threads are started by imports).
    import dist_train.cli.main  # noqa: F401
    import dist_train.cli.ckpt  # noqa: F401
    import dist_train.cli.train  # noqa: F401
    import dist_train.training.job  # noqa: F401
    import dist_train.data.datasets  # noqa: F401
    import s3fs  # noqa: F401
    import sklearn.datasets  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401 - every optimizer imports it on first use (seconds of CPU)
    import torchvision  # noqa: F401

    torch.set_num_threads(1)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "wait" in request:  # the end of an earlier {"async": true} request
            print(json.dumps(_wait(int(request["wait"]), float(request.get("timeout", 60)))), flush=True)
            continue
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        if request.get("async"):
            print(json.dumps({"pid": pid}), flush=True)
            continue
        print(json.dumps(_wait(pid, float(request.get("timeout", 60)))), flush=True)


def _wait(pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"rc": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None,
                    "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        status = run_cli(sys.argv[1:])
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            # as the real entry point (dist_train.cli.main.run): a torchrun worker leaves with os._exit,
            # else gloo's C++ destructors at interpreter exit abort now and then ("terminate called")
            from dist_train.errors import exit_now
            exit_now(status)
        raise SystemExit(status)
