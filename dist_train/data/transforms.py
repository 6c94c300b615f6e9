"""Image preprocessing: the same eval transform serves validation, evaluation and predict."""

from __future__ import annotations

from typing import Callable

import torch

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TORCHVISION_STATS = {"mnist": ((0.1307,), (0.3081,)), "fashion_mnist": ((0.2860,), (0.3530,)),
                     "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


def train_image_transform(size: int, mean, std, augment: bool, native: int | None = None,
                          flip: bool = True) -> Callable:
    """PIL image -> normalised tensor; random resized crop and flip when augmenting."""
    from torchvision import transforms as T

    steps: list = []
    if augment:
        if native is not None and native == size:
            steps.append(T.RandomCrop(size, padding=max(2, size // 8)))
        else:
            steps.append(T.RandomResizedCrop(size, scale=(0.5, 1.0)))
        if flip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps += _resize_center(size, native)
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def eval_image_transform(size: int, mean, std, native: int | None = None) -> Callable:
    from torchvision import transforms as T

    return T.Compose(_resize_center(size, native) + [T.ToTensor(), T.Normalize(mean, std)])


def _resize_center(size: int, native: int | None) -> list:
    from torchvision import transforms as T

    if native is not None and native == size:
        return []
    if native is not None:
        return [T.Resize((size, size))]
    return [T.Resize(int(round(size * 8 / 7))), T.CenterCrop(size)]


def tensor_transform(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Light augmentation for small in-memory images: a random shift of up to size/8 pixels."""
    pad = max(1, size // 8)

    def shift(image: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
        dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        return padded[:, dy:dy + size, dx:dx + size]
    return shift


def grayscale_transform(size: int, mean: float, std: float) -> Callable:
    """A user's image file -> the digits data set's input: grayscale, size x size, bright ink."""
    from torchvision import transforms as T

    return T.Compose([T.Grayscale(1), T.Resize((size, size)), T.ToTensor(), T.Normalize((mean,), (std,))])
