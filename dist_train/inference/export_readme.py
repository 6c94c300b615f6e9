"""`OUT.README.md` of an export: a runnable snippet that does what the model was trained for.

The snippet loads the exported file (weights into the model class, or a graph), defines
`forward(x)` over it (onnxruntime for `.onnx`), and uses it the task's way: an image
preprocessed as validation did and its most probable class; a regression's values for an
input of the recorded shape; a language model's greedy continuation of a prompt in the
recorded vocabulary. tests/integration/test_inference_tasks.py runs the snippets.
"""

from __future__ import annotations

from typing import Any


def _preprocess_code(info: dict[str, Any]) -> tuple[str, str]:
    """(setup, inputs): code that turns an image into the model's input batch, as validation did."""
    record = info.get("preprocessing") or {}
    if record.get("input") != "image":
        shape = ", ".join(str(v) for v in info.get("input_shape") or ["..."])
        return "", f"inputs = torch.zeros(1, {shape})  # your inputs: a float batch (N, {shape}) as in training"
    steps = []
    if record.get("resize") is not None:
        resize = record["resize"]
        steps.append(f"T.Resize({tuple(resize) if isinstance(resize, list) else resize})")
    if record.get("center_crop") is not None:
        steps.append(f"T.CenterCrop({record['center_crop']})")
    steps += ["T.ToTensor()", f"T.Normalize({record['mean']}, {record['std']})"]
    setup = ("from PIL import Image\nfrom torchvision import transforms as T\n\n"
             f"preprocess = T.Compose([{', '.join(steps)}])\n")
    mode = record["image_mode"]
    inputs = (f"image = Image.new({mode!r}, (64, 64))  # your image: Image.open(path)\n"
              f"inputs = preprocess(image.convert({mode!r})).unsqueeze(0)  # a batch of 1")
    return setup, inputs


def _sample_prompt(names: list[str]) -> str:
    if all(ch in names for ch in "The "):
        return "The "
    return " ".join(names[:2]) if names and any(len(n) > 1 for n in names) else "".join(names[:2])


def _task_code(task: str, info: dict[str, Any], inputs: str) -> tuple[str, str, str]:
    """(inputs, run, what): the snippet's input, how it reads the outputs, and the model in words, per task."""
    names = info["class_names"]
    if task == "language_model":
        length = (info.get("input_shape") or [8])[-1]
        joiner = "''" if all(len(n) == 1 for n in names) else "' '"
        pieces = "list(prompt)" if joiner == "''" else "prompt.split()"
        inputs = (f"vocab = {names!r}  # token id -> token\n"
                  f"prompt = {_sample_prompt(names)!r}  # your text, in the vocabulary's tokens\n"
                  f"ids = [vocab.index(t) for t in {pieces}]")
        run = (f"for _ in range(20):  # greedy: the most probable next token, {length} tokens of context at most\n"
               f"    logits = forward(torch.tensor([ids[-{length}:]], dtype=torch.long))  # (1, T, vocabulary)\n"
               "    ids.append(int(logits[0, -1].argmax()))\n"
               f"print({joiner}.join(vocab[i] for i in ids))")
        return inputs, run, f"a language model over {len(names)} tokens"
    if task == "classification" or names:
        run = (f"class_names = {names!r}\nprobabilities = forward(inputs).softmax(dim=1)\n"
               "print(class_names[int(probabilities.argmax(dim=1)[0])])")
        return inputs, run, f"{len(names)} classes"
    run = f"outputs = forward(inputs)  # the predicted values ({task})\nprint(outputs[0].tolist())"
    return inputs, run, f"task {task}, outputs are values"


def _about_json(info: dict[str, Any], filename: str, note: str | None) -> str:
    if (info.get("preprocessing") or {}).get("input") == "image":
        return (f"`{filename}.json` holds the preprocessing (`preprocessing`: colour mode, resize, crop, mean/std,\n"
                "image size, class names), the model spec and the provenance. The snippet applies the same\n"
                f"preprocessing as validation did{': ' + note if note else ''}.")
    return (f"`{filename}.json` holds the model spec, the task (`{info.get('task')}`), the input shape, the "
            "class names or vocabulary, and the provenance.")


def readme(info: dict[str, Any]) -> str:
    """A Markdown page with a runnable snippet: preprocess an image, load the file, predict."""
    spec, filename, fmt = info["model"], info["file"], info["format"]
    setup, inputs = _preprocess_code(info)
    gray_note = ""
    if fmt in ("safetensors", "pt") and info.get("state_dict_keys") == "torchvision":
        load_line = (f"load_file({filename!r})" if fmt == "safetensors"
                     else f"torch.load({filename!r}, map_location='cpu', weights_only=True)")
        imports = ("import torch\nimport torchvision\nfrom torch import nn\n"
                   + ("from safetensors.torch import load_file\n" if fmt == "safetensors" else ""))
        model_code = (f"model = torchvision.models.{spec['name']}()\n{info['torchvision']['head']}\n"
                      f"model.load_state_dict({load_line})\nmodel.eval()")
        if (spec.get("shape") or {}).get("in_channels") == 1:
            inputs += "\ninputs = inputs.expand(-1, 3, -1, -1)  # the torchvision model takes 3 channels"
            gray_note = (" The model was trained on grayscale images: the plain torchvision model takes them "
                         "as 3 equal channels.")
        how = (f"The weights carry torchvision's own keys: they load into the plain "
               f"`torchvision.models.{spec['name']}` with the new head, as in the tutorials.{gray_note}")
    elif fmt in ("safetensors", "pt"):
        args = ", ".join(f"{k}={v!r}" for k, v in spec.items())
        load_line = (f"load_file({filename!r})" if fmt == "safetensors"
                     else f"torch.load({filename!r}, map_location='cpu', weights_only=True)")
        imports = ("import torch\n" + ("from safetensors.torch import load_file\n" if fmt == "safetensors" else "")
                   + "from dist_train.models import ModelSpec, build_model\n")
        model_code = f"spec = ModelSpec({args})\nmodel = build_model(spec)\nmodel.load_state_dict({load_line})\nmodel.eval()"
        how = "The weights are the model's state_dict; `build_model` rebuilds the model class they belong to."
    elif fmt == "torchscript":
        imports = "import torch\n"
        model_code = f"model = torch.jit.load({filename!r}, map_location='cpu')\nmodel.eval()"
        how = "A TorchScript module: it needs torch, not dist_train nor the model's source."
    elif fmt == "exported-program":
        imports = "import torch\n"
        model_code = f"model = torch.export.load({filename!r}).module()"
        how = "A `torch.export` program: it needs torch, not dist_train nor the model's source."
    else:
        imports = "import numpy as np\nimport onnxruntime\nimport torch\n"
        model_code = f"session = onnxruntime.InferenceSession({filename!r}, providers=['CPUExecutionProvider'])"
        output = (info.get("onnx") or {}).get("output", "logits")
        how = f"An ONNX graph (input `input`, output `{output}`) for onnxruntime or any ONNX runtime."
    forward = ("def forward(x):\n    feed = x.numpy() if x.dtype == torch.long else x.numpy().astype(np.float32)\n"
               "    return torch.from_numpy(session.run(None, {'input': feed})[0])" if fmt == "onnx"
               else "def forward(x):\n    with torch.no_grad():\n        return model(x)")
    task = info.get("task") or "classification"
    inputs, run, what = _task_code(task, info, inputs)
    note = (info.get("preprocessing") or {}).get("note")
    source = info["source"]
    shape = "x".join(str(v) for v in info.get("input_shape") or ["?"])
    return f"""# Deploying `{filename}`

A `{spec['name']}` model ({what}, inputs of {shape}), format `{fmt}`,
exported from checkpoint `{source['checkpoint']}` (step {source['step']}).
`model_digest`: `{info['model_digest']}`.
{how}

{_about_json(info, filename, note)}

```python
{imports}{setup}
{model_code}
{forward}

{inputs}
{run}
```

`dist-train predict --checkpoint CHECKPOINT FILES` gives the same predictions, if you still have the checkpoint.
"""
