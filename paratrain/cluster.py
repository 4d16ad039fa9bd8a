"""A cluster on one machine: network namespaces as nodes, joined by rate-limited veth links on a bridge.

Node k is the namespace `{prefix}node{k}-{pid}` with the link `pt{k}` at 10.213.0.{100+k}/24; the bridge
lives in a namespace of its own (`{prefix}br-{pid}`), so the host's interfaces and routes are never
touched. Every link carries a `tbf` qdisc at `rate` on both of its ends (what a node sends and what
it receives); ranks of one node talk over the namespace's loopback, unlimited. `Cluster.run` starts
one `torchrun` agent per node (c10d rendezvous hosted by node 0) and returns what each printed. The
rendezvous ranks nodes by the text of their address, all of three digits here: node k holds the
global ranks k*R .. k*R+R-1 (R ranks per node).

Elastic runs (`launcher_args` `--nnodes 1:N --max-restarts R`, `rdzv_conf=FAST_RDZV`,
`env=ELASTIC_ENV`): `Launch.kill_node(k)` SIGKILLs node k's agent and workers while the others go
on, `Launch.restart_node(k)` starts its agent again with the same command, so it rejoins at the
next rendezvous. Node 0 hosts the rendezvous store: losing it ends an elastic torchrun run (the
store is not replicated), so the node to lose is k > 0.

A slow node: `cpu_quota={1: 0.5}` runs node 1's processes in a cgroup of their own that may use 0.5
of one CPU per CFS period (paratrain.cgroups), `pin={0: [0], 1: [1]}` pins a node to CPUs (so that
the workers size their thread pools to them). Both are per node, the way a machine has its cores:
a node's ranks share its quota, and a slow rank is a node of one rank (`ranks_per_node=1`). A
quota per rank would need the agent's forks of the workers wrapped, which torchrun does not offer.
Root only: `available()` says why a cluster cannot be built here.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from paratrain import cgroups

SUBNET = "10.213.0"
FIRST_HOST = 100  # node k is SUBNET.(100+k): addresses of one length sort as the nodes do
MAX_NODES = 155
RDZV_PORT = 29400
TBF = ["burst", "128kb", "latency", "10ms"]
_RATE = re.compile(r"^\d+(\.\d+)?([kmgt]?(bit|bps))$")
_LIVE: set[Cluster] = set()
# c10d rendezvous settings that notice a lost node in seconds (torch's defaults: keep-alive every 5 s,
# dead after 3 missed, 30 s of last call, 600 s to join): a node is dead 3 s after its last keep-alive,
# and a round with at least the minimum of nodes closes 2 s after the minimum joined.
FAST_RDZV = {"join_timeout": 120, "last_call_timeout": 2, "keep_alive_interval": 1, "keep_alive_max_attempt": 3,
             "close_timeout": 10}
# A node that joins a later round has no copy of round 0's store address (torch shares the agent's
# store only with the nodes of the first round): every round gets a store of its own instead.
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _cmd(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `argv` (ip, tc); raise RuntimeError with its stderr when `check` and it fails."""
    out = subprocess.run(argv, capture_output=True, text=True)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")
    return out


def namespaces() -> list[str]:
    """The names of the network namespaces that exist now."""
    out = _cmd("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    """The pids of the processes living in namespace `name`."""
    return [int(p) for p in _cmd("ip", "netns", "pids", name, check=False).stdout.split()]


def kill_until_gone(pids_of, pause: float = 0.02, rounds: int = 50) -> None:
    """SIGKILL every pid `pids_of()` lists, again and again (a dying launcher may start more),
    until it lists none or `rounds` are spent."""
    for _ in range(rounds):
        pids = pids_of()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(pause)


def kill_netns(name: str) -> None:
    """SIGKILL every process of namespace `name` (torchrun's workers run in sessions of their own,
    so killing the agent alone would leave them), until none is left."""
    kill_until_gone(lambda: netns_pids(name))


def remove_netns(name: str) -> None:
    """Kill the processes of namespace `name`, then delete it (and the links inside it)."""
    kill_netns(name)
    _cmd("ip", "netns", "del", name, check=False)


@functools.cache
def available() -> str | None:
    """None when a cluster can be built here, else one line saying why not."""
    if os.geteuid() != 0:
        return "a cluster on one machine needs root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"a cluster on one machine needs `{tool}` (iproute2)"
    probe = f"ptprobe-{os.getpid()}"
    steps = [("create a network namespace", ["ip", "netns", "add", probe]),
             ("create a bridge", ["ip", "-n", probe, "link", "add", "b0", "type", "bridge"]),
             ("create a veth pair", ["ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"]),
             ("add a tbf qdisc", ["tc", "-n", probe, "qdisc", "add", "dev", "v0", "root", "tbf", "rate", "1gbit",
                                  *TBF])]
    try:
        for what, argv in steps:
            out = _cmd(*argv, check=False)
            if out.returncode:
                return f"cannot {what} here: {out.stderr.strip() or f'exit status {out.returncode}'}"
    finally:
        _cmd("ip", "netns", "del", probe, check=False)
    return None


def cleanup_stale(name_prefix: str = "pt") -> list[str]:
    """Remove the namespaces of clusters whose process is gone (named `{prefix}node{k}-{pid}` or
    `{prefix}br-{pid}`), and the cgroups of their nodes; return their names."""
    pattern = re.compile(rf"^{re.escape(name_prefix)}(node\d+|br)-(\d+)$")
    removed = []
    for name in namespaces():
        match = pattern.match(name)
        if match and not _alive(int(match.group(2))):
            remove_netns(name)
            removed.append(name)
    for group in cgroups.stale_groups(pattern, _alive):
        kill_until_gone(group.pids)
        group.remove()
        removed.append(os.path.basename(group.path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class NodeResult:
    """What one node's torchrun agent left: exit status (None if it was killed at the timeout), output,
    and whether `Launch.kill_node` killed it."""

    node: int
    returncode: int | None
    stdout: str
    stderr: str
    killed: bool = False  # by Launch.kill_node, on purpose


@dataclass
class ClusterRun:
    """The result of `Cluster.run`: one NodeResult per node (its last agent), whether the timeout struck,
    the wall time, and the agents `Launch.restart_node` replaced."""

    nodes: list[NodeResult]
    timed_out: bool
    wall_s: float
    replaced: list[NodeResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No timeout, and every agent not killed on purpose (one at least) exited with status 0."""
        alive = [n for n in self.nodes if not n.killed]
        return not self.timed_out and bool(alive) and all(n.returncode == 0 for n in alive)

    def summary(self) -> str:
        """Every node's status and the end of its stderr, for an assertion message."""
        head = "timed out; " if self.timed_out else ""
        return head + "\n".join(f"node {n.node}: exit status {n.returncode}{' (killed)' if n.killed else ''}\n"
                                 f"{n.stderr[-3000:]}" for n in self.replaced + self.nodes)


class Cluster:
    """`nodes` namespaces of `ranks_per_node` ranks each, linked at `rate` (a tc rate such as "1gbit",
    or None for no limit); `cpu_quota` {node: CPUs per period} and `pin` {node: [CPU, ...]} make
    nodes slower or pin them. A context manager: everything it built is removed on leaving it."""

    def __init__(self, nodes: int = 2, ranks_per_node: int = 2, rate: str | None = "1gbit",
                 name_prefix: str = "pt", cpu_quota: dict[int, float] | None = None,
                 pin: dict[int, list[int]] | None = None):
        if not 1 <= nodes <= MAX_NODES or ranks_per_node < 1:
            raise ValueError(f"a cluster needs 1 to {MAX_NODES} nodes and ranks_per_node >= 1, "
                             f"not {nodes} and {ranks_per_node}")
        if rate is not None and not _RATE.match(rate):
            raise ValueError(f"rate {rate!r} is not a tc rate (e.g. 1gbit, 100mbit, 125mbps)")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,11}", name_prefix):
            raise ValueError(f"name_prefix {name_prefix!r}: use 1-12 lower-case letters and digits")
        self.cpu_quota, self.pin = _check_cpus(nodes, cpu_quota or {}, pin or {})
        self.nodes, self.ranks_per_node, self.rate = nodes, ranks_per_node, rate
        self.groups: dict[int, cgroups.CpuGroup] = {}  # node -> its cgroup, while the cluster is up
        pid = os.getpid()
        self.names = [f"{name_prefix}node{k}-{pid}" for k in range(nodes)]
        self.bridge = f"{name_prefix}br-{pid}"
        self._runs = 0

    def addr(self, k: int) -> str:
        """Node k's address."""
        return f"{SUBNET}.{FIRST_HOST + k}"

    def ifname(self, k: int) -> str:
        """Node k's link (the one GLOO_SOCKET_IFNAME names)."""
        return f"pt{k}"

    def __enter__(self) -> Cluster:
        taken = set(self.names + [self.bridge]) & set(namespaces())
        if taken:
            raise RuntimeError(f"namespaces {sorted(taken)} exist already: another cluster of this process "
                               f"uses this name_prefix")
        _LIVE.add(self)
        _install_safety_net()
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def _up(self) -> None:
        br = self.bridge
        _cmd("ip", "netns", "add", br)
        _cmd("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        _cmd("ip", "-n", br, "link", "set", "br0", "up")
        for k, ns in enumerate(self.names):
            link, port = self.ifname(k), f"port{k}"
            _cmd("ip", "netns", "add", ns)
            _cmd("ip", "-n", ns, "link", "set", "lo", "up")
            _cmd("ip", "-n", ns, "link", "add", link, "type", "veth", "peer", "name", port, "netns", br)
            _cmd("ip", "-n", br, "link", "set", port, "master", "br0")
            _cmd("ip", "-n", br, "link", "set", port, "up")
            _cmd("ip", "-n", ns, "addr", "add", f"{self.addr(k)}/24", "dev", link)
            _cmd("ip", "-n", ns, "link", "set", link, "up")
            if self.rate:  # what node k sends (its link) and what it receives (its bridge port)
                _cmd("tc", "-n", ns, "qdisc", "add", "dev", link, "root", "tbf", "rate", self.rate, *TBF)
                _cmd("tc", "-n", br, "qdisc", "add", "dev", port, "root", "tbf", "rate", self.rate, *TBF)
        for k, cpus in sorted(self.cpu_quota.items()):
            self.groups[k] = cgroups.CpuGroup.create(self.names[k], cpus)

    def down(self) -> None:
        """Kill every process of the nodes, then delete the namespaces (their links go with them) and
        the nodes' cgroups."""
        for name in self.names + [self.bridge]:
            remove_netns(name)
        for k, group in list(self.groups.items()):
            kill_until_gone(group.pids)
            group.remove()
            del self.groups[k]
        _LIVE.discard(self)

    def cpu_stat(self, k: int) -> dict[str, int]:
        """Node k's `cpu.stat` (nr_periods, nr_throttled, ...): it needs a cpu_quota."""
        return self.groups[k].stat()

    def pids(self, k: int) -> list[int]:
        """The pids living in node k now."""
        return netns_pids(self.names[k])

    def kill_node(self, k: int) -> None:
        """SIGKILL every process of node k (a node that fails)."""
        kill_netns(self.names[k])

    def popen(self, k: int, argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        """Start `argv` inside node k, with GLOO_SOCKET_IFNAME set to its link and this paratrain importable."""
        full = {**os.environ, "GLOO_SOCKET_IFNAME": self.ifname(k), **(env or {})}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        full["PYTHONPATH"] = os.pathsep.join(p for p in (root, full.get("PYTHONPATH")) if p)
        argv = ["ip", "netns", "exec", self.names[k], *argv]
        if k in self.groups or k in self.pin:  # in its cgroup before it forks anything; outside the
            argv = cgroups.wrap(argv, self.groups.get(k), self.pin.get(k))  # namespace (which remounts /sys)
        return subprocess.Popen(argv, env=full, **kw)

    def torchrun_argv(self, k: int, args: list[str], module: str | None, launcher_args: list[str],
                      rdzv_conf: dict | None = None) -> list[str]:
        """The torchrun command of node k for this run (`module` None: args[0] is a script). No
        --node-rank: the c10d rendezvous ignores it and orders the nodes by address. One --rdzv-conf:
        `rdzv_conf` and any --rdzv-conf of `launcher_args` merged, `is_host` set by the harness."""
        rest, conf = split_rdzv_conf(launcher_args)
        conf = {**conf, **(rdzv_conf or {}), "is_host": int(k == 0)}
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.nodes),
                "--nproc-per-node", str(self.ranks_per_node),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{self.addr(0)}:{RDZV_PORT + self._runs}",
                "--rdzv-id", f"paratrain-{os.getpid()}-{self._runs}", "--local-addr", self.addr(k),
                "--rdzv-conf", ",".join(f"{key}={value}" for key, value in conf.items()), *rest,
                *(["-m", module] if module else []), *args]

    def start(self, args: list[str], module: str | None = "paratrain", env: dict | None = None,
              launcher_args: list[str] = (), rdzv_conf: dict | None = None) -> Launch:
        """Start one torchrun agent per node running `python -m module ARGS` (or the script args[0]);
        `launcher_args` go to torchrun (a later `--nnodes` overrides the cluster's, e.g. `1:2`),
        `rdzv_conf` to its rendezvous (e.g. FAST_RDZV)."""
        self._runs += 1
        argvs = [self.torchrun_argv(k, list(args), module, list(launcher_args), rdzv_conf) for k in range(self.nodes)]
        return Launch(self, argvs, env)

    def run(self, args: list[str], timeout: float = 300, module: str | None = "paratrain",
            env: dict | None = None, launcher_args: list[str] = (), rdzv_conf: dict | None = None) -> ClusterRun:
        """`start(...)` then `wait(timeout)`: at the timeout every process of every node is killed."""
        return self.start(args, module, env, launcher_args, rdzv_conf).wait(timeout)


def _check_cpus(nodes: int, quota: dict, pin: dict) -> tuple[dict[int, float], dict[int, list[int]]]:
    """`cpu_quota` and `pin` checked against the nodes and this machine's CPUs (ValueError, one line)."""
    for what, d in (("cpu_quota", quota), ("pin", pin)):
        bad = [k for k in d if not (isinstance(k, int) and 0 <= k < nodes)]
        if bad:
            raise ValueError(f"{what}: node {bad[0]!r} is not one of 0..{nodes - 1}")
    for k, cpus in quota.items():
        if not cpus >= cgroups.MIN_QUOTA:
            raise ValueError(f"cpu_quota of node {k}: {cpus!r} CPUs, not at least {cgroups.MIN_QUOTA}")
    have = sorted(os.sched_getaffinity(0))
    for k, cpus in pin.items():
        if not cpus or not set(cpus) <= set(have):
            raise ValueError(f"pin of node {k}: {cpus!r} is not a non-empty subset of this process's CPUs {have}")
    return {k: float(v) for k, v in quota.items()}, {k: list(v) for k, v in pin.items()}


def read_records(path: str) -> list[dict]:
    """The whole JSON lines of a file another process may be writing (a torn last line left out)."""
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines[:-1] if line.strip()]


def split_rdzv_conf(launcher_args: list[str]) -> tuple[list[str], dict]:
    """`launcher_args` without their --rdzv-conf options, and those options' KEY=VALUE pairs (the last wins)."""
    rest, conf, it = [], {}, iter(launcher_args)
    for arg in it:
        flag, eq, value = arg.partition("=")
        if flag not in ("--rdzv-conf", "--rdzv_conf"):
            rest.append(arg)
            continue
        value = value if eq else next(it, "")
        for pair in filter(None, value.split(",")):
            key, _, v = pair.partition("=")
            conf[key.strip()] = v.strip()
    return rest, conf


class Launch:
    """The torchrun agents of one `Cluster.start`, one per node; a node can be killed and started again."""

    def __init__(self, cluster: Cluster, argvs: list[list[str]], env: dict | None):
        self.cluster, self.argvs, self.env = cluster, argvs, env
        self.procs: list[subprocess.Popen] = [None] * len(argvs)  # type: ignore[list-item]
        self.files: list = [None] * len(argvs)
        self.killed: dict[int, float] = {}  # node -> time.time() of its kill, while it stays down
        self.replaced: list[NodeResult] = []
        self.started = time.monotonic()
        for k in range(len(argvs)):
            self._spawn(k)

    def _spawn(self, k: int) -> None:
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.procs[k] = self.cluster.popen(k, self.argvs[k], env=self.env, stdout=out, stderr=err,
                                           stdin=subprocess.DEVNULL)
        self.files[k] = (out, err)

    def poll(self) -> bool:
        """True once every agent has exited."""
        return all(p.poll() is not None for p in self.procs)

    def wait_until(self, predicate, timeout: float) -> bool:
        """Poll `predicate()` every 0.1 s: True once it holds, False when every agent has exited or
        `timeout` seconds passed first."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.poll() or time.monotonic() > deadline:
                return bool(predicate())
            time.sleep(0.1)
        return True

    def kill_node(self, k: int) -> float:
        """SIGKILL node k's agent and workers (a node lost for good) while the others go on; the
        wall-clock time (time.time()) just before the kill."""
        at = time.time()
        self.cluster.kill_node(k)
        self.procs[k].wait()
        self.killed[k] = at
        return at

    def restart_node(self, k: int) -> None:
        """Start node k's agent again with its first command (killing what runs there first): it
        joins the next rendezvous, and the agents that run grow the world to take it in."""
        if self.procs[k].poll() is None:
            self.kill_node(k)
        self.replaced.append(self._result(k, False))
        self.killed.pop(k, None)
        self._spawn(k)

    def wait(self, timeout: float = 300) -> ClusterRun:
        """Wait for every agent up to `timeout` seconds; past it, kill every process of every node."""
        deadline = time.monotonic() + timeout
        timed_out = False
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            for k in range(self.cluster.nodes):
                self.cluster.kill_node(k)
            for p in self.procs:
                p.wait()
        return ClusterRun([self._result(k, timed_out) for k in range(len(self.procs))], timed_out,
                          time.monotonic() - self.started, self.replaced)

    def _result(self, k: int, timed_out: bool) -> NodeResult:
        texts = []
        for f in self.files[k]:
            f.seek(0)
            texts.append(f.read())
            f.close()
        code, killed = self.procs[k].returncode, k in self.killed
        return NodeResult(k, None if timed_out and code == -signal.SIGKILL and not killed else code, *texts,
                          killed=killed)


def _down_all() -> None:
    for cluster in list(_LIVE):
        cluster.down()


def _on_sigterm(signum, frame) -> None:
    _down_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@functools.cache
def _install_safety_net() -> None:
    """Once per process: tear every live cluster down at exit, and on SIGTERM when nothing else handles it."""
    atexit.register(_down_all)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def main(argv: list[str] | None = None) -> int:
    """`python -m paratrain.cluster [--nodes N] [--ranks-per-node R] [--rate 1gbit] [--cpu-quota K:CPUS]
    [--pin K:CPU,...] ARGS...`: run
    `paratrain ARGS` (e.g. `train --dp 4`) across N namespaces of this machine, print each node's
    output, tear the cluster down, and exit with the first failing node's status (2 if it cannot run)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m paratrain.cluster", description=main.__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--rate", default="1gbit", help="the link of each node, as tc says it (none: unlimited)")
    p.add_argument("--cpu-quota", action="append", default=[], metavar="NODE:CPUS",
                   help="node NODE may use CPUS CPUs per period (e.g. 1:0.5); repeatable")
    p.add_argument("--pin", action="append", default=[], metavar="NODE:CPU[,CPU]", help="pin a node; repeatable")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("args", nargs=argparse.REMAINDER, help="paratrain's arguments, e.g. train --dp 4")
    a = p.parse_args(argv)
    why = available() or (None if a.args else "give paratrain arguments, e.g. train --dp 4")
    try:
        quota = {int(k): float(v) for k, _, v in (q.partition(":") for q in a.cpu_quota)}
        pin = {int(k): [int(c) for c in v.split(",")] for k, _, v in (q.partition(":") for q in a.pin)}
    except ValueError:
        why = f"--cpu-quota takes NODE:CPUS, --pin NODE:CPU[,CPU], not {a.cpu_quota + a.pin}"
    try:
        cluster = None if why else Cluster(a.nodes, a.ranks_per_node, None if a.rate == "none" else a.rate,
                                           cpu_quota=quota, pin=pin)
    except ValueError as e:
        why = str(e)
    if why:
        print(f"paratrain.cluster: error: {why}", file=sys.stderr)
        return 2
    try:
        with cluster:
            result = cluster.run(a.args, timeout=a.timeout)
    except cgroups.CgroupError as e:
        print(f"paratrain.cluster: error: {e}", file=sys.stderr)
        return 2
    for node in result.nodes:
        print(f"--- node {node.node} (exit {node.returncode})\n{node.stdout}{node.stderr}", end="")
    return next((n.returncode or 1 for n in result.nodes if n.returncode != 0), 0)


if __name__ == "__main__":
    raise SystemExit(main())
