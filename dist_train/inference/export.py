"""Shipping a checkpoint's weights: the model's state_dict alone, plus what deployment needs to rebuild it.

`OUT` is `.safetensors` (for `safetensors.torch.load_file`) or `.pt` (a plain dict of tensors that
`torch.load(weights_only=True)` reads). Beside it go `OUT.json` (the `ModelSpec`,
class names, digest and provenance) and `OUT.README.md` (a snippet that loads the
file into the model class). Nothing is overwritten without `force`, and every file
is written under a temporary name and renamed into place, so a failure leaves no
half-written export behind.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from typing import Any

import torch

import dist_train
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.serialization import tensor_file
from dist_train.errors import UserError
from dist_train.inference.loading import LoadedModel

FORMATS = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt"}


def export_format(out: str) -> str:
    ext = os.path.splitext(out)[1].lower()
    if ext not in FORMATS:
        raise UserError(f"--out {out}: the file name must end in .safetensors or .pt")
    return FORMATS[ext]


def sidecars(out: str) -> tuple[str, str]:
    return out + ".json", out + ".README.md"


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict as detached, contiguous CPU tensors: what both file formats store."""
    return {key: tensor.detach().to("cpu").contiguous() for key, tensor in model.state_dict().items()}


def _encode(state: dict[str, torch.Tensor], fmt: str, metadata: dict[str, str]) -> bytes:
    if fmt == "safetensors":
        # The checkpoint's own writer: sorted and deterministic, so one checkpoint always exports the same bytes.
        return b"".join(bytes(chunk) for chunk in tensor_file(state, metadata).chunks())
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


def _describe(loaded: LoadedModel, fmt: str, filename: str, digest: str) -> dict[str, Any]:
    manifest = loaded.manifest
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    return {"file": filename, "format": fmt, "model": loaded.spec.as_dict(), "class_names": loaded.class_names,
            "model_digest": digest,
            "data": {"dataset": data.get("dataset"), "image_size": loaded.spec.image_size,
                     "in_channels": loaded.spec.in_channels, "info": manifest.get("data_info") or {}},
            "source": {"checkpoint": loaded.url, "step": loaded.step, "epoch": manifest.get("epoch"),
                       "created_at": manifest.get("created_at")},
            "dist_train_version": dist_train.__version__}


def readme(info: dict[str, Any]) -> str:
    """A Markdown snippet that rebuilds the model class and loads the exported file into it."""
    spec = info["model"]
    args = ", ".join(f"{k}={v!r}" for k, v in spec.items())
    filename = info["file"]
    if info["format"] == "safetensors":
        imports = "from safetensors.torch import load_file\n"
        load = f"state = load_file({filename!r})"
    else:
        imports = ""
        load = f"state = torch.load({filename!r}, map_location=\"cpu\", weights_only=True)"
    source = info["source"]
    return f"""# Deploying `{filename}`

The weights of a `{spec['name']}` model ({spec['num_classes']} classes, inputs of
{spec['in_channels']}x{spec['image_size']}x{spec['image_size']}) exported from checkpoint
`{source['checkpoint']}` (step {source['step']}). `model_digest`: `{info['model_digest']}`.
`{filename}.json` holds the same model spec, the class names and the data set's
normalisation (`data.info`), for code that rebuilds the model without this snippet.

```python
import torch
{imports}from dist_train.models import ModelSpec, build_model

spec = ModelSpec({args})
model = build_model(spec)
{load}
model.load_state_dict(state)
model.eval()
class_names = {info['class_names']!r}

# a batch of inputs, preprocessed like validation: float tensor of shape (N, C, H, W)
inputs = torch.zeros(1, {spec['in_channels']}, {spec['image_size']}, {spec['image_size']})
with torch.no_grad():
    probabilities = model(inputs).softmax(dim=1)
print(class_names[int(probabilities.argmax(dim=1)[0])])
```

`dist-train predict --checkpoint CHECKPOINT FILES` applies the exact validation
preprocessing to image files, if you still have the checkpoint.
"""


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_targets(out: str, force: bool) -> list[str]:
    """OUT and its side files, refused up front when one exists (unless `force`) or is a folder."""
    export_format(out)
    targets = [out, *sidecars(out)]
    for path in targets:
        if os.path.isdir(path):
            raise UserError(f"--out {path} is a folder")
        if os.path.exists(path) and not force:
            raise UserError(f"{path} already exists (pass --force to overwrite it)")
    return targets


def export_model(loaded: LoadedModel, out: str, force: bool = False) -> list[str]:
    """Write OUT, OUT.json and OUT.README.md; the paths written, in that order."""
    fmt = export_format(out)
    targets = check_targets(out, force)
    state = plain_state_dict(loaded.model)
    digest = mf.model_digest(state)
    if digest != loaded.manifest.get("model_digest"):
        raise UserError(f"checkpoint {loaded.url}: the weights do not match the manifest's model_digest")
    info = _describe(loaded, fmt, os.path.basename(out), digest)
    payload = _encode(state, fmt, {"format": "pt", "dist_train.model_spec": json.dumps(info["model"]),
                                   "model_digest": digest})
    files = [payload, (json.dumps(info, indent=1) + "\n").encode(), readme(info).encode()]
    existed = {path for path in targets if os.path.exists(path)}
    written: list[str] = []
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        for path, data in zip(targets, files):
            _write_atomic(path, data)
            written.append(path)
    except OSError as exc:
        for path in written:
            if path not in existed:
                os.unlink(path)
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    return targets
