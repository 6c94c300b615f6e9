"""Wrapping a model for data parallelism (DDP or FSDP2) and the few helpers that differ between the two.

`apply_parallelism` is the one place that decides how a model is spread over ranks:

- `ddp`: every rank holds the whole model; `DistributedDataParallel` all-reduces gradients.
- `fsdp`: `torch.distributed.fsdp.fully_shard` (FSDP2). Each parameter becomes a DTensor
  sharded on dim 0 over the ranks; a *block* is all-gathered just before its forward (and
  backward) and freed after, so a rank holds its shard plus about one block in full.

Which modules are blocks (each gets its own `fully_shard`, then the root gets one for the rest):

1. walking down from the root, the entries of the first `nn.Sequential` / `nn.ModuleList` met
   on each path (that hold parameters): a transformer's `ModuleList` of layers, a torchvision
   ResNet's `layerN` bottlenecks, the tutorial CNN's conv and linear layers. Entries are not
   split further: a block is the unit of communication.
2. any other module whose own parameters (not counting children) reach `min_block_params`
   (default 2**20): a large embedding or output head is not left to the root, which stays
   gathered for the whole forward.

Helpers the training step calls the same way under both: `grad_sync(model, enabled)` (skip the
gradient reduction on non-final micro-batches), `clip_grad_norm(params, max_norm)` (the global
norm over all shards), `model_digest(model)` (the manifest's digest of the full logical tensors,
equal to the DDP digest of the same weights, one tensor at a time).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Literal

import torch
from torch import nn

from dist_train.distributed.env import DistEnv

Parallelism = Literal["ddp", "fsdp"]
PARALLELISMS = ("ddp", "fsdp")
MIN_BLOCK_PARAMS = 2**20


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def shard_blocks(model: nn.Module, min_block_params: int = MIN_BLOCK_PARAMS) -> list[nn.Module]:
    """The modules that get their own `fully_shard`, in the order of `model.modules()` (see module doc)."""
    blocks: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, (nn.Sequential, nn.ModuleList)):
                blocks.extend(entry for entry in child if _has_params(entry))
                continue
            if _own_params(child) >= min_block_params:
                blocks.append(child)
                continue
            visit(child)

    if isinstance(model, (nn.Sequential, nn.ModuleList)):  # the root itself is the container
        return [entry for entry in model if _has_params(entry)]
    visit(model)
    return blocks


def _mixed_precision(env: DistEnv, amp: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not (amp and env.device.type == "cuda"):
        return MixedPrecisionPolicy()
    low = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)


def apply_parallelism(model: nn.Module, env: DistEnv, parallelism: Parallelism = "ddp", amp: bool = False,
                      min_block_params: int = MIN_BLOCK_PARAMS) -> nn.Module:
    """The model as the training step should call it (already on `env.device`).

    Single process (no process group): the model itself. `ddp`: a DistributedDataParallel
    wrapper (the caller keeps the unwrapped model for `state_dict`). `fsdp`: the same module,
    sharded in place (its parameters are now DTensors); `amp` on CUDA gathers parameters in
    bfloat16 (float16 where bf16 is not supported; use a GradScaler then) and reduces
    gradients in float32.
    """
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism must be one of {PARALLELISMS}, got {parallelism!r}")
    if not env.distributed:
        return model
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = _mixed_precision(env, amp)
    blocks = shard_blocks(model, min_block_params)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose `state_dict` keys are the model's own (DDP adds `module.`; FSDP2 adds nothing)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Backward passes inside reduce gradients across ranks only when `enabled` (the last micro-batch).

    DDP: `no_sync()`. FSDP2: `set_requires_gradient_sync(False)` keeps unsharded gradients
    accumulating locally (memory: one full gradient per block) until the final micro-batch.
    """
    if enabled:
        yield
        return
    if is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    yield


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> float:
    """Clip gradients to a global norm `max_norm`; returns the norm before clipping (same on every rank).

    Under FSDP the gradients are DTensor shards: the norm is computed over every shard of
    every rank (one all-reduce), not over this rank's pieces.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type)
    from torch.distributed.tensor import DTensor

    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def full_tensors(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, full CPU tensor) in key order, one at a time (collective when there are DTensors).

    A DTensor is all-gathered (`full_tensor()`) when its turn comes and dropped after, so
    no rank ever holds more than one full tensor beyond its shards.
    """
    from torch.distributed.tensor import DTensor

    for key in sorted(state):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            continue
        if isinstance(value, DTensor):
            value = value.full_tensor()
        yield key, value.detach().to("cpu").contiguous()


def model_digest(model: nn.Module) -> str:
    """The manifest's `model_digest` of the model's full logical tensors, whatever the wrapping.

    Collective under FSDP (every rank must call it); the same hex string on every rank. Equal
    to `dist_train.checkpoint.manifest.model_digest(unwrapped.state_dict())` under DDP or a
    single process, for the same weights.
    """
    from dist_train.checkpoint.digest import ModelDigest

    digest = ModelDigest()  # the one definition (checkpoint/digest.py), fed tensor by tensor in key order
    for key, tensor in full_tensors(unwrap(model).state_dict()):
        digest.tensor(key, tensor)
    return digest.hexdigest()


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the tensors this rank holds for the model and optimizer (shards only, under FSDP)."""
    from torch.distributed.tensor import DTensor

    def size(t: torch.Tensor) -> int:
        local = t.to_local() if isinstance(t, DTensor) else t
        return local.numel() * local.element_size()

    total = sum(size(t) for t in unwrap(model).state_dict().values() if isinstance(t, torch.Tensor))
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(size(t) for t in state.values() if isinstance(t, torch.Tensor))
    return total
