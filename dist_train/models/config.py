"""Configuration of the model: a built-in name or the user's import path, its args, transfer learning."""

from __future__ import annotations

from dataclasses import dataclass

from dist_train.config.fields import option, positive

BUILTIN_MODELS = ("cnn", "mlp", "resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small",
                  "efficientnet_b0")


def _model(value: str) -> str | None:
    from dist_train.models.registry import MODELS  # torch is imported only once a job is configured

    return MODELS.check_name(value)


def _dropout(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


@dataclass
class ModelConfig:
    model: str = option("cnn", "a built-in model (" + ", ".join(BUILTIN_MODELS) + ") or your factory as "
                        "MODULE:ATTR, called with --model-args and the data set's num_classes, in_channels, "
                        "image_size where its signature takes them", kind=str, check=_model)
    model_args: dict = option({}, "JSON object of keyword arguments for the model factory", kind="json")
    freeze_backbone: bool = option(False, "train only the new head of a torchvision backbone", kind=bool)
    pretrained_weights: str | None = option(None, "weights for the backbone: a state_dict (.pt, .pth, "
                                            ".safetensors), a training checkpoint dict, or a dist_train "
                                            "checkpoint, run dir (local or a URL such as s3://...) or export",
                                            kind=str, nullable=True)
    dropout: float = option(0.0, "dropout before the classifier of cnn/mlp", kind=float, check=_dropout)
    width: int = option(128, "hidden width of the cnn/mlp classifier", kind=int, check=positive)
