"""The training loop and what it needs at step boundaries: optimisation, metrics, RNG, preemption."""
