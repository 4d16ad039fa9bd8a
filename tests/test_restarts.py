"""Restarts and hangs as the user sees them: the metrics file holds every step once across a
restart (with a record of the restart), each worker death and restart is one line on stderr, a
hang exits 3, and no failure leaves the resource tracker's leaked-semaphore warning."""

import json
import os
import subprocess
import sys
import time

from paratrain.metrics import MetricsLog

RUN = ["--model", "tiny", "--dp", "2", "--global-batch", "8", "--seq-len", "64", "--no-progress", "--device", "cpu"]


def paratrain(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "paratrain", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def strict_records(path) -> list[dict]:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def test_a_restart_keeps_every_step_once_and_says_so_in_one_line(tmp_path):
    metrics, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    r = paratrain("train", *RUN, "--steps", "8", "--checkpoint-dir", str(ck), "--checkpoint-every", "3",
                  "--max-restarts", "1", "--simulate-failure", "1:5", "--metrics", str(metrics))
    assert r.returncode == 0, r.stderr
    records = strict_records(metrics)
    assert [x.get("event") for x in records].count("start") == 1 and records[0]["event"] == "start"
    assert sorted(x["step"] for x in records if "event" not in x) == list(range(1, 9))
    (restart,) = [x for x in records if x.get("event") == "restart"]
    assert restart["attempt"] == 1 and restart["resumed_from_step"] == 3
    assert restart["steps_redone"] in (1, 2) and restart["time_lost_s"] > 0
    end = records[-1]
    assert end["event"] == "end" and end["restarts"] == 1 and end["first_step"] == 1
    assert end["first_loss"] == records[1]["loss"] and end["time_lost_s"] == restart["time_lost_s"]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines == [lines[0]] and lines[0].startswith("paratrain: rank 1 failed: RuntimeError: simulated failure")
    assert lines[0].endswith("at attempt 0; restarting every worker from the last checkpoint (restart 1 of 1)")
    assert "loss 5." in r.stdout and "(step 1) ->" in r.stdout  # the summary covers the whole run


def test_a_hang_exits_3_with_its_summary_and_no_semaphore_warning():
    t0 = time.monotonic()
    # rank 1 sleeps 4 s before step 1; rank 0 waits in the all-reduce past the 1 s timeout
    r = paratrain("train", *RUN, "--steps", "2", "--simulate-straggler", "1:4", "--collective-timeout", "1")
    assert r.returncode == 3, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines[0].startswith("paratrain: hang: a collective did not complete within 1 s"), r.stderr
    assert [x for x in lines if not x.startswith(("paratrain: hang", "  rank"))] == [
        "paratrain: rank 0 failed with exit code 3: a collective hung (--collective-timeout)"], r.stderr
    assert "leaked semaphore" not in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 120


def write_attempt(log: MetricsLog, steps: range, t0: float, end: bool = False) -> None:
    """Records of `steps` at wall-clock times t0 + step, a checkpoint every 2, and the end."""
    for k in steps:
        log.step({"step": k, "loss": 10.0 - k, "step_time_s": 0.5, "time": t0 + k})
        if k % 2 == 0:
            log.event({"event": "checkpoint", "step": k, "time": t0 + k + 0.1})
    if end:
        log.end(log.whole_run({"event": "end", "steps": steps[-1], "time": t0 + steps[-1] + 1}))
    log.close()


def test_restart_and_resume_records_without_processes(tmp_path):
    """A first attempt dies after step 5 (saved at 4): the restart keeps steps 1-4 and their
    records (a torn last line dropped), notes step 5 as redone, and the end covers both attempts;
    --resume of the finished run from step 4 again keeps 1-4 and drops the old end record."""
    path, now = str(tmp_path / "m.jsonl"), time.time()
    log = MetricsLog(path)
    log.start({"event": "start", "layout": "dp=2", "time": now - 300})
    write_attempt(log, range(1, 6), t0=now - 300)
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # the writer was killed mid-line
    log = MetricsLog(path)
    log.start({"event": "start"}, resumed={"event": "restart", "attempt": 1, "resumed_from_step": 4})
    write_attempt(log, range(5, 9), t0=now + 10, end=True)
    records = strict_records(path)
    assert [x["step"] for x in records if "event" not in x] == list(range(1, 9))
    assert [x["event"] for x in records if "event" in x] == ["start", "checkpoint", "checkpoint", "restart",
                                                            "checkpoint", "checkpoint", "end"]
    restart = records[7]
    assert restart["steps_redone"] == 1 and 290 < restart["time_lost_s"] < 310  # from step 4's checkpoint to now
    end = records[-1]
    assert end["restarts"] == 1 and end["first_step"] == 1 and end["first_loss"] == 9.0
    assert end["time_lost_s"] == restart["time_lost_s"]
    log = MetricsLog(path)
    log.start({"event": "start"}, resumed={"event": "resume", "attempt": 0, "resumed_from_step": 4})
    write_attempt(log, range(5, 9), t0=now + 100, end=True)
    records = strict_records(path)
    assert [x["step"] for x in records if "event" not in x] == list(range(1, 9))
    assert [x["event"] for x in records if x.get("event") in ("start", "restart", "resume", "end")] == [
        "start", "restart", "resume", "end"]
    resume = [x for x in records if x.get("event") == "resume"][0]
    assert resume["steps_redone"] == 4 and 13 < resume["time_lost_s"] < 18.5  # steps 5-8 after the restart
    assert records[-1]["resumes"] == 1 and records[-1]["restarts"] == 1
    assert not [n for n in os.listdir(tmp_path) if n != "m.jsonl"]  # no temporary file left
