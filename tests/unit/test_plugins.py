"""Import paths, registries and tasks, in-process: what `--model/--dataset/--task MODULE:ATTR` rest on.

The user's code is `tests/support/userpkg`, put on the path per test (as PYTHONPATH would).
Every failure a user can cause is a `UserError` naming the path; nothing else escapes.
"""

from __future__ import annotations

import math
import sys
import uuid
from pathlib import Path

import pytest
import torch

from dist_train.data.registry import DATASETS, bundle_from_factory
from dist_train.errors import UserError
from dist_train.models.registry import MODELS, ModelSpec, build_model, make_spec
from dist_train.plugins import Registry, accepted_kwargs, call_user, import_object, is_import_path, qualified_name
from dist_train.training.tasks import Classification, CustomTask, LanguageModel, Regression, Task, build_task

SUPPORT = Path(__file__).resolve().parents[1] / "support"


@pytest.fixture(autouse=True)
def user_path(monkeypatch):
    """userpkg importable, and sys.path as it was afterwards (import_object may add the current folder)."""
    monkeypatch.setattr(sys, "path", [str(SUPPORT), *sys.path])


# -- import_object -------------------------------------------------------------------------------

def test_import_object_finds_module_attributes_and_nested_ones():
    from userpkg import models

    assert import_object("userpkg.models:build", "--model") is models.build
    assert import_object("userpkg.models:WaveNet.forward", "--model") is models.WaveNet.forward


@pytest.mark.parametrize("path, expected", [
    ("userpkg.nowhere:build", "--model userpkg.nowhere:build: module userpkg.nowhere not found"),
    ("nopkg_here.models:build", "--model nopkg_here.models:build: module nopkg_here.models not found "
                                "(run from the folder that holds it, or put it on PYTHONPATH)"),
    ("userpkg.broken:build", "module userpkg.broken imports userpkg_missing_dependency, which is not installed"),
    ("userpkg.models:nothing", "--model userpkg.models:nothing: module userpkg.models has no attribute nothing"),
    ("userpkg.models:WaveNet.nothing", "has no attribute WaveNet.nothing"),
    ("userpkg.models:", "an import path is MODULE:ATTR"),
    (":build", "an import path is MODULE:ATTR"),
])
def test_import_object_failures_are_one_user_error_naming_the_path(path, expected):
    with pytest.raises(UserError) as caught:
        import_object(path, "--model")
    message = str(caught.value)
    assert expected in message and "\n" not in message


def test_a_module_that_raises_while_importing_is_the_users_error(tmp_path, monkeypatch):
    name = f"boom_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("raise ValueError('half-written module')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"--dataset {name}:make: importing module {name} failed: "
                                        "ValueError: half-written module"):
        import_object(f"{name}:make", "--dataset")


def test_the_current_directory_is_on_the_path_as_for_python_m(tmp_path, monkeypatch):
    name = f"here_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("def build():\n    return 'built here'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert import_object(f"{name}:build", "--model")() == "built here"
    finally:
        sys.modules.pop(name, None)


def test_is_import_path():
    assert is_import_path("pkg.mod:attr") and not is_import_path("cnn") and not is_import_path(None)


# -- accepted_kwargs, call_user, qualified_name --------------------------------------------------

def test_accepted_kwargs_offers_only_what_a_signature_takes():
    def factory(in_channels, hidden=32, *, dropout=0.0):
        return None

    def positional_only(num_classes, /, width=1):
        return None

    def anything(**kwargs):
        return None

    offered = {"in_channels": 3, "num_classes": 10, "image_size": 8, "dropout": 0.5, "width": 2}
    assert accepted_kwargs(factory, offered) == {"in_channels": 3, "dropout": 0.5}
    assert accepted_kwargs(positional_only, offered) == {"width": 2}
    assert accepted_kwargs(anything, offered) == offered
    assert accepted_kwargs(max, offered) == {}  # no signature to read: offer nothing

    from userpkg.data import Wave
    assert accepted_kwargs(Wave, {"split": "train", "features": 4, "num_classes": 3}) == \
        {"split": "train", "features": 4}


def test_call_user_turns_the_users_exception_into_one_line():
    def broken(**kwargs):
        raise KeyError("weights\nmissing")

    with pytest.raises(UserError) as caught:
        call_user(broken, "mypkg.mod:broken", "model", width=3)
    assert str(caught.value) == "model mypkg.mod:broken raised KeyError: 'weights\\nmissing'"

    def refuses():
        raise UserError("already one line")

    with pytest.raises(UserError, match="^already one line$"):
        call_user(refuses, "p:q", "model")
    assert call_user(lambda a, b=0: a + b, "p:q", "model", 1, b=2) == 3


def test_qualified_name_is_an_import_path_that_imports_the_same_object():
    from userpkg import models, tasks

    for obj in (models.build, models.WaveNet, tasks.huber):
        path = qualified_name(obj)
        assert path.startswith("userpkg.") and import_object(path, "x") is obj


# -- Registry --------------------------------------------------------------------------------------

def test_registry_has_named_entries_and_import_paths():
    registry: Registry = Registry("widget")
    registry.register("plain", len)

    @registry.register("decorated")
    def decorated():
        return "d"

    assert decorated() == "d" and registry.names() == ["decorated", "plain"]
    assert "plain" in registry and "other" not in registry
    assert list(registry.entries()) == [("decorated", decorated), ("plain", len)]
    assert registry.resolve("plain") is len
    from userpkg.models import build
    assert registry.resolve("userpkg.models:build") is build

    assert registry.check_name("plain") is None and registry.check_name("any.module:attr") is None
    assert registry.check_name("other") == "must be one of decorated, plain or an import path MODULE:ATTR"
    with pytest.raises(UserError, match="unknown widget 'other': use one of decorated, plain or an import path"):
        registry.resolve("other")
    with pytest.raises(UserError, match="--widget userpkg.models:nothing: module userpkg.models has no attribute"):
        registry.resolve("userpkg.models:nothing")


def test_builtin_models_and_data_sets_are_registry_entries():
    assert {"cnn", "mlp", "resnet18"} <= set(MODELS.names())
    assert {"digits", "synthetic", "image_folder"} <= set(DATASETS.names())


# -- the user's model and data through the registries ------------------------------------------

def test_a_user_model_spec_takes_its_args_and_only_the_shape_it_accepts():
    shape = {"num_classes": None, "in_channels": 8, "image_size": None}
    spec = make_spec("userpkg.models:build", {"hidden": 16}, {"dropout": 0.3, "width": 64}, shape)
    # built-in option flags (--dropout, --width) are not offered to a user's factory
    assert spec.as_dict() == {"name": "userpkg.models:build", "args": {"hidden": 16}, "shape": {"in_channels": 8}}
    assert ModelSpec.from_dict(spec.as_dict()) == spec and not spec.is_builtin
    model = build_model(spec)
    assert type(model).__name__ == "WaveNet" and model.head.in_features == 16
    assert model(torch.zeros(2, 8)).shape == (2, 1)


@pytest.mark.parametrize("name, expected", [
    ("userpkg.bad:raises", "model userpkg.bad:raises raised RuntimeError: the user's factory failed on purpose"),
    ("userpkg.bad:not_a_module", "model userpkg.bad:not_a_module returned a dict, not a torch.nn.Module"),
])
def test_a_user_factory_that_raises_or_returns_no_module(name, expected):
    with pytest.raises(UserError) as caught:
        build_model(ModelSpec(name, {}, {}))
    assert str(caught.value) == expected


def test_a_user_data_set_becomes_a_bundle_with_its_shape():
    from userpkg.data import Wave

    bundle = bundle_from_factory(Wave, "userpkg.data:Wave", {"features": 4})
    assert (len(bundle.train), len(bundle.val), bundle.test) == (512, 128, None)  # test: unsupported, raised
    assert bundle.in_channels == 4 and bundle.num_classes is None
    x, y = bundle.train[0]
    assert x.shape == (4,) and y.shape == ()


@pytest.mark.parametrize("attr, expected", [
    ("NoLength", "data set userpkg.bad:NoLength (split 'train') is a NoLength without __len__"),
    ("Empty", "data set userpkg.bad:Empty (split 'train') is empty"),
    ("raises", "data set userpkg.bad:raises (split 'train') raised RuntimeError"),
    ("not_a_module", "data set userpkg.bad:not_a_module (split 'train'): item 0 raised KeyError"),
])
def test_a_user_data_set_that_is_not_a_map_style_dataset(attr, expected):
    factory = import_object(f"userpkg.bad:{attr}", "--dataset")
    with pytest.raises(UserError) as caught:
        bundle_from_factory(factory, f"userpkg.bad:{attr}", {})
    assert str(caught.value).startswith(expected)


# -- tasks -------------------------------------------------------------------------------------------

def test_build_task_by_name_instance_callable_and_import_path():
    assert type(build_task("classification")) is Classification
    assert type(build_task("regression")) is Regression
    assert type(build_task("language_model")) is LanguageModel
    mine = Regression()
    assert build_task(mine) is mine

    from userpkg.tasks import huber
    for given in (huber, "userpkg.tasks:huber"):
        task = build_task(given)
        assert isinstance(task, CustomTask) and task.name == "userpkg.tasks:huber" and not task.has_classes
        losses, metrics = task.score(torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([0.0, 0.0, 0.0]))
        assert losses.tolist() == [0.0, 0.375, 1.375]  # Huber with delta 0.5
        assert metrics["abs_error"].tolist() == [0.0, 1.0, 3.0] and metrics["within_quarter"].tolist() == [1, 0, 0]


@pytest.mark.parametrize("name, expected", [
    ("huber", "unknown task 'huber'"),
    ("userpkg.tasks:nope", "--task userpkg.tasks:nope: module userpkg.tasks has no attribute nope"),
    ("userpkg.data:SIZES", "task userpkg.data:SIZES is not a callable"),
])
def test_build_task_refuses_what_is_not_a_task(name, expected):
    with pytest.raises(UserError, match=expected):
        build_task(name)


def test_a_custom_task_must_return_per_sample_losses_and_metrics():
    outputs, targets = torch.zeros(4, 1), torch.zeros(4)
    cases = [
        (lambda o, t: (o - t.unsqueeze(1)).pow(2).mean(), "must return per-sample losses of shape [batch], got ()"),
        (lambda o, t: o, "must return per-sample losses of shape [batch], got (4, 1)"),
        (lambda o, t: ([0.0] * 4, {}), "got list"),
        (lambda o, t: (o.sum(1), {"m": torch.zeros(2)}), "metrics must be a dict of per-sample tensors"),
        (lambda o, t: (o.sum(1), [o.sum(1)]), "metrics must be a dict of per-sample tensors"),
        (lambda o, t: 1 / 0, "task my.tasks:bad raised ZeroDivisionError"),
    ]
    for fn, expected in cases:
        with pytest.raises(UserError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            CustomTask(fn, "my.tasks:bad").score(outputs, targets)
    losses, metrics = CustomTask(lambda o, t: o.sum(1), "my.tasks:ok").score(outputs, targets)
    assert losses.shape == (4,) and metrics == {}


def test_builtin_tasks_score_per_sample():
    losses, metrics = Classification().score(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
    assert losses.shape == (2,) and metrics["accuracy"].tolist() == [1.0, 0.0]

    losses, metrics = Regression().score(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0]))
    assert losses.tolist() == [1.0, 4.0] and metrics["mae"].tolist() == [1.0, 2.0]
    assert metrics["mse"].tolist() == losses.tolist()
    with pytest.raises(UserError, match="regression: the model's outputs"):
        Regression().score(torch.zeros(2, 3), torch.zeros(2))

    vocab = 5
    targets = torch.tensor([[1, 2, -100], [3, -100, -100]])
    losses, metrics = LanguageModel().score(torch.zeros(2, 3, vocab), targets)
    assert torch.allclose(losses, torch.full((2,), math.log(vocab)))  # padding (-100) does not count
    summary = LanguageModel().summarize({"loss": math.log(vocab)})
    assert summary["perplexity"] == pytest.approx(vocab)


def test_task_is_the_interface():
    class Constant(Task):
        def score(self, outputs, targets):
            return torch.ones(len(outputs)), {}

    assert build_task(Constant()).score(torch.zeros(3), None)[0].tolist() == [1.0, 1.0, 1.0]
