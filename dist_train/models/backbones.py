"""torchvision backbones for transfer learning: optional local pretrained weights, a new head, a frozen base.

Nothing is downloaded: `--pretrained-weights` is a local state_dict of the stock
torchvision model (1000-class head), loaded weights-only before the head is replaced.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_train.errors import UserError

# model name -> (attribute path of the classifier layer to replace)
HEADS = {"resnet18": "fc", "resnet34": "fc", "resnet50": "fc", "mobilenet_v2": "classifier.1",
         "mobilenet_v3_small": "classifier.3", "efficientnet_b0": "classifier.1"}


class TransferModel(nn.Module):
    """A backbone with a new linear head; frozen backbones stay in eval mode (BatchNorm statistics fixed)."""

    def __init__(self, net: nn.Module, head_name: str, in_channels: int, frozen: bool):
        super().__init__()
        self.net = net
        self.head_name = head_name
        self.repeat_gray = in_channels == 1
        self.frozen = frozen
        if frozen:
            for name, param in self.net.named_parameters():
                param.requires_grad = name.startswith(head_name + ".")
        self.train()  # frozen BatchNorm layers in eval mode from the start, not only after a validation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat_gray:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        if self.frozen and mode:
            for name, module in self.net.named_modules():
                if name and not (name == self.head_name or name.startswith(self.head_name + ".")):
                    module.eval()
        return self


def _load_weights(path: str) -> dict[str, torch.Tensor]:
    """A local state_dict without unpickling arbitrary objects."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - malformed or hostile files land here
        raise UserError(f"cannot load pretrained weights {path}: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"pretrained weights {path} are not a state_dict of tensors")
    return state


def build_backbone(name: str, num_classes: int, in_channels: int = 3, freeze_backbone: bool = False,
                   pretrained_weights: str | None = None) -> TransferModel:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if pretrained_weights:
        state = _load_weights(pretrained_weights)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise UserError(f"pretrained weights {pretrained_weights} do not fit {name}: {first}") from None
    parent_name, _, attr = HEADS[name].rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    old = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    new = nn.Linear(old.in_features, num_classes)
    if attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)
    return TransferModel(net, HEADS[name], in_channels, freeze_backbone)
