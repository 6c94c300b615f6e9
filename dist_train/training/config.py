"""Configuration of optimisation and of the training loop."""

from __future__ import annotations

from dataclasses import dataclass

from dist_train.config.fields import non_negative, option, positive
from dist_train.training.notice import SOURCE_HELP, check_source

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
DEVICES = ("auto", "cpu", "cuda")


def _gamma(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


@dataclass
class OptimConfig:
    optimizer: str = option("adam", "optimizer", kind=str, choices=OPTIMIZERS)
    lr: float = option(1e-3, "peak learning rate", kind=float, check=positive)
    weight_decay: float = option(0.0, "weight decay", kind=float, check=non_negative)
    momentum: float = option(0.9, "momentum (sgd)", kind=float, check=non_negative)
    lr_schedule: str = option("constant", "learning-rate schedule over optimizer steps", kind=str,
                              choices=SCHEDULES)
    warmup_steps: int = option(0, "linear warmup steps before the schedule", kind=int, check=non_negative)
    lr_step_size: int = option(100, "steps between decays of the step schedule", kind=int, check=positive)
    lr_gamma: float = option(0.1, "decay factor of the step schedule", kind=float, check=_gamma)
    grad_clip: float | None = option(None, "clip the global gradient norm to this value", kind=float,
                                     nullable=True, check=positive)
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step", kind=int, check=positive)


def _task(value: str) -> str | None:
    from dist_train.training.tasks import TASKS  # torch is imported only once a job is configured

    return TASKS.check_name(value)


@dataclass
class TrainConfig:
    task: str = option("classification", "what the outputs are scored against: classification (cross-entropy, "
                       "accuracy), regression (MSE, MAE), language_model (token cross-entropy, perplexity), or "
                       "your fn(outputs, targets) -> per-sample losses as MODULE:ATTR", kind=str, check=_task)
    epochs: int = option(10, "epochs to train (stops at --epochs or --max-steps, whichever first)",
                         kind=int, check=positive)
    max_steps: int | None = option(None, "optimizer steps to train at most", kind=int, nullable=True,
                                   check=positive)
    seed: int = option(0, "seed of splits, sampling, initialisation and RNG streams", kind=int,
                       check=non_negative)
    deterministic: bool = option(False, "deterministic algorithms: a resumed run is bit-identical", kind=bool)
    amp: bool = option(False, "mixed precision (CUDA only; ignored on CPU)", kind=bool)
    parallelism: str = option("ddp", "ddp: every rank holds the whole model (DistributedDataParallel); fsdp: "
                              "parameters, gradients and optimizer state sharded over the ranks (FSDP2 "
                              "fully_shard per block and on the root)", kind=str, choices=("ddp", "fsdp"))
    device: str = option("auto", "cuda when available, else cpu", kind=str, choices=DEVICES)
    log_every: int = option(10, "optimizer steps between train metrics lines", kind=int, check=positive)
    progress: bool = option(True, "tqdm progress bar on rank 0 when stderr is a terminal", kind=bool)
    preempt_deadline: float = option(25.0, "seconds after SIGTERM before a stuck rank exits anyway",
                                     kind=float, check=positive)
    tensorboard: bool = option(False, "write TensorBoard event files (rank 0) under RUN_DIR/tensorboard/",
                               kind=bool)
    sample_log: str | None = option(None, "local folder to record the sample indices each rank trains on",
                                    kind=str, nullable=True)
    preemption_notice: str | None = option(None, f"poll the cloud's preemption notice ({SOURCE_HELP}); a notice "
                                           "commits a checkpoint at the next step boundary", kind=str,
                                           nullable=True, check=check_source)
    exit_on_notice: bool = option(False, "after the notice checkpoint stop with exit status 75 (resume me) "
                                  "instead of training on", kind=bool)
    notice_interval: float = option(5.0, "seconds between preemption-notice polls", kind=float, check=positive)
