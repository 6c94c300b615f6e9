"""How a launch ended, as one exit status a scheduler can act on and one line a person can read.

Plain torchrun exits 1 whenever a worker fails and also when it is itself
terminated, so a Kubernetes podFailurePolicy or a SLURM script could never tell
"bad input, do not retry" (2) or "preempted, resume me" (75) from a crash. Here
the workers' own statuses decide.

Workers agree on how a job ends: bad input, preemption and fencing are decided
collectively, so every worker that exits on its own reports the same status.
Workers that died of a signal are usually the ones the agent terminated after
the first failure, so they do not count when others exited by themselves.
Anything else, in particular a mix such as one rank crashing (1) while a peer
hits its preemption deadline (75), is a failure (1): calling it "preempted"
would let a deterministic crash be retried forever without counting against
any retry budget.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Mapping

from dist_train.errors import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED, EXIT_SUPERSEDED

MEANING = {EXIT_OK: "finished", EXIT_FAILURE: "failed", EXIT_BAD_INPUT: "bad input",
           EXIT_SUPERSEDED: "superseded by a newer attempt", EXIT_PREEMPTED: "preempted, resume me"}
UNANIMOUS = (EXIT_BAD_INPUT, EXIT_PREEMPTED, EXIT_SUPERSEDED)
# Signals the launcher forwards as "commit a checkpoint and stop" (the trainer's preemption signals;
# Ctrl-C too: the workers commit a checkpoint, so the job is resumable, 75, not a bare 130).
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@dataclass(frozen=True)
class Outcome:
    status: int
    summary: str


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    meaning = MEANING.get(code)
    return f"exit {code} ({meaning})" if meaning else f"exit {code}"


def status_of(exit_codes: Mapping[int, int]) -> int:
    """The job's exit status from the failed workers' exit codes (global rank -> code; <0: signal)."""
    own = [code for code in exit_codes.values() if code >= 0] or list(exit_codes.values())
    for status in UNANIMOUS:
        if own and all(code == status for code in own):
            return status
    return EXIT_FAILURE


def from_worker_failures(exit_codes: Mapping[int, int]) -> Outcome:
    status = status_of(exit_codes)
    ranks = ", ".join(f"rank {rank}: {describe_exit(code)}" for rank, code in sorted(exit_codes.items()))
    return Outcome(status, f"workers stopped ({ranks}); exit status {status} ({MEANING[status]})")


def from_signal(sig: signal.Signals, workers_started: bool = True) -> Outcome:
    """The launcher itself was signalled; it forwarded the signal to the workers and waited for them."""
    if not workers_started:
        what = "before the workers started (nothing to save)"
    elif sig in PREEMPTION_SIGNALS:
        what = "forwarded to the workers, which commit a checkpoint before they stop"
    else:
        what = "workers stopped"
    status = EXIT_PREEMPTED if sig in PREEMPTION_SIGNALS else 128 + int(sig)
    meaning = f" ({MEANING[status]})" if status in MEANING else ""
    return Outcome(status, f"{sig.name} received: {what}; exit status {status}{meaning}")


def finished() -> Outcome:
    return Outcome(EXIT_OK, "all workers finished; exit status 0")
