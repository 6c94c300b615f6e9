"""The Python API: a user's own script hands dist_train its model, data, task, extra state and hooks.

```python
import dist_train

def build_model(in_features: int): ...          # gets what the data set reports, if it asks
def make_dataset(split: str): ...               # "train", "val" (and "test")

if __name__ == "__main__":
    hook = UpdateEMA()                           # a Callback whose on_train_batch_end updates hook.ema
    def extras(model):
        hook.ema = EMA(model)                    # saved in every checkpoint, restored on resume
        return {"ema": hook.ema}
    dist_train.main(model=build_model, dataset=make_dataset, task="regression", extras=extras, callbacks=[hook])
```

A script run by path (`torchrun my_train.py`) is recorded as `/path/to/my_train.py:build_model`:
`evaluate`, `predict` and `export` load it again without running its `__main__` block.

The script takes the same flags as `dist-train train` (`--run-dir s3://...`, `--epochs`, ...)
and runs the same way, one process or `torchrun --nproc-per-node 2 my_train.py ...`.
Everything the CLI promises holds: atomic checkpoints, exact resume, preemption, exit statuses.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterable, Sequence

from dist_train.errors import EXIT_BAD_INPUT, LocalUserError, UserError, exit_now

PEER_GRACE_S = 3.0


def train(model: Callable[..., Any] | None = None, dataset: Callable[..., Any] | None = None,
          task: Any = None, extras: Callable[[Any], dict] | dict | None = None,
          callbacks: Iterable[Any] = (), argv: Sequence[str] | None = None) -> int:
    """Run one training job with these callables; flags from `argv` (default: the command line).

    - `model(**model_args, **shape)` returns an `nn.Module` (shape: whichever of `num_classes`,
      `in_channels`, `image_size` it accepts and the data set reports); None: `--model`.
    - `dataset(split, **dataset_args)` returns a map-style Dataset of (input, target); None: `--dataset`.
    - `task`: "classification", "regression", "language_model", a `Task`, or `fn(outputs, targets)`
      returning per-sample losses (and optionally a dict of per-sample metrics); None: `--task`.
    - `extras`: {name: object with state_dict()/load_state_dict()}, or a function of the built model
      returning one (an EMA copy); saved in every checkpoint and restored on resume.
    - `callbacks`: `dist_train.Callback` instances.

    Returns the exit status (0 finished, 2 bad input, 75 preempted: see the README).
    """
    from dist_train.cli.parsing import Parser
    from dist_train.config.job import add_config_arguments

    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "train"
    grouped = False  # set once the process group forms: from then on the ranks agree on an error
    try:
        parser = Parser(prog=prog, description="A dist_train training job (flags as for `dist-train train`).")
        add_config_arguments(parser)
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

        def group_forms() -> None:
            nonlocal grouped
            grouped = True
        return run_job(args, model, dataset, task, extras, callbacks, group_forms)
    except UserError as exc:
        if os.environ.get("RANK", "0") == "0" or isinstance(exc, LocalUserError):
            print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        elif not grouped and "RANK" in os.environ:
            # Found before the process group (a bad flag): every rank found it, rank 0 says it. Its peers wait
            # a moment, or torch's agent, stopping the workers at the first exit, may kill rank 0 unheard.
            import time
            time.sleep(PEER_GRACE_S)
        exc.__traceback__ = None  # frees the failed job's DataLoader workers now (see cli/main.py)
        return EXIT_BAD_INPUT


def run_job(args: Any, model: Callable[..., Any] | None = None, dataset: Callable[..., Any] | None = None,
            task: Any = None, extras: Callable[[Any], dict] | dict | None = None,
            callbacks: Iterable[Any] = (), group_forms: Callable[[], None] | None = None) -> int:
    """The one path from parsed flags to a finished job: `dist-train train` and `train(...)` both end here.

    The config is resolved from the flags, the callables named in it as import paths (so
    config.yaml and every manifest name what evaluate/predict/export must rebuild, not the
    flags' defaults), the run dir's scheme checked; then the job runs in a process group
    (`--print-config` only prints). `group_forms()` is called as the process group forms (errors
    before it were found by every rank alike). A UserError propagates to the caller, which prints it.
    """
    from dist_train.checkpoint.storage import check_url_scheme
    from dist_train.config.job import dump_yaml, resolve
    from dist_train.plugins import qualified_name

    cfg = resolve(args)
    if dataset is not None:
        cfg.data.dataset = qualified_name(dataset)
    if model is not None:
        cfg.model.model = qualified_name(model)
    if isinstance(task, str):
        cfg.train.task = task
    elif task is not None:
        cfg.train.task = getattr(task, "name", None) if hasattr(task, "score") else qualified_name(task)
    check_url_scheme(cfg.checkpoint.run_dir)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from dist_train.distributed.env import configure_logging, distributed
    from dist_train.training.job import UserCode, run_training

    code = UserCode(model, dataset, task, extras, list(callbacks))
    if group_forms is not None:
        group_forms()
    with distributed(cfg.train.device) as env:
        configure_logging(env)
        return run_training(cfg, env, code)


def main(*args: Any, **kwargs: Any) -> None:
    """`train(...)`, then leave the process with its exit status.

    Under torchrun the worker leaves with `os._exit` once its output is flushed and its
    process group is torn down (C++ destructors at interpreter exit can otherwise abort
    now and then, turning a meaningful status such as 75 into a crash).
    """
    status = train(*args, **kwargs)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        exit_now(status)
    sys.exit(status)
