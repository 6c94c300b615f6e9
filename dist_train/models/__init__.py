"""Models: the tutorial CNN, an MLP, and torchvision backbones with a new head for transfer learning.

`ModelSpec` and `build_model` are imported on first use: the model config (read by every CLI
command's parser) lives in this package, and `dist-train --help` must not import torch."""

__all__ = ["ModelSpec", "build_model"]


def __getattr__(name: str):
    if name in __all__:
        from dist_train.models import registry
        return getattr(registry, name)
    raise AttributeError(f"module 'dist_train.models' has no attribute {name!r}")
