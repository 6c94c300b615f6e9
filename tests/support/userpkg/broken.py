"""A module that cannot be imported: it needs a package that is not installed."""

import userpkg_missing_dependency  # noqa: F401


def build(**kwargs):
    raise AssertionError("never reached")
