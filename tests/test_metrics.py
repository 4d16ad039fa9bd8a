"""The metrics file and the trackers, written by a MetricsLog alone (no processes) and read back."""

import glob
import importlib.util
import json
import math
import os
import struct

import pytest

import paratrain.metrics as metrics
from paratrain.metrics import MetricsLog, check_report_to

STEPS = 10
LOSSES = [4.0 * 0.9**k for k in range(1, STEPS + 1)]  # a decreasing curve, step k -> LOSSES[k - 1]
VAL_STEP, VAL_LOSS = 5, 3.25
CONFIG = {"model": {"name": "tiny"}, "train": {"lr": 0.01, "steps": STEPS}, "layout": {"dp": 1, "tp": 1}}


def step_record(k: int) -> dict:
    return {"step": k, "loss": LOSSES[k - 1], "tokens": 512, "step_time_s": 0.1, "tokens_per_s": 5120.0,
            "peak_mem_bytes": 1 << 20, "comm_bytes": 0, "grad_norm": 1.0 / k, "lr": 0.01, "loss_scale": 1024.0,
            "skipped": False}


def drive(log: MetricsLog, nan_step: int | None = None) -> None:
    """Start, ten steps with an eval at step 5 and a checkpoint, end: what the Trainer does."""
    try:
        log.start({"event": "start", "layout": "dp=1,tp=1,pp=1,zero=0", "world_size": 1, "params": 10,
                   "config": CONFIG})
        for k in range(1, STEPS + 1):
            rec = step_record(k)
            if k == nan_step:
                rec["grad_norm"] = float("nan")
            log.step(rec)
            if k == VAL_STEP:
                log.event({"event": "eval", "step": k, "val_loss": VAL_LOSS})
                log.event({"event": "checkpoint", "step": k, "async": False})
        log.end({"event": "end", "steps": STEPS, "final_loss": LOSSES[-1], "val_loss": 3.0, "tokens_per_s": 5000.0,
                 "mfu": None, "nested": {"x": [1.0, float("inf")]}})
    finally:
        log.close()


def strict_lines(path: str) -> list[dict]:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def test_json_lines(tmp_path):
    path = str(tmp_path / "out" / "run.jsonl")
    drive(MetricsLog(path, config=CONFIG), nan_step=3)
    lines = strict_lines(path)
    assert lines[0]["event"] == "start" and lines[0]["config"] == CONFIG
    assert lines[-1]["event"] == "end" and lines[-1]["nested"] == {"x": [1.0, None]} and lines[-1]["mfu"] is None
    steps = [r for r in lines if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in steps] == LOSSES
    assert steps[2]["grad_norm"] is None and steps[3]["grad_norm"] == 0.25
    others = [r["event"] for r in lines[1:-1] if "event" in r]
    assert others == ["eval", "checkpoint"]


def test_disabled_writes_nothing(tmp_path):
    drive(MetricsLog(str(tmp_path / "run.jsonl"), ["tensorboard", "wandb", "mlflow"], str(tmp_path / "runs"),
                     enabled=False))
    assert os.listdir(tmp_path) == []


def test_no_path_no_trackers(tmp_path):
    log = MetricsLog(None)
    drive(log)
    log.close()  # twice is fine
    assert os.listdir(tmp_path) == []


def test_check_report_to(monkeypatch):
    assert check_report_to(None) == [] and check_report_to("") == [] and check_report_to("none") == []
    with pytest.raises(ValueError, match="unknown tracker 'comet'; known: tensorboard, wandb, mlflow") as e:
        check_report_to("none,comet")
    assert "\n" not in str(e.value)
    real = metrics.importlib.util.find_spec
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ValueError, match=r"--report-to wandb: needs the wandb package; pip install wandb "
                                         r"\(or paratrain\[trackers\]\)"):
        check_report_to(["wandb"])
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: object())
    assert check_report_to(" TensorBoard, mlflow,tensorboard ") == ["tensorboard", "mlflow"]
    assert check_report_to(["wandb,mlflow", "none"]) == ["wandb", "mlflow"]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One run reported to every tracker installed here; the reads below check each (or skip)."""
    names = [name for name, (module, _) in metrics.TRACKERS.items() if importlib.util.find_spec(module)]
    root = tmp_path_factory.mktemp("tracked")
    log_dir = str(root / "runs")
    drive(MetricsLog(str(root / "run.jsonl"), names, log_dir, run_name="curve", config=CONFIG))
    return log_dir


def expected(tag: str) -> list[tuple[int, float]]:
    return {"train/loss": list(zip(range(1, STEPS + 1), LOSSES)), "eval/loss": [(VAL_STEP, VAL_LOSS), (STEPS, 3.0)],
            "train/loss_scale": [(k, 1024.0) for k in range(1, STEPS + 1)]}[tag]


def close_to(got: list[tuple[int, float]], tag: str, rel: float = 0.0) -> bool:
    want = expected(tag)
    return len(got) == len(want) and all(s == t and math.isclose(v, w, rel_tol=rel)
                                         for (s, v), (t, w) in zip(got, want))


def test_tensorboard(tracked):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(tracked, "tensorboard", "curve"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s", "train/peak_mem_bytes",
            "train/comm_bytes"} <= set(tags) and "train/skipped" not in tags
    for tag in ("train/loss", "eval/loss", "train/loss_scale"):  # stored as float32
        assert close_to([(e.step, e.value) for e in acc.Scalars(tag)], tag, rel=1e-6), tag


def wandb_records(path: str):
    """The records of a W&B `.wandb` file: a 7-byte header, then a LevelDB-style log of 32 KiB blocks whose
    chunks (crc32 4, length 2, type 1: full, first, middle, last) carry serialized `Record` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in the block for a header: padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0:  # zero-filled tail
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb(tracked):
    pytest.importorskip("wandb")
    (path,) = glob.glob(os.path.join(tracked, "wandb", "offline-run-*", "run-*.wandb"))
    history, config, names, exit_codes = [], {}, [], []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
            names += [record.run.display_name] if kind == "run" else []
        elif kind == "exit":
            exit_codes.append(record.exit.exit_code)
    for tag in ("train/loss", "eval/loss", "train/loss_scale"):
        assert close_to([(h["_step"], h[tag]) for h in history if tag in h], tag), tag
    assert config["train"] == CONFIG["train"] and config["model"] == CONFIG["model"]
    assert names == ["curve"] and exit_codes == [0]


def test_mlflow(tracked, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=metrics.mlflow_uri(tracked))
    (run,) = client.search_runs([client.get_experiment_by_name("paratrain").experiment_id])
    assert run.info.run_name == "curve" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["model.name"] == "tiny"
    for tag in ("train/loss", "eval/loss", "train/loss_scale"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        assert close_to(history, tag), tag


def test_a_short_run_reports_its_loss_curve_to_every_tracker(tmp_path, monkeypatch):
    """`paratrain train --report-to tensorboard,wandb,mlflow`: each tracker receives the run's
    losses, the same numbers as its metrics file."""
    from helpers import run_tiny

    names = [name for name, (module, _) in metrics.TRACKERS.items() if importlib.util.find_spec(module)]
    if not names:
        pytest.skip("no tracker installed")
    log_dir = str(tmp_path / "runs")
    run_tiny(steps=4, dp=2, metrics=str(tmp_path / "run.jsonl"), report_to=",".join(names), log_dir=log_dir)
    want = [(r["step"], r["loss"]) for r in strict_lines(str(tmp_path / "run.jsonl")) if "event" not in r]
    got = {}
    if "tensorboard" in names:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (folder,) = glob.glob(os.path.join(log_dir, "tensorboard", "*"))
        acc = EventAccumulator(folder)
        acc.Reload()
        got["tensorboard"] = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    if "wandb" in names:
        (path,) = glob.glob(os.path.join(log_dir, "wandb", "offline-run-*", "run-*.wandb"))
        history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                   for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]
        got["wandb"] = [(h["_step"], h["train/loss"]) for h in history if "train/loss" in h]
    if "mlflow" in names:
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=metrics.mlflow_uri(log_dir))
        (run,) = client.search_runs([client.get_experiment_by_name("paratrain").experiment_id])
        got["mlflow"] = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    for name, curve in got.items():
        assert [s for s, _ in curve] == [s for s, _ in want], name
        assert all(math.isclose(v, w, rel_tol=1e-6) for (_, v), (_, w) in zip(curve, want)), name
    assert len(want) == 4 and want[-1][1] < want[0][1]
