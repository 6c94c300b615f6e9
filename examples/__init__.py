"""Runnable examples of dist_train's Python API and import paths (see each module's docstring).

A package so that `python -m examples.<name>` and import paths such as
`examples.transfer_learning.model:build` work from the repository root, and so
that checkpoints of these examples name importable factories (for predict,
evaluate and export).
"""
