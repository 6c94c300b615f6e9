"""Two "nodes" on loopback, started the way a Kubernetes Indexed Job starts its pods.

Each node is `launch/multi-node.sh` with the environment an Indexed Job gives a pod
(JOB_COMPLETION_INDEX, the rendezvous host), one worker per node, c10d rendezvous
on 127.0.0.1, restarts allowed as in k8s/base/job.yaml: together they train one
DDP job of world size 2 and commit its checkpoints.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from conftest import PYTHON, REPO, base_env, free_port, kill_group, manifests


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_two_nodes_train_and_commit_together(tmp_path):
    run_dir = tmp_path / "run"
    common = {"DIST_TRAIN": f"{PYTHON} -m dist_train", "RDZV_HOST": "127.0.0.1", "RDZV_PORT": str(free_port()),
              "RDZV_ID": uuid.uuid4().hex[:8], "NNODES": "2", "NPROC_PER_NODE": "1", "MAX_RESTARTS": "1",
              "LOCAL_ADDR": "127.0.0.1"}
    args = ["bash", str(REPO / "launch" / "multi-node.sh"), "--run-dir", str(run_dir), "--max-steps", "20",
            "--checkpoint-every", "10", "--batch-size", "32", "--log-every", "10", "--no-progress"]
    nodes, logs = [], []
    try:
        for index in (0, 1):
            log = open(tmp_path / f"node{index}.log", "w")
            logs.append(log)
            env = base_env(dict(common, JOB_COMPLETION_INDEX=str(index)))
            nodes.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                          start_new_session=True))
        statuses = [node.wait(timeout=170) for node in nodes]
    finally:
        for node in nodes:
            kill_group(node)
        for log in logs:
            log.close()
    output = "\n".join((tmp_path / f"node{i}.log").read_text() for i in (0, 1))
    assert statuses == [0, 0], output[-4000:]
    committed = manifests(run_dir)
    assert [m["step"] for m in committed] == [10, 20], output[-4000:]
    assert all(m["world_size"] == 2 for m in committed)
    assert "nodes 2:2, rendezvous c10d at 127.0.0.1" in output
