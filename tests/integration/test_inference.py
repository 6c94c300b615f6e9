"""predict / evaluate / export against real tiny training runs (single process).

Two runs, trained once per session (conftest's `trained_run`): digits with the seed CNN (one
epoch), and a tutorial-style transfer-learning run (resnet18 on a small image folder whose
files are deleted right after training, as when a model is deployed elsewhere). Most commands run in this process through `cli.main.main`
(fast, and the exit status and stderr line are the same ones the console script gives);
evaluate also runs as a real 2-rank torchrun job.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import call_cli, run_torchrun

TRAIN = ["--epochs", "1", "--batch-size", "32", "--checkpoint-every", "20", "--no-progress", "--log-every", "10"]


@pytest.fixture(scope="module")
def run_dir(trained_run) -> Path:
    return trained_run(*TRAIN)


@pytest.fixture(scope="module")
def newest(run_dir) -> Path:
    return sorted(run_dir.glob("ckpt-*"))[-1]


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory) -> list[Path]:
    """Real digits as 8-bit PNGs (bright ink, like the data set), one as a larger RGB image."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("pngs")
    raw = load_digits()
    paths = []
    for i in (0, 1, 2):
        path = folder / f"digit{raw.target[i]}-{i}.png"
        Image.fromarray((raw.images[i] * 255 / 16).astype(np.uint8)).save(path)
        paths.append(path)
    nested = folder / "more"
    nested.mkdir()
    big = Image.fromarray((raw.images[3] * 255 / 16).astype(np.uint8)).resize((32, 32)).convert("RGB")
    big.save(nested / "b-digit.png")
    Image.fromarray((raw.images[4] * 255 / 16).astype(np.uint8)).save(nested / "a-digit.png")
    (nested / "notes.txt").write_text("not an image, skipped inside folders")
    return paths


@pytest.fixture(autouse=True)
def restore_logging():
    """The commands configure the dist_train logger (as every job does); put it back for other tests."""
    logger = logging.getLogger("dist_train")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def cli(capsys, *args) -> tuple[int, str, str]:
    return call_cli([str(a) for a in args], capsys)


def reference(checkpoint: Path):
    from dist_train.inference.loading import load_model, rebuild_data

    loaded = load_model(str(checkpoint))
    return loaded, rebuild_data(loaded)


def expected_top(loaded, inputs: torch.Tensor, k: int) -> tuple[list[list[int]], list[list[float]]]:
    with torch.no_grad():
        probabilities = torch.softmax(loaded.model(inputs).double(), dim=1)
    values, indices = probabilities.topk(k, dim=1)
    return indices.tolist(), values.tolist()


def check_ranked(top: list[dict]) -> None:
    probabilities = [t["probability"] for t in top]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(0 <= p <= 1 for p in probabilities)
    assert sum(probabilities) <= 1 + 1e-9


def test_predict_files_match_the_models_own_forward_pass(capsys, run_dir, newest, digit_pngs):
    from PIL import Image

    folder = digit_pngs[0].parent / "more"
    code, out, err = cli(capsys, "predict", "--checkpoint", run_dir, *digit_pngs, folder, "--top-k", "3", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["checkpoint"] == str(newest) and report["step"] == 40
    files = [*map(str, digit_pngs), str(folder / "a-digit.png"), str(folder / "b-digit.png")]
    assert [p["input"] for p in report["predictions"]] == files

    loaded, bundle = reference(newest)
    inputs = torch.stack([bundle.eval_transform(Image.open(f).convert("L")) for f in files])
    classes, probabilities = expected_top(loaded, inputs, 3)
    for prediction, want_classes, want_probs in zip(report["predictions"], classes, probabilities):
        assert [t["class"] for t in prediction["top_k"]] == want_classes
        assert [t["name"] for t in prediction["top_k"]] == [loaded.class_names[c] for c in want_classes]
        assert [t["probability"] for t in prediction["top_k"]] == pytest.approx(want_probs, abs=1e-6)
        check_ranked(prediction["top_k"])


def test_top_k_is_sorted_sums_to_at_most_one_and_is_capped_at_the_class_count(capsys, run_dir, digit_pngs):
    code, out, err = cli(capsys, "predict", "--checkpoint", run_dir, digit_pngs[0], "--top-k", "99", "--json")
    assert code == 0, err
    top = json.loads(out)["predictions"][0]["top_k"]
    assert len(top) == 10
    check_ranked(top)
    assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-9)


def test_predict_without_inputs_shows_validation_samples_with_true_labels(capsys, newest):
    code, out, err = cli(capsys, "predict", "--checkpoint", newest, "--samples", "4", "--top-k", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"checkpoint {newest} (step 40, cnn, 10 classes)")
    loaded, bundle = reference(newest)
    inputs = torch.stack([bundle.val[i][0] for i in range(4)])
    classes, _ = expected_top(loaded, inputs, 2)
    for i, line in enumerate(lines[1:]):
        label = bundle.val[i][1]
        match = re.fullmatch(rf"val\[{i}\] \(true {label}, (ok|WRONG)\)  ->  (\d): [0-9.]+   (\d): [0-9.]+", line)
        assert match, line
        assert [int(match.group(2)), int(match.group(3))] == classes[i]
        assert match.group(1) == ("ok" if classes[i][0] == label else "WRONG")
    assert len(lines) == 5


@pytest.fixture
def foreign_checkpoints(tmp_path, newest) -> dict[str, Path]:
    """Copies of a real checkpoint: one whose manifest declares another model, one with a damaged model file."""
    relabelled = tmp_path / "relabelled" / newest.name
    shutil.copytree(newest, relabelled)
    manifest = json.loads((relabelled / "manifest.json").read_text())
    manifest["model"]["name"] = "mlp"
    (relabelled / "manifest.json").write_text(json.dumps(manifest))
    damaged = tmp_path / "damaged" / newest.name
    shutil.copytree(newest, damaged)
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (damaged / "model.safetensors").write_bytes(bytes(data))
    return {"relabelled": relabelled, "damaged": damaged}


@pytest.mark.parametrize("case, pattern", [
    ("missing checkpoint", r"checkpoint not found: .*nowhere"),
    ("empty folder", r"no checkpoint in .*"),
    ("unreadable image", r"cannot read image .*broken\.png"),
    ("missing image", r"input not found: .*absent\.png"),
    ("--model of another architecture", r"holds a cnn\b.*, not resnet18"),
    ("manifest declares another model", r"does not fit the model"),
    ("damaged model file", r"does not match its sha256"),
    ("bad --top-k", r"--top-k must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, run_dir, digit_pngs, foreign_checkpoints, case,
                                          pattern):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image decoder wants")
    (tmp_path / "empty").mkdir()
    args = {"missing checkpoint": ["--checkpoint", tmp_path / "nowhere"],
            "empty folder": ["--checkpoint", tmp_path / "empty"],
            "unreadable image": ["--checkpoint", run_dir, broken],  # the only input: nothing to predict
            "missing image": ["--checkpoint", run_dir, tmp_path / "absent.png"],
            "--model of another architecture": ["--checkpoint", run_dir, "--model", "resnet18"],
            "manifest declares another model": ["--checkpoint", foreign_checkpoints["relabelled"]],
            "damaged model file": ["--checkpoint", foreign_checkpoints["damaged"]],
            "bad --top-k": ["--checkpoint", run_dir, "--top-k", "0"]}[case]
    code, out, err = cli(capsys, "predict", *args)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("dist-train: error: ")
    assert re.search(pattern, err), err


def test_a_run_dir_means_its_newest_valid_checkpoint(capsys, tmp_path, run_dir):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    refs = sorted(copy.glob("ckpt-*"))
    damaged = refs[-1] / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\0")  # same size: only the sha256 catches it
    code, out, err = cli(capsys, "predict", "--checkpoint", copy, "--samples", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["checkpoint"] == str(refs[-2]) and json.loads(out)["step"] == 20
    assert f"skipping checkpoint {refs[-1]}" in err and "sha256" in err


def test_predict_reads_a_checkpoint_on_s3(capsys, s3_env, s3_bucket, newest):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    for path in newest.iterdir():
        client.put_object(Bucket=s3_bucket, Key=f"run/{newest.name}/{path.name}", Body=path.read_bytes())
    code, out, err = cli(capsys, "predict", "--checkpoint", f"s3://{s3_bucket}/run", "--samples", "2", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["checkpoint"] == f"s3://{s3_bucket}/run/{newest.name}" and len(report["predictions"]) == 2


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_loads_into_a_fresh_model_with_identical_outputs(capsys, tmp_path, monkeypatch, run_dir, newest,
                                                                suffix):
    from dist_train.models import ModelSpec, build_model

    out = tmp_path / "deploy" / f"digits{suffix}"
    code, stdout, err = cli(capsys, "export", "--checkpoint", run_dir, "--out", out)
    assert code == 0, err
    info = json.loads(Path(f"{out}.json").read_text())
    manifest = json.loads((newest / "manifest.json").read_text())
    assert info["model"] == manifest["model"] and info["model_digest"] == manifest["model_digest"]
    assert info["class_names"] == manifest["class_names"] and info["source"]["step"] == 40

    if suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(out)
    else:
        state = torch.load(out, map_location="cpu", weights_only=True)
    assert type(state) is dict and all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = build_model(ModelSpec.from_dict(info["model"]))
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    loaded, _ = reference(newest)
    inputs = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(inputs), loaded.model(inputs))

    # The README's snippet is runnable as written, next to the exported file.
    readme = Path(f"{out}.README.md").read_text()
    code_block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "from dist_train.models import ModelSpec, build_model" in code_block
    monkeypatch.chdir(out.parent)
    exec(compile(code_block, "README snippet", "exec"), {})
    assert capsys.readouterr().out.strip() in info["class_names"]


def test_export_refuses_to_overwrite_without_force_and_refuses_a_foreign_model(capsys, tmp_path, run_dir,
                                                                               foreign_checkpoints):
    out = tmp_path / "model.safetensors"
    assert cli(capsys, "export", "--checkpoint", run_dir, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert sorted(before) == ["model.safetensors", "model.safetensors.README.md", "model.safetensors.json"]

    code, stdout, err = cli(capsys, "export", "--checkpoint", run_dir, "--out", out)
    assert code == 2 and "already exists" in err and "--force" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before

    other = tmp_path / "other.pt"
    code, stdout, err = cli(capsys, "export", "--checkpoint", foreign_checkpoints["relabelled"], "--out", other)
    assert code == 2 and "does not fit the model" in err
    code, stdout, err = cli(capsys, "export", "--checkpoint", run_dir, "--model", "mlp", "--out", other)
    assert code == 2 and re.search(r"holds a cnn\b.*, not mlp", err), err
    code, stdout, err = cli(capsys, "export", "--checkpoint", run_dir, "--out", tmp_path / "model.bin")
    assert code == 2 and ".safetensors or .pt" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before

    assert cli(capsys, "export", "--checkpoint", run_dir, "--out", out, "--force")[0] == 0
    assert (tmp_path / "model.safetensors").read_bytes() == before["model.safetensors"]


def single_process_reference(newest: Path, split: str, batch_size: int):
    from dist_train.distributed.env import DistEnv
    from dist_train.inference.evaluate import evaluate_split, result_dict

    loaded, bundle = reference(newest)
    env = DistEnv(0, 1, 0, torch.device("cpu"), None)
    result = evaluate_split(env, loaded, bundle, split, batch_size)
    return result, result_dict(loaded, split, result)


@pytest.mark.timeout(240)
def test_evaluate_under_two_rank_torchrun_equals_single_process(run_dir, newest):
    result, one = single_process_reference(newest, "test", 16)
    assert one["count"] == 270 and sum(map(sum, one["confusion"])) == 270
    assert one["accuracy"] == pytest.approx(sum(one["confusion"][i][i] for i in range(10)) / 270)

    double = run_torchrun(2, ["evaluate", "--checkpoint", str(run_dir), "--split", "test", "--batch-size", "16",
                              "--json"])
    assert double.returncode == 0, double.stderr
    two = json.loads(double.stdout)  # rank 0 alone prints
    assert two["checkpoint"] == str(newest) and two["count"] == one["count"]
    assert two["confusion"] == one["confusion"]
    assert two["accuracy"] == one["accuracy"]
    assert two["per_class_accuracy"] == one["per_class_accuracy"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)



def test_evaluate_command_in_one_process_prints_loss_accuracy_and_confusion(capsys, run_dir, newest):
    result, _ = single_process_reference(newest, "test", 16)
    code, out, err = cli(capsys, "evaluate", "--checkpoint", run_dir, "--split", "test", "--batch-size", "16")
    assert code == 0, err
    assert out.startswith(f"checkpoint {newest} (step 40, cnn, classification)\n")
    assert f"test: 270 samples  loss {result.loss:.4f}  accuracy {result.accuracy:.4f}" in out
    assert "per-class accuracy:" in out and "confusion matrix (rows: true class, columns: predicted):" in out
    rows = [line.split() for line in out.splitlines()[-10:]]
    assert [int(r[0]) for r in rows] == list(range(10))
    assert [[int(v) for v in r[1:]] for r in rows] == result.confusion.tolist()


def test_evaluate_val_reproduces_the_validation_of_training(newest):
    """Same split, same normalisation: the checkpoint's recorded val loss comes out again."""
    from dist_train.inference.evaluate import format_result

    result, report = single_process_reference(newest, "val", 32)
    manifest = json.loads((newest / "manifest.json").read_text())
    assert result.loss == pytest.approx(manifest["metrics"]["val_loss"], rel=1e-9)
    assert result.accuracy == pytest.approx(manifest["metrics"]["val_accuracy"])
    text = "\n".join(format_result(report))
    assert f"val: {result.count} samples  loss {result.loss:.4f}" in text
    assert "per-class accuracy:" in text and "confusion matrix (rows: true class" in text


# -- the tutorial workflow: transfer learning on an image folder, deployed without the data ------------

CLASSES = ("ants", "bees", "wasps")
COLOURS = {"ants": (200, 40, 40), "bees": (230, 200, 30), "wasps": (40, 40, 200)}


def image(label: str, i: int, size: tuple[int, int] = (48, 36)):
    """A class-coloured picture with a bar in it, never square: resize and crop both matter."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", size, tuple(max(0, c - 6 * i) for c in COLOURS[label]))
    ImageDraw.Draw(picture).rectangle((4 + i, 6, 20 + i, 12), fill=(255, 255, 255))
    return picture


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, trained_run) -> Path:
    """resnet18 trained on an image folder (train/ and val/); the folder is gone afterwards."""
    base = tmp_path_factory.mktemp("tutorial")
    data = base / "hymenoptera"
    for split, count in (("train", 4), ("val", 2)):
        for label in CLASSES:
            (data / split / label).mkdir(parents=True)
            for i in range(count):
                image(label, i).save(data / split / label / f"{i}.jpg")
    run = trained_run("--dataset", "image_folder", "--data-root", str(data), "--model", "resnet18",
                      "--image-size", "32", "--epochs", "1", "--batch-size", "6", "--no-progress")
    shutil.rmtree(data)
    return run


def test_every_manifest_records_the_preprocessing(newest, folder_run):
    manifest = json.loads((sorted(folder_run.glob("ckpt-*"))[-1] / "manifest.json").read_text())
    record = manifest["data_info"]["preprocessing"]
    assert {k: record[k] for k in ("input", "image_mode", "channels", "image_size", "resize", "center_crop",
                                   "mean", "std", "class_names")} == {
        "input": "image", "image_mode": "RGB", "channels": 3, "image_size": 32, "resize": 37, "center_crop": 32,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "class_names": list(CLASSES)}
    assert record["torchvision"] == ("image.convert('RGB') -> Compose([Resize(37), CenterCrop(32), ToTensor(), "
                                     "Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])")
    digits = json.loads((newest / "manifest.json").read_text())["data_info"]
    assert digits["preprocessing"]["image_mode"] == "L" and digits["preprocessing"]["resize"] == [8, 8]
    assert digits["preprocessing"]["mean"] == [digits["mean"]] and digits["preprocessing"]["std"] == [digits["std"]]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_backbone_export_loads_into_plain_torchvision_with_the_tutorial_code(capsys, tmp_path, monkeypatch,
                                                                             folder_run, suffix):
    import torchvision
    from PIL import Image
    from torch import nn
    from torchvision import transforms as T

    out = tmp_path / f"model{suffix}"
    code, _, err = cli(capsys, "export", "--checkpoint", folder_run, "--out", out)
    assert code == 0, err
    model = torchvision.models.resnet18()
    model.fc = nn.Linear(512, 3)
    if suffix == ".pt":
        model.load_state_dict(torch.load(out, weights_only=True))
    else:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(out))
    model.eval()

    # The sidecar alone says how to preprocess: the user rebuilds it with torchvision, no dist_train.
    info = json.loads(Path(f"{out}.json").read_text())
    assert info["state_dict_keys"] == "torchvision" and info["class_names"] == list(CLASSES)
    assert info["torchvision"]["head"] == "model.fc = nn.Linear(512, 3)"
    pre = info["preprocessing"]
    preprocess = T.Compose([T.Resize(pre["resize"]), T.CenterCrop(pre["center_crop"]), T.ToTensor(),
                            T.Normalize(pre["mean"], pre["std"])])
    pictures = [image(label, 1, (60, 44)) for label in CLASSES]
    inputs = torch.stack([preprocess(p.convert(pre["image_mode"])) for p in pictures])
    loaded, _ = reference_model(folder_run)
    with torch.no_grad():
        assert torch.equal(model(inputs), loaded.model(inputs))

    readme = Path(f"{out}.README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "torchvision.models.resnet18()" in snippet and "dist_train" not in snippet
    monkeypatch.chdir(out.parent)
    capsys.readouterr()
    exec(compile(snippet, "README snippet", "exec"), {})
    assert capsys.readouterr().out.strip() in CLASSES


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_a_backbone_graph_takes_the_recorded_input_size(capsys, tmp_path, folder_run):
    """torchvision factories take no image_size: the graph's input shape comes from the preprocessing record."""
    out = tmp_path / "model.ts"
    code, _, err = cli(capsys, "export", "--checkpoint", folder_run, "--out", out, "--format", "torchscript")
    assert code == 0, err
    info = json.loads(Path(f"{out}.json").read_text())
    assert info["input_shape"] == [3, 32, 32] and info["data"]["image_size"] == 32
    assert "inputs of 3x32x32" in Path(f"{out}.README.md").read_text()
    loaded, _ = reference_model(folder_run)
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(out))(inputs), loaded.model(inputs), atol=1e-5)


def reference_model(run: Path):
    from dist_train.inference.loading import load_model

    loaded = load_model(str(run))
    return loaded, sorted(run.glob("ckpt-*"))[-1]


def test_predict_on_new_images_needs_only_the_checkpoint(capsys, tmp_path, folder_run):
    """The training folder is gone; new pictures of other sizes and modes are preprocessed as validation was."""
    from PIL import Image

    from dist_train.data.transforms import eval_transform

    new = tmp_path / "new"
    new.mkdir()
    image("bees", 2, (90, 70)).save(new / "bee.png")
    image("ants", 3, (50, 64)).convert("L").save(new / "ant-gray.jpg")
    image("wasps", 0, (40, 40)).convert("RGBA").save(new / "wasp.png")
    code, out, err = cli(capsys, "predict", "--checkpoint", folder_run, new, "--top-k", "3", "--json")
    assert code == 0, err
    report = json.loads(out)
    files = [str(new / n) for n in ("ant-gray.jpg", "bee.png", "wasp.png")]
    assert [p["input"] for p in report["predictions"]] == files

    loaded, checkpoint = reference_model(folder_run)
    record = json.loads((checkpoint / "manifest.json").read_text())["data_info"]["preprocessing"]
    transform = eval_transform(record)
    inputs = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    classes, probabilities = expected_top(loaded, inputs, 3)
    for prediction, want_classes, want_probs in zip(report["predictions"], classes, probabilities):
        assert [t["class"] for t in prediction["top_k"]] == want_classes
        assert [t["name"] for t in prediction["top_k"]] == [CLASSES[c] for c in want_classes]
        assert [t["probability"] for t in prediction["top_k"]] == pytest.approx(want_probs, abs=1e-6)


def test_a_file_named_twice_is_predicted_once_and_a_broken_one_does_not_stop_the_rest(capsys, tmp_path, run_dir,
                                                                                     digit_pngs):
    folder = tmp_path / "scans"
    folder.mkdir()
    for path in digit_pngs:
        shutil.copy(path, folder / path.name)
    (folder / "b-truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 40)
    named = folder / digit_pngs[1].name
    code, out, err = cli(capsys, "predict", "--checkpoint", run_dir, named, folder, f"{folder}/../scans", "--json")
    assert code == 1
    assert err.splitlines() == [f"dist-train: error: cannot read image {folder / 'b-truncated.jpg'}: "
                                "not an image Pillow can decode"]
    report = json.loads(out)
    inputs = [p["input"] for p in report["predictions"]]
    assert inputs == [str(named)] + [str(folder / p.name) for p in digit_pngs if p.name != named.name]
    assert report["failed"] == [{"input": str(folder / "b-truncated.jpg"),
                                 "error": f"cannot read image {folder / 'b-truncated.jpg'}: "
                                          "not an image Pillow can decode"}]

    code, out, err = cli(capsys, "predict", "--checkpoint", run_dir, folder)
    assert code == 1 and len(err.splitlines()) == 1 and "b-truncated.jpg" in err
    assert len(out.splitlines()) == 1 + len(digit_pngs)


def test_a_checkpoint_from_before_the_record_still_predicts_files(capsys, tmp_path, newest, digit_pngs):
    old = tmp_path / newest.name
    shutil.copytree(newest, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["data_info"]["preprocessing"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    results = []
    for checkpoint in (newest, old):
        code, out, err = cli(capsys, "predict", "--checkpoint", checkpoint, *digit_pngs, "--json")
        assert code == 0, err
        results.append([p["top_k"] for p in json.loads(out)["predictions"]])
    assert results[0] == results[1]


def write_fake_mnist(root: Path, n: int = 12) -> None:
    """torchvision's MNIST files (idx format), small: enough for MNIST(root) to open them."""
    import struct

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        pixels = generator.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + pixels.tobytes())
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def test_torchvision_data_sets_record_the_preprocessing_predict_rebuilds(tmp_path):
    """MNIST's record rebuilds validation's transform exactly, and sizes any other picture to 28x28."""
    from PIL import Image

    from dist_train.data.config import DataConfig
    from dist_train.data.registry import build_datasets
    from dist_train.data.transforms import eval_transform

    write_fake_mnist(tmp_path)
    bundle = build_datasets(DataConfig(dataset="mnist", data_root=str(tmp_path), val_fraction=0.25), seed=0)
    record = bundle.info["preprocessing"]
    assert {k: record[k] for k in ("image_mode", "channels", "image_size", "resize", "center_crop", "mean", "std")} \
        == {"image_mode": "L", "channels": 1, "image_size": 28, "resize": [28, 28], "center_crop": None,
            "mean": [0.1307], "std": [0.3081]}
    assert record["class_names"] == bundle.class_names and len(record["class_names"]) == 10
    transform = eval_transform(record)
    base = bundle.val.base
    for i in bundle.val.indices[:3]:
        picture, _ = base[i]
        assert torch.equal(transform(picture), bundle.val.transform(picture))
    assert transform(Image.new("RGB", (100, 80), (200, 10, 10))).shape == (1, 28, 28)
