"""`dist-train launch`: torchrun whose exit status says why the job stopped.

    dist-train launch [torchrun options] -- train [train flags]
    dist-train launch [torchrun options] -- -m MODULE [args]     # a user's script on the Python API
    dist-train launch [torchrun options] -- SCRIPT.py [args]

plan.py checks the command (bad input exits 2 before any worker starts);
agent.py runs torch's elastic agent with `python -u -m dist_train train ...` (or the
user's module or script) as the workers; outcome.py maps how it ended to 0, 1, 2 (bad input), 3 (superseded) or
75 (preempted, resume me), the statuses Kubernetes' podFailurePolicy and the
SLURM script act on.
"""

from __future__ import annotations

import sys

from dist_train.config.job import dump_yaml
from dist_train.launcher.outcome import Outcome
from dist_train.launcher.plan import USAGE, LaunchPlan, plan_launch, shutdown_timeout

__all__ = ["launch", "plan_launch", "LaunchPlan", "Outcome", "shutdown_timeout", "USAGE"]


def launch(argv: list[str]) -> int:
    """Check, launch, wait; returns the exit status. Raises `UserError` for bad input."""
    from dist_train.launcher import agent

    agent.configure_logging()  # before planning: torch's option parsing warns about harmless things
    plan = plan_launch(argv)
    if plan.print_config:
        print(dump_yaml(plan.job), end="")
        return 0
    result = agent.run(plan)
    print(f"dist-train launch: {result.summary}", file=sys.stderr, flush=True)
    return result.status
