"""The argparse parser of every `dist-train` command: bad input is a `UserError`, never a guess.

argparse accepts any unambiguous prefix of a flag, so `--e 3` sets `--epochs` and a flag
renamed in a later version silently sets whatever it is now a prefix of: abbreviations are
off, and an unknown flag is refused with the closest known spellings as a suggestion.
Errors are one line (no usage dump), exit status 2, via `UserError`.

It lives below the CLI because the launcher parses the `train` flags too, before any
worker starts, and the launcher must not import the CLI.
"""

from __future__ import annotations

import argparse
import difflib
from typing import Iterable

from dist_train.errors import UserError


def did_you_mean(word: str, known: Iterable[str]) -> list[str]:
    """The known spellings `word` most likely meant, best first.

    The names `word` is a prefix of, when there are any (what argparse's abbreviations used to
    pick: `--e` -> `--epochs`; all of them, at most three, when it was ambiguous), else the one
    closest name (`--batchsize` -> `--batch-size`). An underscore spelling of a name also known
    with dashes (torchrun's `--nproc_per_node`) is not offered twice.
    """
    names = set(known)
    names = sorted(n for n in names if not ("_" in n and n.replace("_", "-") in names))
    prefixed = [n for n in names if word.lstrip("-") and n.startswith(word) and n != word]
    if prefixed:
        return difflib.get_close_matches(word, prefixed, n=3, cutoff=0.0)
    return difflib.get_close_matches(word, names, n=1, cutoff=0.6)


def suggestion(word: str, known: Iterable[str], quote: str = "") -> str:
    """'; did you mean --epochs?' (or '' when nothing is close), to end a one-line error."""
    names = [f"{quote}{name}{quote}" for name in did_you_mean(word, known)]
    return f"; did you mean {' or '.join(names)}?" if names else ""


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # sub-command parsers are made with the same class
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.partition(" ")[2]  # "" for the top-level parser, "ckpt list" for a sub-command
        raise UserError(f"{command}: {message}" if command else message)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse's, but unknown arguments are reported by the sub-command that got them."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._chosen(namespace)
            flags = [a.split("=", 1)[0] for a in extras if a.startswith("-") and a != "-"]
            hint = suggestion(flags[0], command.known_flags()) if flags else ""
            command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return namespace

    def known_flags(self) -> list[str]:
        return [flag for action in self._actions if action.help != argparse.SUPPRESS
                for flag in action.option_strings]

    def _chosen(self, namespace: argparse.Namespace) -> "Parser":
        """The (sub-)command parser the namespace was parsed by: `train`, `ckpt list`, ..."""
        parser = self
        while True:
            subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            name = getattr(namespace, subs[0].dest, None) if subs else None
            chosen = subs[0].choices.get(name) if name is not None else None
            if not isinstance(chosen, Parser):
                return parser
            parser = chosen
