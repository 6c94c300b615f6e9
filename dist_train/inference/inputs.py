"""What a model is fed at inference, for every task: tensor files, text, and the shape of one input.

Images go through `predict.py` (the recorded preprocessing). Everything else a user can hand
`predict` is read here without unpickling anything: `.npy` (`numpy.load(allow_pickle=False)`),
`.pt`/`.pth` holding a tensor, or a list/tuple/dict of tensors (`torch.load(weights_only=True)`),
and, for a language model, text files. A tensor of one sample's rank is one input; one more
dimension is a batch of them. The rank of one sample comes from the checkpoint's preprocessing
record or, lacking one, from a validation sample of the run's own data set.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from dist_train.errors import UserError, printable

TENSOR_EXTENSIONS = (".npy", ".pt", ".pth")
TEXT_EXTENSIONS = (".txt", ".text", ".md")


def is_tensor_file(path: str) -> bool:
    return path.lower().endswith(TENSOR_EXTENSIONS)


def is_text_file(path: str) -> bool:
    return path.lower().endswith(TEXT_EXTENSIONS)


def read_tensors(path: str) -> list[torch.Tensor]:
    """The tensors of a `.npy` or `.pt` file, in order (a dict's in its key order)."""
    try:
        if path.lower().endswith(".npy"):
            import numpy as np
            value: Any = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - malformed or hostile files land here
        text = " ".join(str(exc).split())
        if "Weights only load failed" in text or "Unsupported global" in text or "allow_pickle" in text:
            text = "it holds Python objects, and loading those could run arbitrary code; save tensors only"
        raise UserError(f"cannot read input {printable(path)}: {printable(text)}") from None
    if isinstance(value, dict):
        value = list(value.values())
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        raise UserError(f"input {printable(path)} holds no tensors (expected a tensor, or a list or dict of them)")
    return list(values)


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read text input {printable(path)}: {exc}") from None


def as_batches(tensors: Sequence[torch.Tensor], sample_rank: int | None) -> list[torch.Tensor]:
    """Each tensor as a batch: one sample gets a batch dimension, a batch stays as it is.

    Without a known sample rank a tensor is taken as a batch (its first dimension counts inputs).
    """
    out = []
    for tensor in tensors:
        out.append(tensor.unsqueeze(0) if sample_rank is not None and tensor.dim() == sample_rank else tensor)
    return out


def sample_input(rebuild: Callable[[], Any]) -> torch.Tensor | None:
    """The input of the first validation sample of the run's data set, or None when it cannot be rebuilt."""
    try:
        bundle = rebuild()
        dataset = bundle.val if len(bundle.val) else bundle.train
        item = dataset[0][0]
    except UserError:
        return None
    return item if isinstance(item, torch.Tensor) else torch.as_tensor(item)


def parse_shape(text: str) -> list[int]:
    """`--input-shape 1,3,32,32`: the whole input with its batch dimension."""
    try:
        shape = [int(part) for part in text.replace("x", ",").split(",") if part.strip()]
    except ValueError:
        shape = []
    if not shape or any(v < 1 for v in shape):
        raise UserError(f"--input-shape {printable(text)}: expected positive integers such as 1,3,32,32 "
                        "(the batch dimension first)")
    return shape

