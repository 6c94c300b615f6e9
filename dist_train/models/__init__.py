"""Models: the tutorial CNN, an MLP, and torchvision backbones with a new head for transfer learning."""

from dist_train.models.registry import ModelSpec, build_model

__all__ = ["ModelSpec", "build_model"]
