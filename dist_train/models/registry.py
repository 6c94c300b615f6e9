"""Models by name or import path; a `ModelSpec` is what a checkpoint records to rebuild one.

Every model, built-in or the user's, is a factory called as
`factory(**args, **shape)`: `args` from the flags (`--model-args`, and `--width`,
`--dropout`, `--freeze-backbone` where the factory takes them), `shape` whichever of
`num_classes`, `in_channels`, `image_size` its signature accepts and the data set
reports. The spec (name or import path, args, shape) goes into every manifest, so
predict, evaluate and export rebuild the same model without the training config.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from dist_train.errors import UserError
from dist_train.models.backbones import HEADS, build_backbone
from dist_train.models.small import MLP, SmallCNN
from dist_train.plugins import Registry, accepted_kwargs, call_user, is_import_path

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
SHAPE_KEYS = ("num_classes", "in_channels", "image_size")


@MODELS.register("cnn")
def cnn(num_classes: int, in_channels: int, image_size: int, dropout: float = 0.0, width: int = 128) -> nn.Module:
    """The classic tutorial CNN, sized for the input image."""
    return SmallCNN(in_channels, num_classes, image_size, dropout, width)


@MODELS.register("mlp")
def mlp(num_classes: int, in_channels: int, image_size: int, dropout: float = 0.0, width: int = 128) -> nn.Module:
    return MLP(in_channels * image_size ** 2, num_classes, width, dropout)


for _name in HEADS:
    MODELS.register(_name, functools.partial(build_backbone, _name))

BACKBONES = tuple(HEADS)


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint records so predict/evaluate/export can rebuild the exact model."""
    name: str                                   # a built-in name or MODULE:ATTR
    args: dict[str, Any] = field(default_factory=dict)
    shape: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int | None:
        return self.shape.get("num_classes")

    @property
    def in_channels(self) -> int | None:
        return self.shape.get("in_channels")

    @property
    def image_size(self) -> int | None:
        return self.shape.get("image_size")

    @property
    def is_builtin(self) -> bool:
        return not is_import_path(self.name)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": dict(self.args), "shape": dict(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        """A manifest's `model` entry (also the flat form of checkpoints before import paths)."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise UserError("checkpoint does not describe its model (manifest 'model' is incomplete)")
        if "shape" in data or "args" in data:
            args, shape = data.get("args") or {}, data.get("shape") or {}
            if not isinstance(args, dict) or not isinstance(shape, dict):
                raise UserError("checkpoint's model description is malformed (args and shape must be objects)")
            return cls(data["name"], dict(args), dict(shape))
        shape = {k: data[k] for k in SHAPE_KEYS if k in data}
        args = {k: data[k] for k in ("dropout", "width") if k in data and data["name"] in ("cnn", "mlp")}
        if data.get("freeze_backbone"):
            args["freeze_backbone"] = True
        return cls(data["name"], args, shape)

    def describe(self) -> str:
        """`cnn model with 10 classes`, for messages."""
        classes = f" with {self.num_classes} classes" if self.num_classes else ""
        return f"{self.name} model{classes}"


def make_spec(name: str, args: dict[str, Any], builtin_options: dict[str, Any],
              shape: dict[str, Any]) -> ModelSpec:
    """The spec of this run: built-in option flags go to the factory when it takes them."""
    factory = MODELS.resolve(name)
    if is_import_path(name):  # a user's factory: only --freeze-backbone (passed when set), never --width/--dropout
        builtin_options = {k: v for k, v in builtin_options.items() if k == "freeze_backbone"}
    merged = dict(accepted_kwargs(factory, builtin_options))
    merged.update(args)
    offered = {k: v for k, v in shape.items() if v is not None}
    return ModelSpec(name, merged, accepted_kwargs(factory, offered))


def build_model(spec: ModelSpec, pretrained_weights: str | None = None,
                storage_options: dict | None = None) -> nn.Module:
    """Call the spec's factory; anything but an nn.Module, or an exception, is a UserError naming it.

    `storage_options` (the run's) reach a factory that reads `pretrained_weights` from a URL.
    """
    factory = MODELS.resolve(spec.name)
    kwargs = {**spec.args, **accepted_kwargs(factory, spec.shape)}
    if pretrained_weights is not None:
        if not accepted_kwargs(factory, {"pretrained_weights": pretrained_weights}):
            raise UserError(f"--pretrained-weights: model {spec.name} does not take pretrained weights")
        kwargs["pretrained_weights"] = pretrained_weights
        kwargs.update(accepted_kwargs(factory, {"storage_options": storage_options} if storage_options else {}))
    model = call_user(factory, spec.name, "model", **kwargs) if is_import_path(spec.name) else factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"model {spec.name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, state: dict[str, Any], source: str) -> None:
    """Strict load; a checkpoint of another architecture or class count is the user's error."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UserError(f"checkpoint {source} does not fit the model: {detail[:300]}") from None


__all__ = ["BACKBONES", "MODELS", "ModelSpec", "build_model", "load_weights", "make_spec"]
