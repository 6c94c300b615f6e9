"""The job config: the components' dataclasses composed, filled from YAML and flags.

Precedence: a field's default < the YAML file given by `--config` < a flag.
Every value is coerced and checked before anything runs; the first bad one
becomes a `UserError` naming the key and what it accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import yaml

from dist_train.checkpoint.config import CheckpointConfig
from dist_train.checkpoint.storage import redact_url
from dist_train.config.fields import allowed_choices, coerce, validate
from dist_train.data.config import DATASETS_NEEDING_ROOT, DataConfig
from dist_train.errors import UserError
from dist_train.models.config import ModelConfig
from dist_train.training.config import OptimConfig, TrainConfig


@dataclass
class JobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    #: the keys a YAML file or a flag set (`resolve` fills it in); not a section, so not in config.yaml.
    #: Empty for a config built in code: there an unset field is None.
    given: ClassVar[frozenset[str]] = frozenset()

    def to_dict(self, redact_secrets: bool = True) -> dict[str, dict[str, Any]]:
        """Nested plain dict; secret fields keep their keys but lose their values."""
        out: dict[str, dict[str, Any]] = {}
        for section_name, section in _sections(self):
            values = {}
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if redact_secrets and f.metadata["secret"] and value:
                    value = {k: "***" for k in value} if isinstance(value, dict) else "***"
                elif redact_secrets and isinstance(value, str) and "@" in value and "://" in value:
                    value = redact_url(value)  # a URL's user:password never reaches config.yaml or a manifest
                values[f.name] = value
            out[section_name] = values
        return out

    def fingerprint(self) -> str:
        """sha256 of what shapes the training math (not where it is stored or how it is logged)."""
        semantic = self.to_dict()
        semantic.pop("checkpoint")
        for key in ("log_every", "progress", "preempt_deadline", "sample_log", "device", "preemption_notice",
                    "exit_on_notice", "notice_interval"):
            semantic["train"].pop(key)
        semantic["data"].pop("num_workers")
        semantic["data"].pop("data_root")
        return hashlib.sha256(json.dumps(semantic, sort_keys=True).encode()).hexdigest()


def _sections(config: JobConfig) -> Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(config):
        yield f.name, getattr(config, f.name)


def _field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Field name -> (section, field); names are unique across sections (a flat namespace)."""
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section in dataclasses.fields(JobConfig):
        for f in dataclasses.fields(section.default_factory()):
            assert f.name not in index, f"config field {f.name} declared twice"
            index[f.name] = (section.name, f)
    return index


FIELDS = _field_index()


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (default suppressed, so we know which were given)."""
    parser.add_argument("--config", metavar="FILE", help="YAML file with the same keys as the flags")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, (section, f) in FIELDS.items():
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(f"{section} options"))
        meta = f.metadata
        kwargs: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS, "help": _help_with_default(f)}
        if meta["kind"] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            choices = allowed_choices(meta)
            kwargs["metavar"] = "{" + ",".join(choices) + "}" if choices else key.upper()
        group.add_argument(flag_name(key), **kwargs)


def _help_with_default(f: dataclasses.Field) -> str:
    """The field's help with its default, as `--help` shows it: "... (default: 10)"."""
    text = f.metadata["help"]
    if "default" in text:  # the help already says it in words ("default: native size")
        return text.replace("%", "%%")
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if default is None:
        shown = "not set"
    elif isinstance(default, bool):
        shown = "true" if default else "false"
    elif isinstance(default, (dict, list)):
        shown = json.dumps(default)
    else:
        shown = str(default)
    return f"{text} (default: {shown})".replace("%", "%%")  # argparse %-formats help strings


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}") from None
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return _flatten_yaml(data, path)


def _flatten_yaml(data: dict[str, Any], path: str) -> dict[str, Any]:
    """Accept flat keys (`lr: 0.1`) and the sectioned form of `--print-config` (`optim: {lr: 0.1}`)."""
    section_names = {f.name for f in dataclasses.fields(JobConfig)}
    flat: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key in section_names and isinstance(value, dict):
            flat.update(_flatten_yaml(value, path))
        elif key in FIELDS:
            flat[key] = value
        else:
            from dist_train.config.parser import suggestion

            known = [*FIELDS, *section_names]
            known = [k.replace("_", "-") for k in known] if "-" in str(raw_key) else known
            hint = suggestion(str(raw_key), known, quote="'")
            raise UserError(f"unknown key '{raw_key}' in config file {path}{hint}")
    return flat


def resolve(args: argparse.Namespace) -> JobConfig:
    """Merge defaults, the YAML file and flags into a checked `JobConfig`."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(_read_yaml(args.config))
    values.update({key: getattr(args, key) for key in FIELDS if hasattr(args, key)})
    config = JobConfig()
    for key, raw in values.items():
        section, f = FIELDS[key]
        value, problem = coerce(raw, f.metadata)
        problem = problem or validate(value, f.metadata)
        if problem:
            shown = "a value that is not shown (it may hold credentials)" if f.metadata["secret"] else repr(raw)
            raise UserError(f"invalid {key} ({flag_name(key)}): {problem}, got {shown}")
        setattr(getattr(config, section), key, value)
    _check_combinations(config)
    config.given = frozenset(values)  # e.g. `--checkpoint-every none` on resume is a change, not "unset"
    return config


def _check_combinations(config: JobConfig) -> None:
    data, model = config.data, config.model
    if data.dataset in DATASETS_NEEDING_ROOT:
        if not data.data_root:
            raise UserError(f"data set {data.dataset} needs --data-root (a folder holding its files)")
        downloadable = data.dataset != "image_folder"  # --download applies to torchvision's data sets only
        if not (data.download and downloadable) and not os.path.isdir(data.data_root):
            hint = "; pass --download to fetch it" if downloadable else " needs a folder of class folders"
            raise UserError(f"data root not found: {data.data_root} (data set {data.dataset}{hint})")
    if data.val_fraction + data.test_fraction >= 1:
        raise UserError("invalid val_fraction + test_fraction: together they must leave training data (< 1)")
    if model.freeze_backbone and ":" not in model.model:
        from dist_train.models.registry import BACKBONES
        if model.model not in BACKBONES:
            raise UserError(f"--freeze-backbone needs a torchvision backbone ({', '.join(BACKBONES)}) or your own "
                            f"factory taking freeze_backbone, got model {model.model}")
    if model.pretrained_weights is not None and "://" not in model.pretrained_weights \
            and not os.path.isfile(model.pretrained_weights) and not os.path.isdir(model.pretrained_weights):
        raise UserError(f"pretrained weights not found: {model.pretrained_weights}")
    if config.train.sample_log and "://" in config.train.sample_log:
        raise UserError("invalid sample_log (--sample-log): must be a local folder")


def dump_yaml(config: JobConfig) -> str:
    """The resolved config as YAML, secrets redacted; loadable again with --config."""
    return yaml.safe_dump(config.to_dict(redact_secrets=True), sort_keys=False)
