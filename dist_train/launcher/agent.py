"""Running a launch plan with torch's elastic agent, and turning how it ended into an `Outcome`.

The agent is torchrun's (`elastic_launch`): rendezvous, worker restarts, signal
forwarding and the SIGKILL after `shutdown_timeout` all behave as documented for
torchrun. What differs is the end: instead of torchrun's error box and exit 1,
one summary line and an exit status from `outcome.py`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous import RendezvousError
from torch.distributed.launcher.api import elastic_launch

from dist_train.launcher import outcome as oc
from dist_train.launcher.plan import LaunchPlan

log = logging.getLogger("dist_train.launcher")
TORCH_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")


class _QuietTorch(logging.Filter):
    """torch's agent narrates every expected failure (and the launch itself) at WARNING/ERROR.

    The summary line says what happened, so its records are dropped unless they are
    errors the summary does not cover. LOGLEVEL=INFO (torchrun's own switch) shows them all.
    """

    EXPECTED = ("failed (exitcode", "Sending process", "death signal", "closing signal",
                "Failed to register signal handler", "Setting OMP_NUM_THREADS")

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(TORCH_LOGGERS) or os.environ.get("LOGLEVEL"):
            return True
        if record.levelno < logging.ERROR:
            return "will restart worker group" in record.getMessage()
        return not any(text in record.getMessage() for text in self.EXPECTED)


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s launch %(levelname)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    quiet = _QuietTorch()
    for name in ("", "torch", "torch.distributed"):
        for torch_handler in logging.getLogger(name).handlers:
            torch_handler.addFilter(quiet)
    if not os.environ.get("LOGLEVEL"):
        # Worker-group restarts are logged at INFO; the filter lets only those through.
        logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.INFO)


class _EarlySignal(SignalException):
    """A signal that arrived before torch installed its own handlers: no worker has started yet."""


def _raise_signal_exception(signum: int, frame) -> None:
    sig = signal.Signals(signum)
    raise _EarlySignal(f"launcher got {sig.name} before the workers started", sigval=sig)


def _handle_signals_during_rendezvous(names: str) -> None:
    """torch installs its forwarding handlers only once workers start; before that (a long wait in
    the rendezvous) a SIGTERM would kill the launcher with no status of ours. Same handler, earlier."""
    for name in names.split(","):
        sig = getattr(signal, name.strip(), None)
        if isinstance(sig, signal.Signals):
            signal.signal(sig, _raise_signal_exception)


def run(plan: LaunchPlan) -> oc.Outcome:
    config = plan.config
    log.info("%d worker(s) per node, nodes %d:%d, rendezvous %s at %s (id %s), max restarts %d, "
             "shutdown timeout %ss", config.nproc_per_node, config.min_nodes, config.max_nodes,
             config.rdzv_backend, config.rdzv_endpoint, config.run_id or "random", config.max_restarts,
             config.shutdown_timeout)
    if config.max_restarts > 0:
        # With the agent's rendezvous store shared with the workers (torch's default since 2.5),
        # restarted workers read the previous round's addresses and cannot connect
        # (pytorch/pytorch#135712): every restart would fail again. A store per round, hosted by
        # the rank-0 worker, avoids that; without restarts torch's default stays.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    _handle_signals_during_rendezvous(config.signals_to_handle)
    try:
        elastic_launch(config, plan.entrypoint)(*plan.worker_args)
    except ChildFailedError as exc:
        return oc.from_worker_failures({rank: failure.exitcode for rank, failure in exc.failures.items()})
    except SignalException as exc:
        return oc.from_signal(exc.sigval, workers_started=not isinstance(exc, _EarlySignal))
    except RendezvousError as exc:
        return oc.Outcome(oc.EXIT_FAILURE, f"rendezvous failed: {type(exc).__name__}: {exc}; exit status 1")
    return oc.finished()
