"""Standalone baseline scripts the benchmark launches by file path (with torchrun).

They are run as scripts, not imported as `dist_train.bench.baselines.*`, so a baseline
process pays for nothing of dist_train that it does not use itself.
"""
