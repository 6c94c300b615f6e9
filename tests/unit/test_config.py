"""Config: defaults < YAML < flags, and every bad value is refused with the key and what it accepts."""

from __future__ import annotations

import pytest
import yaml

from dist_train.cli.main import build_parser
from dist_train.config.job import JobConfig, dump_yaml, resolve
from dist_train.errors import UserError


def parse(argv: list[str]) -> JobConfig:
    return resolve(build_parser().parse_args(["train", *argv]))


def test_defaults_are_the_embedded_quick_job():
    cfg = parse([])
    assert cfg.data.dataset == "digits" and cfg.model.model == "cnn"
    assert cfg.checkpoint.resume == "auto" and cfg.checkpoint.async_checkpoint is False


def test_yaml_sets_keys_and_flags_override_it(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("lr: 0.05\nbatch-size: 16\noptimizer: sgd\nasync_checkpoint: true\nepochs: 4\n")
    cfg = parse(["--config", str(path), "--lr", "0.2", "--no-async-checkpoint"])
    assert cfg.optim.lr == 0.2  # flag wins
    assert cfg.data.batch_size == 16 and cfg.optim.optimizer == "sgd" and cfg.train.epochs == 4  # from YAML
    assert cfg.checkpoint.async_checkpoint is False  # boolean flag wins over YAML


def test_print_config_output_loads_back_as_the_same_config(tmp_path):
    cfg = parse(["--lr", "0.01", "--model", "mlp", "--epochs", "3", "--keep-last", "2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    again = parse(["--config", str(path)])
    assert again.to_dict() == cfg.to_dict()


def test_yaml_scientific_notation_and_null_are_understood(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("lr: 1e-3\nmax_steps: null\n")
    cfg = parse(["--config", str(path)])
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.train.max_steps is None


@pytest.mark.parametrize("argv, words", [
    (["--lr", "-1"], ["lr", "--lr", "> 0"]),
    (["--lr", "abc"], ["lr", "number"]),
    (["--batch-size", "0"], ["batch_size", "> 0"]),
    (["--model", "vgg99"], ["model", "cnn", "mlp", "resnet18", "mobilenet_v2"]),
    (["--dataset", "imagenet22k"], ["dataset", "digits", "mnist"]),
    (["--optimizer", "lion"], ["optimizer", "adam", "sgd"]),
    (["--val-fraction", "1.5"], ["val_fraction", "[0, 1)"]),
    (["--epochs", "2.5"], ["epochs", "whole number"]),
    (["--resume", "sometimes"], ["resume", "auto", "never"]),
    (["--storage-options", "[1, 2]"], ["storage_options", "JSON object"]),
    (["--dataset", "mnist"], ["mnist", "--data-root"]),
    (["--dataset", "mnist", "--data-root", "/nonexistent/mnist"], ["data root not found", "--download"]),
    (["--dataset", "image_folder", "--data-root", "/nonexistent/images"], ["data root not found", "class folders"]),
    (["--freeze-backbone"], ["--freeze-backbone", "backbone"]),
])
def test_bad_values_name_the_key_and_what_it_accepts(argv, words):
    with pytest.raises(UserError) as err:
        parse(argv)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_image_folder_errors_never_suggest_download():
    """--download fetches torchvision's data sets only; it cannot make an image folder appear."""
    for extra in ([], ["--download"]):
        with pytest.raises(UserError) as err:
            parse(["--dataset", "image_folder", "--data-root", "/nonexistent/images", *extra])
        assert "data root not found" in str(err.value) and "--download" not in str(err.value)


def test_help_shows_every_default():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    text = " ".join(train.format_help().split())
    for shown in ("(default: 10)", "(default: adam)", "(default: 0.001)", "(default: runs/default)",
                  "(default: {})", "(default: false)", "(default: true)", "(default: not set)"):
        assert shown in text
    epochs = text.rsplit("--epochs EPOCHS", 1)[1].split("--max-steps MAX_STEPS", 1)[0]  # its entry, not the usage line
    assert epochs.endswith("(default: 10) ")


def test_unknown_flag_is_a_user_error():
    with pytest.raises(UserError, match="unrecognized arguments: --learning-rate"):
        build_parser().parse_args(["train", "--learning-rate", "0.1"])


def test_bad_yaml_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UserError, match="config file not found"):
        parse(["--config", str(missing)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [0.1\nepochs: 3\n")
    with pytest.raises(UserError, match="not valid YAML"):
        parse(["--config", str(broken)])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("learning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown key 'learning_rate'"):
        parse(["--config", str(unknown)])
    typo = tmp_path / "typo.yaml"
    typo.write_text("epoch: 3\n")
    with pytest.raises(UserError, match=r"unknown key 'epoch' in config file .*; did you mean 'epochs'\?$"):
        parse(["--config", str(typo)])
    typo.write_text("optim:\n  batch-sise: 3\n")
    with pytest.raises(UserError, match=r"unknown key 'batch-sise' .*; did you mean 'batch-size'\?$"):
        parse(["--config", str(typo)])
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(UserError, match="mapping"):
        parse(["--config", str(scalar)])


def test_secrets_are_redacted_in_the_dump():
    cfg = parse(["--storage-options", '{"key": "my-access-key-id", "secret": "s3cr3t-value", "anon": false}'])
    dumped = dump_yaml(cfg)
    assert "s3cr3t-value" not in dumped and "my-access-key-id" not in dumped
    assert yaml.safe_load(dumped)["checkpoint"]["storage_options"] == {"key": "***", "secret": "***", "anon": "***"}


def test_fingerprint_ignores_where_things_are_stored():
    a = parse(["--run-dir", "/tmp/a", "--log-every", "3"])
    b = parse(["--run-dir", "s3://bucket/b", "--keep-last", "2"])
    c = parse(["--run-dir", "/tmp/a", "--lr", "0.5"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
