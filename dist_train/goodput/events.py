"""The per-attempt goodput record: timestamped phase events in `RUN_DIR/_goodput/`, written by rank 0.

Why a record of its own and not metrics.jsonl: metrics drop the lines of steps a
resumed attempt redoes (so curves show each step once), but the cost of that redone
work is exactly what goodput accounting needs; and a killed attempt must leave its
record up to its last few seconds.

Local run dirs: one file per attempt, `_goodput/g000003.jsonl`, each event appended
and flushed at once. Object stores cannot append: the events since the last flush go
up as a small object per flush, `_goodput/g000003-000012.jsonl` (attempt, segment),
at most every `FLUSH_SECONDS`, at each checkpoint and at exit; so a SIGKILLed attempt
loses at most the last few seconds. Events (one JSON object a line, `e` names it;
times are `time.time()` seconds):

  start    {t: process start, world, pid}          restore {t0, t1, step, from}
  steps    {s: [[step, t0, t1, data_wait], ...]}   ckpt    {step, t0, t1, reason}   (training-thread stall)
  commit   {step, t}                                notice  {t}
  interval {t, ...inputs}                           alive   {t}
  exit     {t, reason: finished|preempted|failed|superseded}
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import threading
import time
from typing import Any

from dist_train.checkpoint.faults import describe_error

log = logging.getLogger(__name__)
FOLDER = "_goodput"
FLUSH_SECONDS = 2.0
_IMPORTED_AT = time.time()


def process_start_time() -> float:
    """When this process started (from /proc where there is one; else when dist_train was imported)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime: clock ticks after boot (field 22 of stat)
        with open("/proc/uptime", encoding="ascii") as handle:
            uptime = float(handle.read().split()[0])
        started = time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
        return min(started, _IMPORTED_AT)
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT


def attempt_file(generation: int, segment: int | None = None) -> str:
    if segment is None:
        return f"{FOLDER}/g{generation:06d}.jsonl"
    return f"{FOLDER}/g{generation:06d}-{segment:06d}.jsonl"


class GoodputRecorder:
    """Rank 0's writer of one attempt's events; thread-safe (commits arrive from the writer thread).

    A recorder that cannot write warns once and goes on: goodput must never stop training.
    """

    def __init__(self, storage, generation: int, started: float | None = None, world_size: int = 1):
        self.storage, self.generation = storage, generation
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._steps: list[list[float]] = []
        self._segment = 0
        self._last_flush = time.time()
        self._handle = None
        self._warned = False
        self._uploader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="goodput-upload")
        self._uploads: list[concurrent.futures.Future] = []
        if storage.appendable:
            try:
                storage.makedirs(FOLDER)
                self._handle = open(storage.local_path(attempt_file(generation)), "a", encoding="utf-8")
            except OSError as exc:
                self._warn(exc)
        else:
            existing = [e.name for e in _list(storage) if e.name.startswith(f"g{generation:06d}-")]
            self._segment = len(existing)
        self.event("start", t=started if started is not None else process_start_time(), world=world_size,
                   pid=os.getpid())

    # -- events ---------------------------------------------------------------------------------

    def event(self, name: str, **fields: Any) -> None:
        fields.setdefault("t", time.time())
        line = json.dumps({"e": name, **fields})
        with self._lock:
            self._pending.append(line)
        self._maybe_flush(force=self._handle is not None)

    def step(self, step: int, t0: float, t1: float, data_wait: float) -> None:
        with self._lock:
            self._steps.append([step, round(t0, 4), round(t1, 4), round(data_wait, 4)])
        self._maybe_flush(force=self._handle is not None)

    def _maybe_flush(self, force: bool = False) -> None:
        if force or time.time() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if self._steps:
                self._pending.append(json.dumps({"e": "steps", "s": self._steps}))
                self._steps = []
            lines, self._pending = self._pending, []
            self._last_flush = time.time()
            if not lines:
                return
            text = "".join(line + "\n" for line in lines)
            try:
                if self._handle is not None:
                    self._handle.write(text)
                    self._handle.flush()
                elif not self.storage.appendable:
                    # a slow store must not slow the steps: segments go up from a thread, in order
                    name = attempt_file(self.generation, self._segment)
                    self._segment += 1
                    self._uploads.append(self._uploader.submit(self._upload, name, text.encode()))
                    self._uploads = [u for u in self._uploads if not u.done()]
            except Exception as exc:  # noqa: BLE001 - goodput must never stop training
                self._warn(exc)

    def _upload(self, name: str, data: bytes) -> None:
        try:
            self.storage.write_bytes(name, data)
        except Exception as exc:  # noqa: BLE001 - goodput must never stop training
            self._warn(exc)

    def close(self, reason: str) -> None:
        self.event("exit", reason=reason)
        self.flush()
        self._uploader.shutdown(wait=True)
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _warn(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("could not write the goodput record to %s: %s", self.storage.url(FOLDER),
                        describe_error(exc))


def _list(storage) -> list:
    try:
        return list(storage.list(FOLDER))
    except FileNotFoundError:
        return []


def read_records(storage) -> dict[int, list[dict[str, Any]]]:
    """generation -> its events in order (segments joined); torn or unreadable lines skipped."""
    files: dict[int, list[tuple[int, str]]] = {}
    for entry in _list(storage):
        name = entry.name
        if not (name.startswith("g") and name.endswith(".jsonl")):
            continue
        stem = name[1:-6]
        generation, _, segment = stem.partition("-")
        if not generation.isdigit() or (segment and not segment.isdigit()):
            continue
        files.setdefault(int(generation), []).append((int(segment) if segment else -1, name))
    records: dict[int, list[dict[str, Any]]] = {}
    for generation, names in sorted(files.items()):
        events: list[dict[str, Any]] = []
        for _, name in sorted(names):
            try:
                text = storage.read(f"{FOLDER}/{name}").decode("utf-8", errors="replace")
            except FileNotFoundError:
                continue
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("e"), str):
                    events.append(record)
        records[generation] = events
    return records
