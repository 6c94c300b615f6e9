"""Preemption: SIGTERM/SIGUSR1 (and Ctrl-C) become a flag the ranks agree on at the next step boundary.

The signal is noticed by a watcher thread through `signal.set_wakeup_fd`, so it is
seen even while the main thread is stuck inside a collective whose peer is gone.
From that moment a deadline runs: a rank that has not finished its graceful exit
(agree, save, leave) in time exits anyway with the "preempted" status. Exiting late
never corrupts anything, because an uncommitted checkpoint is never valid.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading


from dist_train.errors import EXIT_PREEMPTED, exit_now

log = logging.getLogger(__name__)
# SIGINT too, so Ctrl-C also ends with a checkpoint; a second Ctrl-C interrupts at once.
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionWatcher:
    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self.requested = False
        self.signal_name: str | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._previous: dict[int, object] = {}
        self._previous_fd = -1
        self._reader: socket.socket | None = None
        self._writer: socket.socket | None = None
        self._interrupts = 0

    def install(self) -> "PreemptionWatcher":
        if threading.current_thread() is not threading.main_thread():
            return self
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        threading.Thread(target=self._watch, name="preemption-watch", daemon=True).start()
        return self

    def uninstall(self) -> None:
        self._done.set()
        if not self._previous:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._previous.clear()
        for sock in (self._writer, self._reader):
            if sock is not None:
                sock.close()

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt
        self._note(signum)

    def _watch(self) -> None:
        while not self._done.is_set():
            try:
                data = self._reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in [int(s) for s in SIGNALS]:
                    self._note(signum)

    def _note(self, signum: int) -> None:
        with self._lock:
            if self.requested:
                return
            self.requested = True
            self.signal_name = signal.Signals(signum).name
        log.warning("%s received: stopping at the next step boundary to commit a checkpoint "
                    "(deadline %.0fs)", self.signal_name, self.deadline_s)
        threading.Thread(target=self._deadline, name="preemption-deadline", daemon=True).start()

    def _deadline(self) -> None:
        if self._done.wait(self.deadline_s):
            return
        log.error("preemption deadline of %.0fs passed before a clean exit; leaving now "
                  "(resume uses the newest committed checkpoint)", self.deadline_s)
        exit_now(EXIT_PREEMPTED)

    def finished(self) -> None:
        """The graceful exit completed; the deadline no longer applies."""
        self._done.set()


