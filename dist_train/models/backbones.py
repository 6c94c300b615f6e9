"""torchvision backbones for transfer learning: optional local pretrained weights, a new head, a frozen base.

Nothing is downloaded. `--pretrained-weights` takes what a tutorial user has: a state_dict of
the torchvision model (any head), the tutorial's general checkpoint dict (`model_state_dict`),
weights saved from a DDP model (`module.` keys), or an earlier dist_train run (a checkpoint
folder, a run dir, an export; a run on S3 or any fsspec URL too, read with the run's storage
options, so a custom endpoint works). Everything is read without unpickling objects
(safetensors, or `torch.load(weights_only=True)`). A head of the right shape is loaded too
(fine-tuning an earlier run); any other head is replaced by a new one.

`TransferModel` keeps the torchvision net as `self.net`, so its checkpoint keys carry a
`net.` prefix; it also loads torchvision's own keys, and `torchvision_state_dict()` gives
them back for exports that load into the plain torchvision model.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from dist_train.errors import UserError, printable

log = logging.getLogger(__name__)

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
        self.register_load_state_dict_pre_hook(_accept_torchvision_keys)

    def torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under torchvision's names: what `torchvision.models.<name>(num_classes=N)` loads."""
        return self.net.state_dict()

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


def _accept_torchvision_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """A state_dict with torchvision's keys (an export, a tutorial's weights) loads as if it had `net.` ones."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    if keys and not any(k.startswith(prefix + "net.") for k in keys):
        for key in keys:
            state_dict[f"{prefix}net.{key[len(prefix):]}"] = state_dict.pop(key)


# -- reading pretrained weights --------------------------------------------------------------

CONTAINER_KEYS = ("model_state_dict", "state_dict", "model")   # a general checkpoint dict holds the weights here
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.", "model.")  # DDP, torch.compile, TransferModel, Lightning
ACCEPTED = ("a state_dict of the torchvision model (.pt, .pth, .safetensors), a training checkpoint dict with "
            "'model_state_dict', weights saved from DDP ('module.' keys), or a dist_train checkpoint, run dir "
            "or export")


def read_pretrained(source: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `source` under the model's own names (wrappers' prefixes removed).

    A URL (`s3://...`, `file://...`) or a local folder is a dist_train checkpoint or run dir, read
    through the storage seam with `storage_options` (the run's: an S3 endpoint, its credentials).
    """
    remote = "://" in source
    state = _read_checkpoint(source, storage_options) if remote or os.path.isdir(source) else _read_file(source)
    for key in CONTAINER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict) and _all_tensors(state[key]):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not _all_tensors(state):
        raise UserError(f"pretrained weights {printable(source)} hold no state_dict of tensors; expected {ACCEPTED}")
    return strip_prefixes(state)


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes that every key shares (`module.net.conv1.weight` -> `conv1.weight`)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def _all_tensors(state: dict) -> bool:
    return all(isinstance(v, torch.Tensor) for v in state.values())


def _read_file(path: str) -> Any:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - malformed or hostile files land here
        text = " ".join(str(exc).split())
        if "Weights only load failed" in text or "Unsupported global" in text:
            reason = ("it holds Python objects other than tensors and plain data, and loading those could run "
                      "arbitrary code; save model.state_dict() alone")
        else:
            reason = printable(text)
        raise UserError(f"cannot load pretrained weights {printable(path)}: {reason}") from None


def _read_checkpoint(url: str, options: dict | None = None) -> dict[str, torch.Tensor]:
    """The model weights of a dist_train checkpoint folder, or of a run dir's newest valid one (sha256 checked)."""
    from dist_train.checkpoint import resolver
    from dist_train.checkpoint.state import read_payload
    from dist_train.checkpoint.storage import Storage

    def read(verdict) -> dict[str, torch.Tensor]:
        return read_payload(Storage(verdict.url, options), verdict.manifest, verify_sha=True, model_only=True).model

    verdict, state = resolver.newest_valid(url, options, read, what="pretrained weights")
    log.info("pretrained weights: %s (step %s)", verdict.url, verdict.manifest.get("step"))
    return state


def load_pretrained(net: nn.Module, name: str, state: dict[str, torch.Tensor], source: str) -> bool:
    """Load `state` into `net` (whose new head is in place); the head too when it has the same shape.

    Every backbone tensor must be there with its shape; the error names the first few that are
    not. Returns whether the head was loaded.
    """
    expected = net.state_dict()
    head = HEADS[name] + "."
    is_head = [k for k in expected if k.startswith(head)]
    optional = [k for k in expected if k.endswith("num_batches_tracked")]  # absent from old torchvision files
    missing = [k for k in expected if k not in state and k not in is_head and k not in optional]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in state if k in expected and not k.startswith(head) and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        raise UserError(f"pretrained weights {printable(source)} do not fit {name}: " + "; ".join(
            part for part in (_keys("missing", missing), _keys("unexpected", unexpected),
                              _shapes(reshaped, state, expected)) if part)
                        + f". Expected torchvision's {name} (keys like {_example(expected)}): {ACCEPTED}")
    head_fits = all(k in state and state[k].shape == expected[k].shape for k in is_head)
    net.load_state_dict({k: v for k, v in state.items() if head_fits or not k.startswith(head)}, strict=False)
    if not head_fits and any(k.startswith(head) for k in state):
        log.info("pretrained weights: the file's head (%s) does not fit this data set; a new head is trained",
                 "x".join(str(d) for d in state[is_head[0]].shape) if is_head[0] in state else "?")
    return head_fits


def _keys(what: str, keys: list[str], shown: int = 4) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} {what} ({', '.join(printable(k, 60) for k in keys[:shown])}{more})"


def _shapes(keys: list[str], state: dict, expected: dict, shown: int = 3) -> str:
    if not keys:
        return ""
    parts = [f"{printable(k, 60)} {list(state[k].shape)} in the file, {list(expected[k].shape)} in the model"
             for k in keys[:shown]]
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} of another shape ({', '.join(parts)}{more})"


def _example(expected: dict) -> str:
    keys = list(expected)
    return ", ".join(repr(k) for k in keys[:2])


def build_backbone(name: str, num_classes: int, in_channels: int = 3, freeze_backbone: bool = False,
                   pretrained_weights: str | None = None, storage_options: dict | None = None) -> TransferModel:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    state = read_pretrained(pretrained_weights, storage_options) if pretrained_weights else None
    parent_name, _, attr = HEADS[name].rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    old = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    new = nn.Linear(old.in_features, num_classes)
    if attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)
    if state is not None:
        load_pretrained(net, name, state, pretrained_weights)
    return TransferModel(net, HEADS[name], in_channels, freeze_backbone)
