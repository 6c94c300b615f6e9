"""Transfer learning as in the classic tutorial: a pretrained resnet18, its base frozen, a new head trained.

Nothing of dist_train is imported here: this is the module a user writes, handed to
`dist-train train` as an import path. Run from the repository root (or put the folder
that holds `examples/` on PYTHONPATH), with a folder of images, one sub-folder per class
(`train/` and `val/` sub-folders are used when present; else the split is by `--seed`):

    # one process
    dist-train train --model examples.transfer_learning.model:build --dataset image_folder \\
        --data-root photos/ --image-size 64 --pretrained-weights resnet18.pth \\
        --run-dir runs/photos --epochs 3 --batch-size 16 --lr 0.01

    # two processes (DDP, gloo on CPU / nccl on GPUs)
    torchrun --standalone --nproc-per-node 2 -m dist_train train \\
        --model examples.transfer_learning.model:build --dataset image_folder --data-root photos/ \\
        --image-size 64 --pretrained-weights resnet18.pth --run-dir runs/photos --epochs 3

    # then, on the newest valid checkpoint (the model is rebuilt from this import path)
    dist-train evaluate --checkpoint runs/photos
    dist-train predict --checkpoint runs/photos photos/cats/1.jpg --top-k 2
    dist-train export --checkpoint runs/photos --out photos-model.safetensors

`resnet18.pth` is the stock torchvision state_dict, saved once where there is internet:
`torch.save(torchvision.models.resnet18(weights="IMAGENET1K_V1").state_dict(), "resnet18.pth")`.
Nothing is downloaded during training. `--model-args '{"freeze_backbone": false, "dropout": 0.2}'`
fine-tunes the whole network instead, with dropout before the head.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn


class FrozenBase(nn.Module):
    """A backbone and a new head; a frozen backbone stays in eval mode, so its BatchNorm statistics never move.

    `requires_grad=False` alone is not enough: in training mode BatchNorm layers keep
    updating their running mean and variance from every batch, so the "frozen" base
    would drift away from the pretrained one (and behave differently at inference).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, frozen: bool):
        super().__init__()
        self.backbone, self.head, self.frozen = backbone, head, frozen
        if frozen:
            self.backbone.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> "FrozenBase":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def build(num_classes: int, pretrained_weights: str | None = None, freeze_backbone: bool = True,
          dropout: float = 0.0) -> nn.Module:
    """resnet18 with the weights of `pretrained_weights` (a torchvision state_dict), a new `num_classes` head.

    dist_train passes `num_classes` from the image folder and `pretrained_weights` from
    `--pretrained-weights`. `predict`, `evaluate` and `export` call it without weights and
    load the checkpoint's instead.
    """
    backbone = torchvision.models.resnet18(weights=None)
    if pretrained_weights:
        state = torch.load(pretrained_weights, map_location="cpu", weights_only=True)
        backbone.load_state_dict(state, strict=True)
    features = backbone.fc.in_features
    backbone.fc = nn.Identity()
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_classes))
    return FrozenBase(backbone, head, freeze_backbone)
