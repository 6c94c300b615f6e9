"""Building a model by name for a data set's shape; a `ModelSpec` is enough to rebuild it later."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from dist_train.errors import UserError
from dist_train.models.backbones import HEADS, build_backbone
from dist_train.models.small import MLP, SmallCNN


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint records so predict/evaluate/export can rebuild the exact model."""
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    dropout: float = 0.0
    freeze_backbone: bool = False
    width: int = 128

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        try:
            return cls(**{k: data[k] for k in ("name", "num_classes", "in_channels", "image_size")},
                       dropout=float(data.get("dropout", 0.0)), freeze_backbone=bool(data.get("freeze_backbone")),
                       width=int(data.get("width", 128)))
        except (KeyError, TypeError):
            raise UserError("checkpoint does not describe its model (manifest 'model' is incomplete)") from None


def build_model(spec: ModelSpec, pretrained_weights: str | None = None) -> nn.Module:
    if spec.name == "cnn":
        return SmallCNN(spec.in_channels, spec.num_classes, spec.image_size, spec.dropout, spec.width)
    if spec.name == "mlp":
        return MLP(spec.in_channels * spec.image_size ** 2, spec.num_classes, spec.width, spec.dropout)
    if spec.name in HEADS:
        return build_backbone(spec.name, spec.num_classes, spec.in_channels, spec.freeze_backbone, pretrained_weights)
    raise UserError(f"unknown model {spec.name}")
