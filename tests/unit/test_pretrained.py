"""`--pretrained-weights` takes the weights tutorial users have, and says clearly what did not fit.

Each form is made the way a tutorial makes it (torch.save of a state_dict, of the general
checkpoint dict, of a DDP model's state_dict; a dist_train checkpoint and export), then
handed to the backbone factory the trainer calls: resnet18 (the tutorials' model) and the
smaller mobilenet_v3_small (a head inside a Sequential), on CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dist_train.errors import UserError
from dist_train.models.backbones import TransferModel, build_backbone


def stock_net(name: str = "resnet18") -> nn.Module:
    """The torchvision model with non-default BatchNorm statistics, as after pretraining."""
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.num_batches_tracked.fill_(7)
    return net


@pytest.fixture(scope="module")
def stock() -> dict[str, torch.Tensor]:
    return stock_net().state_dict()


@pytest.fixture(scope="module")
def small() -> dict[str, torch.Tensor]:
    return stock_net("mobilenet_v3_small").state_dict()


def backbone_equal(model: TransferModel, state: dict[str, torch.Tensor]) -> None:
    own = model.torchvision_state_dict()
    head = model.head_name + "."
    for key, tensor in state.items():
        if not key.startswith(head):
            assert torch.equal(own[key], tensor), key


@pytest.mark.parametrize("form", ["state_dict", "safetensors", "general checkpoint", "ddp", "ddp checkpoint"])
def test_tutorial_forms_load_the_backbone_and_get_a_new_head(tmp_path, stock, form):
    path = tmp_path / ("w.safetensors" if form == "safetensors" else "w.pt")
    ddp = {f"module.{k}": v for k, v in stock.items()}
    if form == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in stock.items()}, path)
    else:
        optimizer = torch.optim.SGD([nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9)
        optimizer.step()  # momentum buffers: the optimizer state a tutorial checkpoint holds
        payload = {"state_dict": stock, "ddp": ddp,
                   "general checkpoint": {"epoch": 3, "model_state_dict": stock,
                                          "optimizer_state_dict": optimizer.state_dict(), "loss": torch.tensor(0.5)},
                   "ddp checkpoint": {"epoch": 3, "model_state_dict": ddp}}[form]
        torch.save(payload, path)
    model = build_backbone("resnet18", num_classes=3, pretrained_weights=str(path))
    backbone_equal(model, stock)
    assert model.net.fc.weight.shape == (3, 512)


def test_an_earlier_runs_checkpoint_run_dir_and_export_fine_tune_with_their_head(tmp_path):
    """A dist_train checkpoint holds `net.` keys; an export torchvision's: both load, head included."""
    from dist_train import CheckpointManager
    from dist_train.inference.export import deployable_state_dict

    name = "mobilenet_v3_small"
    earlier = build_backbone(name, num_classes=3)
    with torch.no_grad():
        earlier.net.classifier[3].weight.normal_()
    run_dir = tmp_path / "run"
    manager = CheckpointManager(str(run_dir))
    manager.save(5, {"model": earlier})
    assert manager.close()
    checkpoint = next(run_dir.glob("ckpt-*"))

    state, keys = deployable_state_dict(earlier)
    assert keys == "torchvision" and "classifier.3.weight" in state and not any(k.startswith("net.") for k in state)
    export = tmp_path / "export.pt"
    torch.save(state, export)
    old_export = tmp_path / "old-export.pt"  # exports before torchvision keys carried `net.`
    torch.save(earlier.state_dict(), old_export)

    for source in (run_dir, checkpoint, export, old_export):
        model = build_backbone(name, num_classes=3, pretrained_weights=str(source))
        for key, tensor in earlier.state_dict().items():
            assert torch.equal(model.state_dict()[key], tensor), (source, key)

    # another class count: the backbone is taken, the head is new
    model = build_backbone(name, num_classes=5, pretrained_weights=str(checkpoint))
    backbone_equal(model, earlier.torchvision_state_dict())
    assert model.net.classifier[3].weight.shape == (5, 1024)


def test_a_transfer_model_loads_torchvision_keys_and_its_own(stock):
    model = build_backbone("resnet18", num_classes=1000)
    model.load_state_dict(stock)  # an export, or the tutorial's weights
    backbone_equal(model, stock)
    saved = copy.deepcopy(model.state_dict())  # a checkpoint: `net.` keys
    assert all(k.startswith("net.") for k in saved)
    with torch.no_grad():
        model.net.conv1.weight.zero_()
    model.load_state_dict(saved)
    backbone_equal(model, stock)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({"conv1.weight": stock["conv1.weight"]})


def test_weights_of_another_model_name_what_did_not_fit(tmp_path, stock):
    path = tmp_path / "resnet18.pt"
    torch.save(stock, path)
    with pytest.raises(UserError) as info:
        build_backbone("mobilenet_v3_small", num_classes=3, pretrained_weights=str(path))
    message = str(info.value)
    assert message.startswith(f"pretrained weights {path} do not fit mobilenet_v3_small: ")
    assert "missing (features.0.0.weight," in message and "unexpected (conv1.weight," in message
    assert "more" in message and "Expected torchvision's mobilenet_v3_small (keys like 'features.0.0.weight'" in message
    assert "model_state_dict" in message and "module." in message


def test_errors_never_carry_terminal_escape_codes(tmp_path, small):
    hostile = dict(small)
    hostile["\x1b[2J\x1b[31mevil\x07"] = torch.zeros(1)
    path = tmp_path / "hostile.pt"
    torch.save(hostile, path)
    with pytest.raises(UserError) as info:
        build_backbone("mobilenet_v3_small", num_classes=3, pretrained_weights=str(path))
    message = str(info.value)
    assert "1 unexpected" in message and "evil" in message
    assert not any(ord(c) < 32 or ord(c) == 127 for c in message), repr(message)


def test_shape_mismatch_and_non_tensor_files_are_explained(tmp_path, small):
    bad = dict(small)
    bad["features.0.0.weight"] = torch.zeros(16, 1, 3, 3)
    path = tmp_path / "gray.pt"
    torch.save(bad, path)
    with pytest.raises(UserError, match=r"1 of another shape \(features.0.0.weight \[16, 1, 3, 3\] in the file, "
                                        r"\[16, 3, 3, 3\] in the model\)"):
        build_backbone("mobilenet_v3_small", num_classes=3, pretrained_weights=str(path))

    plain = tmp_path / "numbers.pt"
    torch.save({"epoch": 3, "lr": 0.1}, plain)
    with pytest.raises(UserError, match="hold no state_dict of tensors; expected a state_dict of the torchvision"):
        build_backbone("mobilenet_v3_small", num_classes=3, pretrained_weights=str(plain))


def test_a_pickled_object_is_refused_without_running_it(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), path)  # the whole module, pickled: weights_only refuses it
    with pytest.raises(UserError, match="cannot load pretrained weights .*could run arbitrary code; "
                                        "save model.state_dict\\(\\) alone"):
        build_backbone("mobilenet_v3_small", num_classes=3, pretrained_weights=str(path))


def test_a_folder_without_checkpoints_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint in"):
        build_backbone("mobilenet_v3_small", num_classes=3, pretrained_weights=str(tmp_path / "empty"))
