"""dist_train: distributed PyTorch training with atomic, manifest-verified checkpoints.

The package is laid out along the data flow of a job:
config -> distributed -> data -> models -> training -> checkpoint -> inference.

Public API (documented in docs/api.md):

- `train(...)` / `main(...)`: run a training job with your own model, data set, task,
  extra state and callbacks, taking the same flags as `dist-train train`.
- `CheckpointManager`: the checkpoint store for a hand-written training loop.
- `ResumableSampler`: a DataLoader batch sampler whose place in the epoch is saved and continued exactly.
- `open_packed`: a packed data set (`dist-train data pack`) in any store, read verified (docs/data.md).
- `Callback`, `TrainingView`: hooks into the training loop.
- `Task` and the built-in `Classification`, `Regression`, `LanguageModel`.
- `UserError` and the exit statuses `EXIT_OK`, `EXIT_BAD_INPUT`, `EXIT_PREEMPTED`, ...
"""

__version__ = "0.3.0"  # the one version: pyproject.toml reads it (dynamic)

from dist_train.errors import (EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, EXIT_PREEMPTED,  # noqa: E402
                               EXIT_SUPERSEDED, UserError)

__all__ = ["CheckpointManager", "ResumableSampler", "Callback", "TrainingView", "Task", "Classification",
           "Regression", "LanguageModel", "train", "main", "UserError", "EXIT_OK", "EXIT_FAILURE", "EXIT_BAD_INPUT",
           "EXIT_SUPERSEDED", "EXIT_PREEMPTED", "open_packed", "__version__"]

_LAZY = {"CheckpointManager": "dist_train.checkpoint.manager", "ResumableSampler": "dist_train.data.resumable",
         "Callback": "dist_train.training.callbacks",
         "TrainingView": "dist_train.training.callbacks", "Task": "dist_train.training.tasks",
         "Classification": "dist_train.training.tasks", "Regression": "dist_train.training.tasks",
         "LanguageModel": "dist_train.training.tasks", "train": "dist_train.api", "main": "dist_train.api",
         "open_packed": "dist_train.data.packed"}


def __getattr__(name: str):
    """Heavy parts (torch) are imported on first use, so `dist-train --help` stays fast."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dist_train' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
