"""Parameter-server traffic goes through paratrain.comm: counted and watched.

The point-to-point wrappers count a send's payload once (on the sender) and fingerprint every
wait, an any-source receive as `recv from any`. A synchronous ps run's counted `comm_bytes` is
exactly what the protocol sends per step, and a slow worker's waits stay below the timeout; a
worker frozen far past --collective-timeout gets a hang report naming the ranks that wait on it
and what they wait in, and they exit with status 3.
"""

import json

import pytest
import torch

from helpers import run_tiny, spawn


def _point_to_point():
    import torch.distributed as dist

    from paratrain.comm import CommStats, recv, send

    stats, rank = CommStats(), dist.get_rank()
    if rank == 0:
        got = []
        for _ in range(2):
            t = torch.empty(3)
            src = recv(t, None, None, 7, stats)
            got.append((src, t.tolist()))
        recv(torch.empty(1, dtype=torch.float64), 1, None, 8, stats)
        return sorted(got), stats.bytes, [fp.op for fp in stats.flight.recent]
    send(torch.full((3,), float(rank)), 0, None, stats, 7)
    if rank == 1:
        send(torch.ones(1, dtype=torch.float64), 0, None, stats, 8)
    return stats.bytes, dict(stats.calls), [fp.op for fp in stats.flight.recent]


def test_send_and_any_source_recv_count_and_fingerprint():
    zero, one, two = spawn(_point_to_point, 3)
    assert zero == ([(1, [1.0] * 3), (2, [2.0] * 3)], 0, ["recv from any", "recv from any", "recv from 1"])
    assert one == (3 * 4 + 8, {"send": 2}, ["send to 0", "send to 0"])
    assert two == (3 * 4, {"send": 1}, ["send to 0"])


def test_synchronous_ps_comm_bytes_are_what_the_protocol_sends(tmp_path):
    """Also watched, with a slow worker: the others wait about 0.8 s at every step, in an
    any-source receive (servers) or for a reply (worker 0), and nothing is reported."""
    from paratrain.parallel.param_server import HEADER

    W, S = 2, 2
    run_tiny(steps=3, dp=W, sync="ps", servers=S, metrics=str(tmp_path / "m.jsonl"), collective_timeout=2.5,
             simulate_straggler="1:0.8")
    records = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    n = records[0]["params"]
    # per worker and step: a pull header, a 2-number reply and a shard of parameters from each
    # server, then a push header and a shard of the gradient to each; the S servers all-reduce
    # the squared norm (one float64: each sends 2(S-1)/S of it)
    per_worker = S * (HEADER * 8 + 2 * 4) + n * 4 + S * HEADER * 8 + n * 4
    expected = W * per_worker + S * round(8 * 2 * (S - 1) / S)
    steps = [r for r in records if "step" in r]
    assert len(steps) == 3 and all(r["comm_bytes"] == expected for r in steps), (expected, steps)


def test_a_frozen_worker_is_reported_by_the_ranks_waiting_on_it(capfd):
    from paratrain.launch import WorkerFailed

    with pytest.raises(WorkerFailed) as failed:
        run_tiny(steps=3, dp=2, sync="ps", servers=1, collective_timeout=2.0, simulate_straggler="1:120")
    assert any(line.startswith("rank 0 failed with exit code 3") for line in failed.value.lines), failed.value.lines
    err = capfd.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith(("paratrain: hang", "  rank"))]
    assert lines and lines[0].startswith("paratrain: hang: a collective did not complete within 2 s"), err
    # worker 0 pushed step 1 and waits for server 2 to answer its pull of step 2; the server waits
    # for worker 1's push, from any worker; worker 1 sleeps, in no collective
    assert any(x.startswith("  rank 0 waits in recv from 2 (group 0-2; 2 float32) at param_server.py:")
               and x.endswith("step 2") for x in lines), err
    assert any(x.startswith("  rank 2 waits in recv from any (group 0-2; 5 float64) at param_server.py:")
               and x.endswith("step 1") for x in lines), err
    assert any(x.startswith("  rank 1 reported nothing") for x in lines), err
