"""Factories that go wrong the ways a user's do: each must be one line and exit status 2."""

from __future__ import annotations

from torch.utils.data import Dataset


def raises(*args, **kwargs):
    raise RuntimeError("the user's factory failed on purpose")


def not_a_module(*args, **kwargs):
    return {"weights": [1, 2, 3]}


class NoLength:
    """Indexable, but without __len__: not a map-style Dataset."""

    def __init__(self, split: str):
        self.split = split

    def __getitem__(self, index: int):
        return index, index


class Empty(Dataset):
    def __init__(self, split: str):
        pass

    def __len__(self) -> int:
        return 0

    def __getitem__(self, index: int):
        raise IndexError(index)
