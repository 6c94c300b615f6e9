"""An argparse parser whose errors are `UserError`s: one line, exit status 2, no usage dump."""

from __future__ import annotations

import argparse

from dist_train.errors import UserError


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.partition(" ")[2]  # "" for the top-level parser, "ckpt list" for a sub-command
        raise UserError(f"{command}: {message}" if command else message)


def subparsers(parser: argparse.ArgumentParser, dest: str):
    return parser.add_subparsers(dest=dest, required=True, metavar="COMMAND", parser_class=Parser)


def storage_options(text: str) -> dict:
    """The `--storage-options` JSON of the read-only commands (train declares its own config field)."""
    from dist_train.config.fields import coerce

    value, problem = coerce(text, {"kind": "json", "nullable": False})
    if problem:
        raise UserError(f"--storage-options {problem}")
    return value
