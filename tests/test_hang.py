"""Hang diagnostics: ranks that call different collectives get a cross-rank summary and a
non-zero exit within the timeout, instead of waiting forever."""

import subprocess
import sys
import time

from paratrain.comm.flight import compact, summary

SCRIPT = r'''
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp

def worker(rank, world, init):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from paratrain.comm import CommStats, all_reduce, all_gather
    from paratrain.comm.flight import Watchdog
    other = dist.new_group([0, 1])  # every rank creates it
    stats = CommStats()
    Watchdog(stats.flight, timeout=2.0, grace=3.0)
    stats.flight.step = 41
    x = torch.ones(8)
    all_reduce(x, None, stats)  # a collective every rank completes
    if rank == 1:
        all_gather(x, other, stats)  # rank 1 goes another way...
    else:
        all_reduce(x, None, stats)  # ...ranks 0 and 2 wait here for it
    print("not reached", flush=True)

if __name__ == "__main__":
    mp.spawn(worker, args=(3, sys.argv[1]), nprocs=3)
'''


def test_mismatched_collectives_are_named_and_the_run_stops(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(SCRIPT)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "init")], capture_output=True, text=True,
                       timeout=120)
    assert time.monotonic() - t0 < 60
    assert r.returncode != 0 and "not reached" not in r.stdout
    lines = [x for x in r.stderr.splitlines() if x.startswith(("paratrain: hang", "  rank"))]
    assert lines[0].startswith("paratrain: hang: a collective did not complete within 2 s")
    assert any(x.startswith("  rank 1 waits in all_gather (group 0, 1; 8 float32) at hang.py:") and
               x.endswith("step 41") for x in lines), r.stderr
    assert any(x.startswith("  ranks 0, 2 wait in all_reduce (group 0-2; 8 float32) at hang.py:") for x in lines)


def test_summary_groups_ranks_and_names_the_silent_ones():
    fp = lambda op, site: {"seq": 1, "op": op, "group": "0-3", "shape": "4", "dtype": "float32",  # noqa: E731
                           "site": site, "step": 7}
    text = summary({0: {"current": fp("all_reduce", "a.py:1")}, 2: {"current": fp("all_reduce", "a.py:1")},
                    3: {"current": fp("all_gather", "b.py:2")}}, world=4, timeout=5)
    assert "ranks 0, 2 wait in all_reduce (group 0-3; 4 float32) at a.py:1, step 7" in text
    assert "rank 3 waits in all_gather" in text and "rank 1 reported nothing" in text
    assert compact([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7, 8"
