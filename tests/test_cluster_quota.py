"""A slow node on the harness (paratrain.cluster, paratrain.cgroups): node 1's agent and workers run in
a cgroup of their own with half a CPU per period, are throttled by it, and the group goes with the cluster."""

import os
import re
import subprocess
import time

import pytest

from paratrain import cgroups
from paratrain.cluster import Cluster, available, cleanup_stale

# Spin on the CPU for a while, then say where this process ran.
SPIN = (
    "import os, sys, time\n"
    "t = time.process_time()\n"
    "while time.process_time() - t < 0.6:\n"
    "    pass\n"
    "open(os.path.join(sys.argv[1], 'worker-' + os.environ['RANK']), 'w').write(open('/proc/self/cgroup').read())\n"
)


@pytest.fixture(autouse=True)
def _needs_a_cluster_and_a_cpu_controller():
    reason = available()
    if not reason:
        try:
            cgroups.cpu_root()
        except cgroups.CgroupError as e:
            reason = str(e)
    if reason:
        pytest.skip(reason)


def _group_of(text: str, version: int) -> str:
    """The cpu cgroup path in the text of /proc/PID/cgroup."""
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if (version == 1 and "cpu" in controllers.split(",")) or (version == 2 and controllers == ""):
            return path
    return ""


def test_a_node_with_a_cpu_quota_runs_in_its_cgroup_and_is_throttled(tmp_path):
    script = tmp_path / "spin.py"
    script.write_text(SPIN)
    with Cluster(nodes=2, ranks_per_node=1, rate=None, name_prefix="ptquota", cpu_quota={1: 0.5}) as c:
        group = c.groups[1]
        assert sorted(c.groups) == [1]
        name = os.path.basename(group.path)
        if group.version == 1:
            assert open(os.path.join(group.path, "cpu.cfs_quota_us")).read().strip() == str(cgroups.PERIOD_US // 2)
        else:
            assert open(os.path.join(group.path, "cpu.max")).read().split() == [
                str(cgroups.PERIOD_US // 2),
                str(cgroups.PERIOD_US),
            ]
        launch = c.start([str(script), str(tmp_path)], module=None)
        agent = launch.procs[1].pid  # ip netns exec and the wrapper exec: the agent keeps the pid
        assert launch.wait_until(lambda: agent in group.pids(), 120), "node 1's agent never joined its group"
        result = launch.wait(timeout=300)
        assert result.ok, result.summary()
        assert _group_of((tmp_path / "worker-1").read_text(), group.version).endswith("/" + name)
        assert not _group_of((tmp_path / "worker-0").read_text(), group.version).endswith("/" + name)
        stat = c.cpu_stat(1)
        assert stat["nr_periods"] > 0 and stat["nr_throttled"] > 0, stat
    assert not os.path.exists(group.path)


def test_a_cgroup_left_by_a_dead_process_is_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    group = cgroups.CpuGroup.create(f"ptstalegnode1-{dead.pid}", 0.5)
    sleeper = subprocess.Popen(cgroups.wrap(["sleep", "60"], group))
    try:
        deadline = time.monotonic() + 30
        while sleeper.pid not in group.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group.pids() == [sleeper.pid]
        assert cleanup_stale("ptstaleg") == [os.path.basename(group.path)]
        assert sleeper.wait(timeout=30) < 0 and not os.path.exists(group.path)
    finally:
        sleeper.kill()
        sleeper.wait()
        if os.path.exists(group.path):
            group.remove()


def test_bad_quotas_and_pins_are_refused_in_one_line():
    with pytest.raises(ValueError, match=re.escape("cpu_quota: node 2 is not one of 0..1")):
        Cluster(nodes=2, cpu_quota={2: 0.5})
    with pytest.raises(ValueError, match="not at least"):
        Cluster(nodes=2, cpu_quota={1: 0})
    with pytest.raises(ValueError, match="not a non-empty subset"):
        Cluster(nodes=2, pin={1: [4096]})
