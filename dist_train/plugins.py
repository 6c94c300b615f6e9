"""Open registries: a built-in name or a user's `MODULE:ATTR` import path, resolved the same way.

Models, data sets and tasks each have a `Registry`. Built-in entries are registered
by name; anything with a colon is imported as Python would for `python -m` from the
current directory (the current directory and `PYTHONPATH` are on the path). Every
failure a user can cause (a module that does not import, a missing attribute, a
factory that raises or returns the wrong thing) is a `UserError` naming the path:
one line, exit status 2, before anything is written.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable, Generic, Iterable, TypeVar

from dist_train.errors import UserError

T = TypeVar("T")


def is_import_path(name: str) -> bool:
    return isinstance(name, str) and ":" in name


def import_object(path: str, what: str) -> Any:
    """`package.module:attr.sub` -> the object; a UserError naming `path` when it cannot be had."""
    if is_script_path(path):
        module_name, _, attr = path.rpartition(":")
        module = load_script(module_name, what, path)
        return _attribute(module, module_name, attr, what, path)
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UserError(f"{what} {path!r}: an import path is MODULE:ATTR, e.g. mypkg.models:build")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does: the current directory first
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if missing == module_name or module_name.startswith(missing + "."):  # it, or its package, is not there
            raise UserError(f"{what} {path}: module {module_name} not found "
                            "(run from the folder that holds it, or put it on PYTHONPATH)") from None
        raise UserError(f"{what} {path}: module {module_name} imports {missing}, which is not installed") from None
    except Exception as exc:  # noqa: BLE001 - any failure while importing the user's module is theirs
        raise UserError(f"{what} {path}: importing module {module_name} failed: {brief(exc)}") from None
    return _attribute(module, module_name, attr, what, path)


def _attribute(module: Any, module_name: str, attr: str, what: str, path: str) -> Any:
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UserError(f"{what} {path}: module {module_name} has no attribute {attr}"
                            f"{did_you_mean(part, target)}") from None
    return target


def is_script_path(path: str) -> bool:
    """`some/dir/my_train.py:build`: a script run by path (`torchrun my_train.py`), not a module."""
    file, _, attr = path.rpartition(":")
    return bool(attr) and file.endswith(".py")


def load_script(file: str, what: str, path: str) -> Any:
    """The script as a module named after its path, *not* `__main__`: its `if __name__ == "__main__"`
    block (the training run itself) does not run; loaded once per process."""
    import importlib.util

    full = os.path.abspath(file)
    name = "dist_train_script_" + "".join(c if c.isalnum() else "_" for c in full)
    if name in sys.modules:
        return sys.modules[name]
    if not os.path.isfile(full):
        raise UserError(f"{what} {path}: script {file} not found (pass the model as --model MODULE:ATTR "
                        "if it moved)")
    spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(full)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # as when it ran: its neighbours import
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's script failed while loading
        del sys.modules[name]
        raise UserError(f"{what} {path}: loading script {file} failed: {brief(exc)}") from None
    return module


def did_you_mean(name: str, owner: Any) -> str:
    """`; did you mean build_model?` from the owner's public attributes (difflib), or ""."""
    import difflib

    names = [n for n in dir(owner) if not n.startswith("_")]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6) or \
        [n for n in names if n.lower() == name.lower()]
    return f"; did you mean {close[0]}?" if close else ""


def accepted_kwargs(func: Callable, offered: dict[str, Any]) -> dict[str, Any]:
    """The subset of `offered` that `func`'s signature accepts (all of it when it takes **kwargs)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(offered)
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY)}
    return {k: v for k, v in offered.items() if k in names}


def call_user(func: Callable, path: str, what: str, *args: Any, **kwargs: Any) -> Any:
    """Call a user's factory; whatever it raises becomes a one-line UserError naming it."""
    try:
        return func(*args, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code failed: say where, not a traceback
        raise UserError(f"{what} {path} raised {brief(exc)}") from None


def qualified_name(obj: Any) -> str:
    """`module:qualname` of a function or class, so a checkpoint can name it (best effort)."""
    module = getattr(obj, "__module__", None) or "__main__"
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    if module == "__main__":
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name:
            module = spec.name  # `python -m pkg.script`: importable again under that name
        elif getattr(main, "__file__", None) and str(main.__file__).endswith(".py"):
            module = os.path.abspath(main.__file__)  # `torchrun my_train.py`: loadable again by path
    return f"{module}:{qualname}"


def brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class Registry(Generic[T]):
    """Named built-in entries plus import paths, for one kind of component."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """`registry.register("cnn", build_cnn)`, or as a decorator `@registry.register("cnn")`."""
        if entry is not None:
            self._entries[name] = entry
            return entry

        def decorate(obj: T) -> T:
            self._entries[name] = obj
            return obj
        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def check_name(self, value: str) -> str | None:
        """Validation for a config field: a built-in name or an import path (resolved later)."""
        if value in self._entries or is_import_path(value):
            return None
        return f"must be one of {', '.join(self.names())} or an import path MODULE:ATTR"

    def resolve(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        if is_import_path(name):
            return import_object(name, f"--{self.kind}")
        raise UserError(f"unknown {self.kind} {name!r}: use one of {', '.join(self.names())} "
                        "or an import path MODULE:ATTR")

    def entries(self) -> Iterable[tuple[str, T]]:
        return sorted(self._entries.items())
