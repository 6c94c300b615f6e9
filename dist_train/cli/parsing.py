"""Parsers of the sub-commands: `Parser` (errors are `UserError`s: one line, exit status 2, no usage
dump; no abbreviated flags; unknown ones get a suggestion) lives in `dist_train.config.parser`,
below the CLI, because the launcher parses the `train` flags too."""

from __future__ import annotations

import argparse

from dist_train.config.parser import Parser
from dist_train.errors import UserError

__all__ = ["Parser", "subparsers", "storage_options"]


def subparsers(parser: argparse.ArgumentParser, dest: str):
    return parser.add_subparsers(dest=dest, required=True, metavar="COMMAND", parser_class=Parser)


def storage_options(text: str) -> dict:
    """The `--storage-options` JSON of the read-only commands (train declares its own config field)."""
    from dist_train.config.fields import coerce

    value, problem = coerce(text, {"kind": "json", "nullable": False})
    if problem:
        raise UserError(f"--storage-options {problem}")
    return value
