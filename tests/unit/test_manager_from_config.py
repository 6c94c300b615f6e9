"""`CheckpointManager.from_config`: the trainer's flags reach the manager as one config, none dropped."""

from __future__ import annotations

import dataclasses

from dist_train.checkpoint.config import CheckpointConfig
from dist_train.checkpoint.manager import CheckpointManager
from dist_train.distributed.env import DistEnv


def test_from_config_carries_every_checkpoint_flag(tmp_path):
    config = dataclasses.replace(CheckpointConfig(), run_dir=str(tmp_path / "run"), keep_last=2, keep_best=1,
                                 keep_every=10, verify="size", async_checkpoint=True, strict_fencing=True,
                                 local_cache=str(tmp_path / "cache"), local_cache_keep=3, checkpoint_writers="all")
    env = DistEnv(0, 1, 0, __import__("torch").device("cpu"), None)
    manager = CheckpointManager.from_config(config, env)
    assert manager.storage.display_url.endswith("run") and manager.env is env
    assert manager.verify == "size" and manager.async_save and manager.strict_fencing
    assert manager.writers == "all" and manager.cache is not None
    policy = manager.policy
    assert (policy.keep_last, policy.keep_best, policy.keep_every) == (2, 1, 10)
    assert CheckpointManager.from_config(config, env, writers="rank0").writers == "rank0"
