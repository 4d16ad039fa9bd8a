"""`paratrain horovodrun -H` across two nodes of the harness (network namespaces): one torchrun
agent per host, started through the remote shell (PARATRAIN_SSH: here `ip netns exec` into the
host's namespace in place of ssh), meeting at a c10d rendezvous on the first host; Horovod's MNIST
example (digits in MNIST's place) trains across them and every rank reports the test accuracy."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from paratrain.cluster import Cluster, available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _needs_a_cluster():
    reason = available()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("sklearn")


def remote_shell(path, cluster: Cluster) -> str:
    """A stand-in for ssh: `SCRIPT HOST COMMAND` runs COMMAND in the namespace of the node at HOST."""
    cases = "\n".join(f"  {cluster.addr(k)}) ns={cluster.names[k]}; nic={cluster.ifname(k)};;"
                      for k in range(cluster.nodes))
    path.write_text(f'#!/bin/sh\ncase "$1" in\n{cases}\n  *) echo "no node $1" >&2; exit 255;;\nesac\nshift\n'
                    f'exec ip netns exec "$ns" env GLOO_SOCKET_IFNAME="$nic" PYTHONPATH={ROOT} sh -c "$*"\n')
    path.chmod(0o755)
    return str(path)


def test_horovodrun_starts_an_agent_per_host_and_trains_across_them(tmp_path):
    with Cluster(nodes=2, ranks_per_node=1, rate="1gbit") as cluster:
        env = {**os.environ, "PARATRAIN_SSH": remote_shell(tmp_path / "ssh", cluster), "PYTHONPATH": ROOT}
        hosts = ",".join(f"{cluster.addr(k)}:1" for k in range(2))
        out = subprocess.run([sys.executable, "-m", "paratrain", "horovodrun", "-np", "2", "-H", hosts, "--verbose",
                              "python", os.path.join(ROOT, "examples", "horovod", "pytorch_mnist.py"), "--epochs", "10", "--lr", "0.05",
                              "--log-interval", "100"], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("torch.distributed.run --nnodes 2") == 2  # an agent per host
    accuracy = [float(a) for a in re.findall(r"Accuracy: ([\d.]+)%", out.stdout)]
    assert len(accuracy) == 10 and accuracy[-1] > 75.0  # rank 0 prints, after each epoch
