"""Configuration of the model: architecture and transfer-learning switches."""

from __future__ import annotations

from dataclasses import dataclass

from dist_train.config.fields import option, positive

MODELS = ("cnn", "mlp", "resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small",
          "efficientnet_b0")
BACKBONES = tuple(name for name in MODELS if name not in ("cnn", "mlp"))


def _dropout(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


@dataclass
class ModelConfig:
    model: str = option("cnn", "architecture: the tutorial CNN, an MLP, or a torchvision backbone",
                        kind=str, choices=MODELS)
    freeze_backbone: bool = option(False, "train only the new head of a torchvision backbone", kind=bool)
    pretrained_weights: str | None = option(None, "local state_dict (.pt or .safetensors) for the backbone",
                                            kind=str, nullable=True)
    dropout: float = option(0.0, "dropout before the classifier of cnn/mlp", kind=float, check=_dropout)
    width: int = option(128, "hidden width of the cnn/mlp classifier", kind=int, check=positive)
