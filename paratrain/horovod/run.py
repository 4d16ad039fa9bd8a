"""`paratrain horovodrun`: Horovod's launcher (`horovodrun -np 4 -H a:2,b:2 python train.py`) on
torchrun's (torch.distributed.run). One host of this machine: `torchrun --standalone`; several
hosts: one torchrun agent per host, started over ssh (the command in PARATRAIN_SSH, default
`ssh -o BatchMode=yes`), meeting at a c10d rendezvous on the first host. torchrun starts the same
number of processes on every host, so `-np` must fill the hosts' slots evenly (Horovod would fill
them in order); `--min-np` / `--max-np` become torchrun's elastic `--nnodes MIN:MAX` in whole hosts.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import socket
import subprocess
import sys
import uuid

RDZV_PORT = 29400


class LaunchError(ValueError):
    """A horovodrun command that cannot run: one line."""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("horovodrun", help="run a Horovod script (import paratrain.horovod as hvd) with "
                                          "horovodrun's flags, on torchrun's launcher")
    p.add_argument("-np", "--num-proc", dest="np", type=int, help="processes in all")
    p.add_argument("-H", "--hosts", help="hosts and their slots, e.g. host1:2,host2:2 (default localhost:NP)")
    p.add_argument("-hostfile", "--hostfile", help="a file of lines `host slots=N`")
    p.add_argument("-p", "--ssh-port", type=int, help="ssh port of the other hosts")
    p.add_argument("-i", "--ssh-identity-file", help="ssh key for the other hosts")
    p.add_argument("--min-np", type=int, help="elastic: the fewest processes to go on with")
    p.add_argument("--max-np", type=int, help="elastic: the most processes")
    p.add_argument("--reset-limit", type=int, default=None, help="elastic: restarts allowed (torchrun --max-restarts)")
    p.add_argument("--network-interface", help="the NIC(s) to use, comma-separated (GLOO_SOCKET_IFNAME)")
    p.add_argument("--start-timeout", type=int, default=30, help="seconds the hosts have to meet")
    p.add_argument("--gloo", action="store_true", help="the gloo controller (the only one: accepted)")
    p.add_argument("--mpi", action="store_true", help="refused: there is no MPI controller")
    p.add_argument("--verbose", action="store_true", help="print the torchrun commands")
    p.add_argument("script", nargs=argparse.REMAINDER, help="the training command, e.g. python train.py --epochs 2")
    return p


def parse_hosts(text: str | None, hostfile: str | None, np: int | None) -> list[tuple[str, int]]:
    """[(host, slots)] from `-H` or `--hostfile`; localhost with NP slots by default."""
    if text and hostfile:
        raise LaunchError("horovodrun: give -H or --hostfile, not both")
    items: list[str] = []
    if text:
        items = [h.strip() for h in text.split(",") if h.strip()]
    elif hostfile:
        try:
            lines = open(hostfile).read().splitlines()
        except OSError as e:
            raise LaunchError(f"horovodrun: cannot read --hostfile {hostfile!r} ({e.strerror})") from None
        for line in lines:
            fields = line.split("#")[0].split()
            if fields:
                slots = next((f.split("=", 1)[1] for f in fields[1:] if f.startswith("slots=")), "1")
                items.append(f"{fields[0]}:{slots}")
    if not items:
        return [("localhost", np or 1)]
    hosts = []
    for item in items:
        host, _, slots = item.partition(":")
        if not host or not (slots or "1").isdigit() or int(slots or 1) < 1:
            raise LaunchError(f"horovodrun: cannot read host {item!r}; write HOST:SLOTS, e.g. host1:2")
        hosts.append((host, int(slots or 1)))
    return hosts


def is_local(host: str) -> bool:
    if host in ("localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        return socket.gethostbyname(host) in {"127.0.0.1", *socket.gethostbyname_ex(socket.gethostname())[2]}
    except OSError:
        return False


def script_args(command: list[str]) -> list[str]:
    """The command as torchrun's trailing arguments: `python [-m] X ARGS` -> `[-m] X ARGS`; any
    other program runs as it is (`--no-python`)."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise LaunchError("horovodrun: give the training command, e.g. paratrain horovodrun -np 2 python train.py")
    if os.path.basename(command[0]).startswith("python") or command[0] == sys.executable:
        rest = command[1:]
        if not rest:
            raise LaunchError("horovodrun: `python` needs a script or -m MODULE")
        if rest[0] == "-c":
            raise LaunchError("horovodrun: torchrun runs a script or a module, not `python -c`; put the code in a file")
        return ["-m", *rest[1:]] if rest[0] == "-m" and len(rest) > 1 else rest
    return ["--no-python", *command]


def plan(args) -> list[tuple[str, list[str]]]:
    """[(host, torchrun argv)] for the command: one agent per host."""
    if args.mpi:
        raise LaunchError("horovodrun: --mpi: paratrain runs on torch.distributed (gloo, NCCL); drop --mpi")
    hosts = parse_hosts(args.hosts, args.hostfile, args.np or args.max_np)
    np = args.np or sum(s for _, s in hosts)
    if np < 1:
        raise LaunchError(f"horovodrun: -np must be at least 1, got {np}")
    per = [s for _, s in hosts]
    if len(hosts) == 1:
        if np > per[0]:
            raise LaunchError(f"horovodrun: -np {np} is more than the {per[0]} slots of {hosts[0][0]}")
        per_host, used = np, hosts
    else:
        used = hosts[: math.ceil(np / min(per))]
        per_host = np // len(used)
        if per_host * len(used) != np or per_host > min(s for _, s in used):
            raise LaunchError(f"horovodrun: -np {np} does not fill hosts {','.join(f'{h}:{s}' for h, s in hosts)} "
                              f"evenly; torchrun starts the same number of processes on every host")
    tail = script_args(args.script)
    restarts = ["--max-restarts", str(args.reset_limit)] if args.reset_limit is not None else []
    if len(used) == 1 and is_local(used[0][0]):
        return [(used[0][0], ["--standalone", "--nproc-per-node", str(per_host), *restarts, *tail])]
    nnodes = str(len(used))
    if args.min_np or args.max_np:
        lo = math.ceil((args.min_np or np) / per_host)
        hi = max(len(used), math.ceil((args.max_np or np) / per_host))
        nnodes = f"{lo}:{hi}"
    endpoint, run_id = f"{used[0][0]}:{RDZV_PORT}", f"horovodrun-{uuid.uuid4().hex[:8]}"
    common = ["--nnodes", nnodes, "--nproc-per-node", str(per_host), "--rdzv-backend", "c10d", "--rdzv-endpoint",
              endpoint, "--rdzv-id", run_id, *restarts]
    # the first host keeps the rendezvous store; each agent is reached at the name it was given
    return [(h, [*common, "--rdzv-conf", f"join_timeout={args.start_timeout},is_host={int(k == 0)}",
                 "--local-addr", h, *tail]) for k, (h, _) in enumerate(used)]


def remote(host: str, argv: list[str], args, env: dict[str, str]) -> list[str]:
    """The ssh command that runs `argv` on `host` in this folder, with `env`."""
    ssh = shlex.split(os.environ.get("PARATRAIN_SSH", "ssh -o BatchMode=yes"))
    if args.ssh_port:
        ssh += ["-p", str(args.ssh_port)]
    if args.ssh_identity_file:
        ssh += ["-i", args.ssh_identity_file]
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    line = f"cd {shlex.quote(os.getcwd())} && env {exports} {shlex.join(argv)}"
    return [*ssh, host, line]


def run(args) -> int:
    """Start every host's agent, wait for all; the exit status is the first failure's (else 0)."""
    try:
        agents = plan(args)
    except LaunchError as e:  # one line, exit status 2, before any process starts
        print(f"paratrain: error: {e}", file=sys.stderr)
        sys.exit(2)
    env = {"GLOO_SOCKET_IFNAME": args.network_interface.split(",")[0]} if args.network_interface else {}
    procs = []
    for host, rest in agents:
        argv = [sys.executable, "-m", "torch.distributed.run", *rest]
        if len(agents) > 1 and not is_local(host):
            argv = remote(host, argv, args, env)
        if args.verbose:
            print(f"paratrain: {host}: {shlex.join(argv)}", file=sys.stderr, flush=True)
        procs.append(subprocess.Popen(argv, env={**os.environ, **env}))
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)
