"""Run reports: a run's metrics and checkpoints as curves and a short text summary."""
