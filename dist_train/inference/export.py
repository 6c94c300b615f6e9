"""Shipping a checkpoint's model: its weights alone, or a self-contained graph, plus what deployment needs.

Formats (`--format`, or from the file name):

- weights: `.safetensors` (`safetensors.torch.load_file`) or `.pt`/`.pth` (a plain dict of
  tensors for `torch.load(weights_only=True)`). A torchvision backbone's weights carry
  torchvision's own keys, so the tutorial code loads them into the plain torchvision model
  (`m = torchvision.models.resnet18(); m.fc = nn.Linear(512, 3); m.load_state_dict(...)`);
  other models keep their state_dict keys.
- `torchscript` (`torch.jit.script`, or `torch.jit.trace` when scripting fails),
  `exported-program` (`torch.export`, saved with `torch.export.save`, conventionally `.pt2`),
  `onnx` (`torch.onnx.export`'s dynamo exporter; needs the `onnx` extra). The batch
  dimension is dynamic (and a language model's sequence length); the example input comes
  from the recorded image shape, `--input-shape`, or a validation sample. Inputs are
  preprocessed float tensors, or int64 token ids for a language model; outputs follow the
  task: logits for classes and next tokens, values for regression.

Beside `OUT` go `OUT.json` (the `ModelSpec`, class names, digests, the preprocessing record,
the input shape, the task, provenance) and `OUT.README.md` (a runnable snippet for the task:
an image's class, a regression's values, a language model's greedy continuation). Nothing is
overwritten without `force`; every file is written under a temporary name and renamed into
place, so a failure leaves no half-written export.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import warnings
from typing import Any, Callable

import torch

import dist_train
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.serialization import tensor_file
from dist_train.errors import UserError, printable
from dist_train.inference.export_readme import readme
from dist_train.inference.loading import LoadedModel
from dist_train.models.backbones import TransferModel

WEIGHT_SUFFIXES = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt"}
GRAPH_FORMATS = ("torchscript", "onnx", "exported-program")
FORMAT_CHOICES = ("weights", *GRAPH_FORMATS)
ONNX_HINT = "pip install 'dist_train[onnx]'"


def export_format(out: str, fmt: str | None = None) -> str:
    """The file format: `safetensors`, `pt`, or one of GRAPH_FORMATS."""
    ext = os.path.splitext(out)[1].lower()
    if fmt in GRAPH_FORMATS:
        return fmt
    if fmt not in (None, "weights"):
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMAT_CHOICES)}")
    if ext in WEIGHT_SUFFIXES:
        return WEIGHT_SUFFIXES[ext]
    if fmt is None and ext == ".onnx":
        return "onnx"
    if fmt is None and ext == ".pt2":
        return "exported-program"
    raise UserError(f"--out {out}: weights go to a file ending in .safetensors or .pt; for a graph pass "
                    "--format torchscript|onnx|exported-program (or name the file .onnx or .pt2)")


def sidecars(out: str) -> tuple[str, str]:
    return out + ".json", out + ".README.md"


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict as detached, contiguous CPU tensors: what both weight formats store."""
    return {key: tensor.detach().to("cpu").contiguous() for key, tensor in model.state_dict().items()}


def deployable_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The weights a user loads, and whose keys they carry: torchvision's for a backbone, else the model's."""
    if isinstance(model, TransferModel):
        state = model.torchvision_state_dict()
        return {key: tensor.detach().to("cpu").contiguous() for key, tensor in state.items()}, "torchvision"
    return plain_state_dict(model), "model"


def _encode(state: dict[str, torch.Tensor], fmt: str, metadata: dict[str, str]) -> bytes:
    if fmt == "safetensors":
        # The checkpoint's own writer: sorted and deterministic, so one checkpoint always exports the same bytes.
        return b"".join(bytes(chunk) for chunk in tensor_file(state, metadata).chunks())
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    return buffer.getvalue()


# -- graphs ----------------------------------------------------------------------------------

def input_shape(loaded: LoadedModel, preprocessing: dict[str, Any] | None) -> list[int] | None:
    """(C, H, W) of one input, from the model spec and the preprocessing record; None when unknown."""
    record = preprocessing or {}
    if record.get("input") == "tensor" and isinstance(record.get("shape"), list):
        return [int(v) for v in record["shape"]]
    channels = loaded.spec.in_channels or record.get("channels")
    size = loaded.spec.image_size or record.get("image_size")
    if isinstance(channels, int) and isinstance(size, int):
        return [channels, size, size]
    return None


def example_input(loaded: LoadedModel, preprocessing: dict[str, Any] | None, given_shape: list[int] | None,
                  sample: Callable[[], torch.Tensor | None] | None) -> torch.Tensor:
    """A batch of two inputs to trace the graph with (the batch dimension stays free).

    Token ids (a language model) are int64, everything else float32.
    """
    dtype = torch.long if loaded.task.name == "language_model" else torch.float32
    if given_shape is not None:
        return torch.zeros(2, *given_shape[1:], dtype=dtype)
    shape = input_shape(loaded, preprocessing)
    if shape is not None:
        return torch.zeros(2, *shape, dtype=dtype)
    found = sample() if sample is not None else None
    if found is None:
        raise UserError(f"cannot export {loaded.spec.name} as a graph: its input shape is unknown (no image "
                        "shape recorded, no validation sample to take it from); pass --input-shape, e.g. "
                        "--input-shape 1,3,32,32 (batch first)")
    found = found.detach().to("cpu")
    return torch.zeros(2, *found.shape, dtype=found.dtype if not found.is_floating_point() else torch.float32)


def _free_dims(example: torch.Tensor) -> dict[int, Any]:
    """The batch dimension is free; for token ids (int64) the sequence length too, up to what the model allows."""
    dims = [0, 1] if example.dtype == torch.long and example.dim() == 2 else [0]
    return {d: torch.export.Dim.AUTO for d in dims}


def output_name(loaded: LoadedModel) -> str:
    return "logits" if loaded.task.has_classes or loaded.task.name == "language_model" else "outputs"


def io_description(loaded: LoadedModel, example: torch.Tensor) -> dict[str, str]:
    """What the graph takes and returns, in words, per task."""
    dims = ", ".join(str(v) for v in example.shape[1:])
    kind = "int64 token ids" if example.dtype == torch.long else "float32, preprocessed"
    task = loaded.task
    if task.name == "language_model":
        output = "logits (N, T, vocabulary): the argmax of the last position is the next token"
    elif task.has_classes:
        output = "logits (N, num_classes); softmax gives probabilities"
    else:
        output = "the model's outputs (N, ...): the predicted values"
    return {"input": f"{kind} (N, {dims}); N is free", "output": output}


@contextlib.contextmanager
def _quiet():
    """torch.jit's deprecation notices and torch.onnx's progress lines are not ours to print."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _torchscript(model: torch.nn.Module, example: torch.Tensor, path: str, output: str) -> dict[str, Any]:
    with _quiet():
        try:
            compiled, how = torch.jit.script(model), "script"
        except Exception:  # noqa: BLE001 - not scriptable (a user's model): tracing records the ops it runs
            compiled, how = torch.jit.trace(model, example, check_trace=False), "trace"
        torch.jit.save(compiled, path)
    return {"torchscript": how}


def _exported_program(model: torch.nn.Module, example: torch.Tensor, path: str, output: str) -> dict[str, Any]:
    program = _export(model, example)
    with _quiet():
        torch.export.save(program, path)
    return {}


def _export(model: torch.nn.Module, example: torch.Tensor):
    try:
        with _quiet():
            return torch.export.export(model, (example,), dynamic_shapes=(_free_dims(example),))
    except Exception as exc:  # noqa: BLE001 - a model torch.export cannot capture
        raise UserError(f"torch.export cannot capture this model: {printable(' '.join(str(exc).split()))}") from None


def _onnx(model: torch.nn.Module, example: torch.Tensor, path: str, output: str) -> dict[str, Any]:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UserError(f"--format onnx needs the {exc.name} package: {ONNX_HINT}") from None
    try:
        with _quiet():
            torch.onnx.export(model, (example,), path, dynamo=True, external_data=False, verbose=False,
                              input_names=["input"], output_names=[output],
                              dynamic_shapes=(_free_dims(example),))
    except Exception as exc:  # noqa: BLE001 - an operator ONNX has no translation for
        raise UserError(f"ONNX export failed: {printable(' '.join(str(exc).split()))}") from None
    return {"onnx": {"input": "input", "output": output}}


GRAPH_WRITERS: dict[str, Callable[[torch.nn.Module, torch.Tensor, str, str], dict[str, Any]]] = {
    "torchscript": _torchscript, "exported-program": _exported_program, "onnx": _onnx}


# -- side files ------------------------------------------------------------------------------

def _describe(loaded: LoadedModel, fmt: str, filename: str, digest: str, preprocessing: dict[str, Any] | None,
              extra: dict[str, Any]) -> dict[str, Any]:
    manifest = loaded.manifest
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    info = {"file": filename, "format": fmt, "model": loaded.spec.as_dict(), "class_names": loaded.class_names,
            "model_digest": digest, "preprocessing": preprocessing,
            "data": {"dataset": data.get("dataset"), "image_size": (preprocessing or {}).get("image_size"),
                     "in_channels": (preprocessing or {}).get("channels"), "info": manifest.get("data_info") or {}},
            "source": {"checkpoint": loaded.url, "step": loaded.step, "epoch": manifest.get("epoch"),
                       "created_at": manifest.get("created_at")},
            "dist_train_version": dist_train.__version__, "torch_version": torch.__version__}
    info.update(extra)
    return info


def _torchvision_head(loaded: LoadedModel) -> str:
    """The tutorial's line that gives the plain torchvision model this model's head."""
    net = loaded.model.net
    path = loaded.model.head_name
    layer = net.get_submodule(path)
    parent, _, attr = path.rpartition(".")
    target = f"model.{parent}[{attr}]" if attr.isdigit() else f"model.{path}"
    return f"{target} = nn.Linear({layer.in_features}, {layer.out_features})"


# -- writing -----------------------------------------------------------------------------------

def _temp_name(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.tmp-{os.getpid()}-{secrets.token_hex(4)}{ext}"


def _write_atomic(path: str, data: bytes) -> None:
    tmp = _temp_name(path)
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


def check_targets(out: str, force: bool, fmt: str | None = None) -> list[str]:
    """OUT and its side files, refused up front when one exists (unless `force`) or is a folder."""
    export_format(out, fmt)
    targets = [out, *sidecars(out)]
    for path in targets:
        if os.path.isdir(path):
            raise UserError(f"--out {path} is a folder")
        if os.path.exists(path) and not force:
            raise UserError(f"{path} already exists (pass --force to overwrite it)")
    return targets


def export_model(loaded: LoadedModel, out: str, force: bool = False, fmt: str | None = None,
                 given_shape: list[int] | None = None,
                 sample: Callable[[], torch.Tensor | None] | None = None) -> list[str]:
    """Write OUT, OUT.json and OUT.README.md; the paths written, in that order.

    A graph needs an example input: of `given_shape` (`--input-shape`, batch first), else of the
    recorded image shape, else of `sample()` (a validation sample of the run's data set).
    """
    from dist_train.inference.predict import preprocessing_of

    kind = export_format(out, fmt)
    targets = check_targets(out, force, fmt)
    digest = mf.model_digest(plain_state_dict(loaded.model))
    if digest != loaded.manifest.get("model_digest"):
        raise UserError(f"checkpoint {loaded.url}: the weights do not match the manifest's model_digest")
    preprocessing = preprocessing_of(loaded)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    existed = {path for path in targets if os.path.exists(path)}
    written: list[str] = []
    try:
        example = example_input(loaded, preprocessing, given_shape, sample) if kind in GRAPH_FORMATS else None
        shape = list(example.shape[1:]) if example is not None else input_shape(loaded, preprocessing)
        if shape is None and sample is not None:  # weights of a non-image model: the README still shows the shape
            found = sample()
            shape = list(found.shape) if found is not None else None
        if example is not None:
            model = loaded.model.to("cpu").eval()
            tmp = _temp_name(out)
            try:
                extra = GRAPH_WRITERS[kind](model, example, tmp, output_name(loaded))
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            extra.update(io_description(loaded, example))
        else:
            state, keys = deployable_state_dict(loaded.model)
            extra = {"state_dict_keys": keys, "exported_digest": mf.model_digest(state)}
            if keys == "torchvision":
                extra["torchvision"] = {"model": f"torchvision.models.{loaded.spec.name}",
                                        "head": _torchvision_head(loaded), "input_channels": 3}
            metadata = {"format": "pt", "dist_train.model_spec": json.dumps(loaded.spec.as_dict()),
                        "model_digest": digest, "state_dict_keys": keys}
            _write_atomic(out, _encode(state, kind, metadata))
        written.append(out)
        info = _describe(loaded, kind, os.path.basename(out), digest, preprocessing,
                         {"input_shape": shape, "task": loaded.task.name, **extra})
        for path, data in zip(targets[1:], [(json.dumps(info, indent=1) + "\n").encode(), readme(info).encode()]):
            _write_atomic(path, data)
            written.append(path)
    except (OSError, UserError) as exc:
        for path in written:
            if path not in existed:
                os.unlink(path)
        if isinstance(exc, UserError):
            raise
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    return targets
