"""Seeds and RNG state: what makes a resumed run repeat the uninterrupted one bit for bit.

Seeds are derived from (seed, rank, epoch, stream) with a hash, so every rank and
epoch has its own independent stream that any later run can re-create. The RNG
state of every rank is captured into checkpoints and restored on resume.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import numpy as np
import torch


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from the base seed and any labels (rank, epoch, stream name)."""
    text = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)


def generator(seed: int, *parts: Any) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *parts))
    return gen


def seed_process(seed: int, *parts: Any) -> None:
    """Seed torch (CPU and CUDA), numpy and python's `random` of this process."""
    value = derive_seed(seed, *parts)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def enable_deterministic_algorithms() -> None:
    """Deterministic kernels everywhere (cuBLAS needs its workspace setting before CUDA starts)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states in checkpointable form (tensors and plain values only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda_states])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
