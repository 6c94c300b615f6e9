"""Data splits and models: deterministic splits, output shapes, transfer learning with a frozen base."""

from __future__ import annotations

import pytest
import torch

from dist_train.data.config import DataConfig
from dist_train.data.datasets import split_indices
from dist_train.data.registry import build_datasets
from dist_train.errors import UserError
from dist_train.models.registry import ModelSpec, build_model
from dist_train.training.config import OptimConfig
from dist_train.training.optim import build_optimizer


def test_split_is_deterministic_by_seed_and_disjoint():
    a = split_indices(1797, 0.15, 0.15, seed=7)
    b = split_indices(1797, 0.15, 0.15, seed=7)
    c = split_indices(1797, 0.15, 0.15, seed=8)
    assert a == b and a != c
    train, val, test = a
    assert sorted(train + val + test) == list(range(1797))
    assert len(val) == len(test) == 270


def test_embedded_digits_need_no_download_and_have_real_labels():
    bundle = build_datasets(DataConfig(), seed=0)
    x, y = bundle.train[0]
    assert x.shape == (1, 8, 8) and 0 <= y < 10
    assert bundle.num_classes == 10 and len(bundle.train) + len(bundle.val) + len(bundle.test) == 1797
    assert {bundle.train[i][1] for i in range(200)} == set(range(10))


def test_digits_load_without_scikit_learn_or_torchvision_and_equal_sklearns_loader():
    import subprocess
    import sys

    # a training rank on the default data pays for neither import (seconds of CPU at every start)
    probe = ("import sys; from dist_train.data.datasets import _load_digits; images, labels = _load_digits(); "
             "from dist_train.data.config import DataConfig; from dist_train.data.registry import build_datasets; "
             "build_datasets(DataConfig(), seed=0); "
             "print(images.shape, labels.shape, 'sklearn' in sys.modules, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(1797,", "8,", "8)", "(1797,)", "False", "False"]
    from sklearn.datasets import load_digits

    from dist_train.data.datasets import _load_digits

    images, labels = _load_digits()
    reference = load_digits()
    assert (images == reference.images).all() and (labels == reference.target).all()


def test_synthetic_data_has_any_shape_and_is_reproducible():
    cfg = DataConfig(dataset="synthetic", synthetic_size=64, synthetic_shape="3,16,12", synthetic_classes=4)
    a, b = build_datasets(cfg, seed=1), build_datasets(cfg, seed=1)
    x, y = a.train[5]
    assert x.shape == (3, 16, 12) and 0 <= y < 4
    assert torch.equal(x, b.train[5][0])


def test_torchvision_data_set_without_files_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="--download"):
        build_datasets(DataConfig(dataset="mnist", data_root=str(tmp_path)), seed=0)


def test_image_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(10):
            Image.new("RGB", (40, 30), (i * 20, 100 if label == "cat" else 0, 50)).save(tmp_path / label / f"{i}.png")
    bundle = build_datasets(DataConfig(dataset="image_folder", data_root=str(tmp_path), image_size=32,
                                       val_fraction=0.2, test_fraction=0.1, augment=True), seed=0)
    assert bundle.class_names == ["cat", "dog"] and bundle.in_channels == 3
    x, y = bundle.train[0]
    assert x.shape == (3, 32, 32)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 20


def shaped(name: str, classes: int, channels: int, size: int, **args) -> ModelSpec:
    return ModelSpec(name, args, {"num_classes": classes, "in_channels": channels, "image_size": size})


@pytest.mark.parametrize("name, channels, size", [("cnn", 1, 8), ("cnn", 3, 32), ("mlp", 1, 8),
                                                  ("resnet18", 3, 32), ("mobilenet_v2", 1, 32)])
def test_model_output_shapes(name, channels, size):
    model = build_model(shaped(name, 7, channels, size))
    model.eval()
    assert model(torch.randn(2, channels, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_frozen_backbone_trains_only_the_new_head(name):
    model = build_model(shaped(name, 5, 3, 32, freeze_backbone=True))
    optimizer = build_optimizer(model, OptimConfig())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    head = {id(p) for n, p in model.named_parameters() if n.startswith(f"net.{model.head_name}.")}
    assert in_optimizer == head and len(head) == 2  # weight and bias of the new head
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    for n, p in model.named_parameters():
        if id(p) in head:
            assert p.grad is not None
        else:
            assert p.grad is None, f"frozen parameter {n} got a gradient"
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not bn.training, "a frozen backbone keeps its BatchNorm statistics"


def test_pretrained_weights_load_from_a_local_state_dict(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    stock = torchvision.models.resnet18(weights=None)
    torch.save(stock.state_dict(), tmp_path / "r18.pt")
    save_file({k: v.contiguous() for k, v in stock.state_dict().items()}, tmp_path / "r18.safetensors")
    for path in ("r18.pt", "r18.safetensors"):
        model = build_model(shaped("resnet18", 3, 3, 32, freeze_backbone=True), str(tmp_path / path))
        assert torch.equal(model.net.conv1.weight, stock.conv1.weight)
        assert model.net.fc.out_features == 3
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), tmp_path / "mnv2.pt")
    with pytest.raises(UserError, match="do not fit resnet18"):
        build_model(shaped("resnet18", 3, 3, 32), str(tmp_path / "mnv2.pt"))
