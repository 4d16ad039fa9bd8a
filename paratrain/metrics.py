"""The metrics file (JSON lines, DESIGN.md "Metrics file") and the experiment trackers of one run.

One `MetricsLog` per run, enabled on the writing rank only (a disabled one does nothing). Each
record goes to the JSON-lines file as strict JSON (non-finite floats become null) and its numeric
scalars go to every tracker named in `--report-to`, at the record's optimizer step:

- tensorboard: event files in `<log_dir>/tensorboard/<run_name>/` (`tensorboard --logdir <log_dir>/tensorboard`)
- wandb: an offline run in `<log_dir>/wandb/offline-run-*/` (`wandb sync` uploads it later)
- mlflow: a local file store `<log_dir>/mlruns`, experiment "paratrain" (`mlflow ui --backend-store-uri <that>`)

Tags: `train/<key>` for each number of a step record (`train/loss`, `train/lr`, ...), `eval/loss`
(and `eval/<key>` for other `val_<key>` numbers) for evaluations and for the final validation loss,
`run/tokens_per_s`, `run/tflops_per_device`, `run/mfu` at the end. Non-finite values are left out
of the trackers, as they are null in the file.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

# tracker name -> (module to find, package to install)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny")}
END_SCALARS = {"val_loss": "eval/loss", "tokens_per_s": "run/tokens_per_s",
               "tflops_per_device": "run/tflops_per_device", "mfu": "run/mfu"}


def check_report_to(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Parse `--report-to` ("tensorboard,wandb,mlflow", "none" or "" for none) into tracker names.

    Cheap (finds the packages without importing them), so it runs before any worker starts; an
    unknown name or a missing package raises ValueError with one line saying what would work.
    """
    parts = value.split(",") if isinstance(value, str) else list(value or [])
    names: list[str] = []
    for part in parts:
        for name in str(part).split(","):
            name = name.strip().lower()
            if name in ("", "none") or name in names:
                continue
            if name not in TRACKERS:
                raise ValueError(f"--report-to: unknown tracker {name!r}; known: {', '.join(TRACKERS)}, none")
            module, package = TRACKERS[name]
            if importlib.util.find_spec(module) is None:
                raise ValueError(f"--report-to {name}: needs the {module} package; "
                                 f"pip install {package} (or paratrain[trackers])")
            names.append(name)
    return names


def strict_json(value: object) -> object:
    """`value` with non-finite floats (at any depth) as None and 0-d numbers (numpy, torch) as Python ones."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return strict_json(value.item())
    return value


def scalars(record: dict, prefix: str, skip: tuple[str, ...] = ("step",)) -> dict[str, float]:
    """The finite numbers of `record` (booleans and nested values left out) as `prefix/<key>` tags (`<key>` for "")."""
    out = {}
    for key, value in record.items():
        if key in skip or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if math.isfinite(value):
            out[f"{prefix}/{key}" if prefix else key] = float(value)
    return out


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """Nested config -> {"train.lr": 0.1, ...}, for trackers whose parameters are flat."""
    out: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class TensorBoardTracker:
    """Scalars as TensorBoard event files in `<log_dir>/tensorboard/<run_name>/`."""

    def __init__(self, log_dir: str, run_name: str, config: dict | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard", run_name), flush_secs=10)
        if config:
            self.writer.add_text("config", "```\n" + json.dumps(strict_json(config), indent=2) + "\n```", 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    """An offline W&B run in `<log_dir>/wandb/`: no server, no login, no console capture."""

    def __init__(self, log_dir: str, run_name: str, config: dict | None):
        import wandb

        os.makedirs(log_dir, exist_ok=True)
        settings = wandb.Settings(console="off", silent=True)
        self.run = wandb.init(mode="offline", dir=log_dir, project="paratrain", name=run_name,
                              config=strict_json(config or {}), settings=settings, reinit="create_new")

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


@contextmanager
def file_store_allowed() -> Iterator[None]:
    """MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set; set it while we build ours."""
    before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = before


def mlflow_uri(log_dir: str) -> str:
    """The tracking URI of the local MLflow file store of `log_dir`."""
    return Path(log_dir, "mlruns").resolve().as_uri()


class MlflowTracker:
    """A run of experiment "paratrain" in the local MLflow file store `<log_dir>/mlruns`."""

    def __init__(self, log_dir: str, run_name: str, config: dict | None):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        with file_store_allowed():
            self.client = MlflowClient(tracking_uri=mlflow_uri(log_dir))
            try:
                experiment = self.client.create_experiment("paratrain")
            except MlflowException:  # already there
                experiment = self.client.get_experiment_by_name("paratrain").experiment_id
            self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id
            params = [Param(k, (v if isinstance(v, str) else json.dumps(strict_json(v)))[:MAX_PARAM_VAL_LENGTH])
                      for k, v in flatten(config or {}).items()]
            for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with file_store_allowed():
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self, failed: bool = False) -> None:
        with file_store_allowed():
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


TRACKER_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class MetricsLog:
    """The run's metrics file and trackers; `enabled=False` (every rank but the writing one) makes it a no-op."""

    def __init__(self, path: str | None, report_to: list[str] | tuple = (), log_dir: str = "runs",
                 run_name: str | None = None, config: dict | None = None, enabled: bool = True):
        self.path = path
        self.report_to = list(report_to)
        self.log_dir = log_dir
        self.run_name = run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        self.config = config
        self.enabled = enabled
        self.file: IO[str] | None = None
        self.trackers: list = []
        self.ended = False
        self.closed = False
        self.history = RunHistory()
        self.last_step_time: float | None = None  # an attempt that carries on: the last step of the one before

    def write(self, record: dict) -> None:
        """One strict JSON line with its wall-clock `time`, flushed (a fresh run truncates the file)."""
        if not self.enabled or self.closed:
            return
        self.history.add(record)
        if not self.path:
            return
        if self.file is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.file = open(self.path, "w")
        line = {**record, "time": round(time.time(), 3)} if "time" not in record else record
        self.file.write(json.dumps(strict_json(line), allow_nan=False) + "\n")
        self.file.flush()

    def send(self, tags: dict[str, float], step: int) -> None:
        if tags:
            for tracker in self.trackers:
                tracker.log(tags, step)

    def start(self, record: dict, resumed: dict | None = None) -> dict | None:
        """The first line (`{"event": "start", ...}`), then open the trackers with `config` as hyper-parameters.

        `resumed` (`{"event": "restart" or "resume", "attempt": N, "resumed_from_step": S}`): this
        attempt continues the file of the run it resumes instead (`carry_on`, whose line it returns)."""
        if not self.enabled:
            return None
        written = self.carry_on(record, resumed) if resumed is not None else None
        if resumed is None:
            self.write(record)
        for name in self.report_to:
            self.trackers.append(TRACKER_CLASSES[name](self.log_dir, self.run_name, self.config))
        return written

    def step(self, record: dict) -> None:
        """One optimizer step's line; its numbers as `train/<key>` at step `record["step"]`."""
        if not self.enabled:
            return
        self.write(record)
        self.send(scalars(record, "train"), int(record["step"]))

    def event(self, record: dict) -> None:
        """Any other line; an evaluation's `val_loss` also goes to the trackers as `eval/loss`."""
        if not self.enabled:
            return
        self.write(record)
        if record.get("event") == "eval" and "step" in record:
            evals = {k.removeprefix("val_"): v for k, v in record.items() if k.startswith("val_")}
            self.send(scalars(evals, "eval"), int(record["step"]))

    def end(self, summary: dict) -> None:
        """The last line (`{"event": "end", ...}`), the final scalars at step `summary["steps"]`, then close."""
        if not self.enabled:
            return
        self.write(summary)
        final = {tag: summary[key] for key, tag in END_SCALARS.items() if key in summary}
        if "steps" in summary:
            self.send(scalars(final, "", skip=()), int(summary["steps"]))
        self.ended = True
        self.close()

    def carry_on(self, start: dict, resumed: dict) -> dict:
        """Keep the records up to the resumed step S of the file an earlier attempt wrote (rewritten
        through a temporary file and os.replace), append from there, and write the `resumed` line
        with `steps_redone` (the steps after S that had records) and `time_lost_s` (for a restart,
        the wall time from the last record kept to now: the redone steps, the failure and the
        restart; for --resume, the wall time of the redone steps) and, where the world changed
        size since the attempt before, `membership`. Returns the line written."""
        step, now = int(resumed["resumed_from_step"]), time.time()
        kept, dropped = keep_until(self.path, step) if self.path else ([], [])
        if self.path and (kept or dropped):
            rewrite(self.path, [line for line, _ in kept])
            self.file = open(self.path, "a")
        for _, record in kept:
            self.history.add(record)
        if not any(r.get("event") == "start" for _, r in kept):
            self.write(start)
        redone = [r for _, r in dropped if is_step(r)]
        steps_before = [r["time"] for _, r in kept + dropped if is_step(r) and is_number(r.get("time"))]
        if resumed["event"] == "restart":  # the last step before the failure (not for --resume)
            self.last_step_time = max(steps_before, default=None)
        since = max((r["time"] for _, r in kept if is_number(r.get("time"))), default=None)
        until = now if resumed["event"] == "restart" else max(
            (r["time"] for r in redone if is_number(r.get("time"))), default=since)
        lost = until - since if since is not None and until is not None else \
            sum(r.get("step_time_s") or 0.0 for r in redone)
        known = bool(self.path)
        record = {**resumed, "steps_redone": len({r["step"] for r in redone}) if known else None,
                  "time_lost_s": round(max(lost, 0.0), 3) if known else None}
        change = membership_change(previous_attempt([r for _, r in kept]), resumed)
        if change:
            record["membership"] = change
        self.write(record)
        return record

    def recovered(self, step: int) -> float | None:
        """After the first step of an attempt that carries on a restarted one: a `recovered` line
        with the seconds from the last step before the failure to now; returns them."""
        if self.last_step_time is None:
            return None
        seconds, self.last_step_time = round(time.time() - self.last_step_time, 3), None
        self.event({"event": "recovered", "step": step, "since_last_step_s": seconds})
        return seconds

    def whole_run(self, summary: dict) -> dict:
        """`summary` over every attempt of the run on the writing rank: first_loss and first_step
        of the first step recorded, `restarts`, `resumes`, and their total `time_lost_s`."""
        if not self.enabled:
            return summary
        whole = {**summary, **self.history.summary()}
        last = self.history.last
        final = summary.get("final_loss")
        if last is not None and last.get("step") == summary.get("steps") and not (is_number(final) and math.isfinite(final)):
            whole["final_loss"] = last.get("loss")  # a restart from the last step's checkpoint trained nothing
        return whole

    def close(self) -> None:
        """Close the file and the trackers (a run closed before `end` is marked failed). Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        errors = []
        for tracker in self.trackers:
            try:
                tracker.close(failed=not self.ended)
            except Exception as e:  # close the others all the same
                errors.append(e)
        self.trackers = []
        if self.file is not None:
            self.file.close()
            self.file = None
        if errors:
            raise errors[0]


class RunHistory:
    """What the end record says of a whole run, gathered from the records of every attempt."""

    def __init__(self):
        self.first: dict | None = None  # the first step record
        self.last: dict | None = None  # the latest step record
        self.restarts = self.resumes = self.membership_changes = 0
        self.time_lost = 0.0

    def add(self, record: dict) -> None:
        event = record.get("event")
        if is_step(record):
            self.first, self.last = self.first or record, record
        elif event == "restart":  # a file-less run knows only the attempt it is in
            self.restarts = max(self.restarts + 1, int(record.get("attempt") or 0))
        elif event == "resume":
            self.resumes += 1
        if event in ("restart", "resume") and is_number(record.get("time_lost_s")):
            self.time_lost += record["time_lost_s"]
        if event in ("restart", "resume") and record.get("membership"):
            self.membership_changes += 1

    def summary(self) -> dict:
        first = {"first_loss": self.first.get("loss"), "first_step": self.first["step"]} if self.first else {}
        return {**first, "restarts": self.restarts, "resumes": self.resumes, "time_lost_s": round(self.time_lost, 3),
                "membership_changes": self.membership_changes}


def previous_attempt(records: list[dict]) -> dict | None:
    """The newest start, restart or resume record: what the attempt before this one ran on."""
    attempts = [r for r in records if r.get("event") in ("start", "restart", "resume") and "world_size" in r]
    return attempts[-1] if attempts else None


def membership_change(before: dict | None, now: dict) -> dict | None:
    """{"step", "from", "to", "world_size_from", "world_size_to", micro-batches}: an elastic
    change of the world between the attempt `before` and this one (`now`, its restart or resume
    record); None where the size is the same, or nothing is known of the attempt before (the
    record keeps what the trainer found from the checkpoint it loaded)."""
    if before is None or before.get("world_size") == now.get("world_size"):
        return now.get("membership") if before is None else None
    micro = before.get("microbatches") or (before.get("config") or {}).get("layout", {}).get("microbatches")
    return {"step": int(now["resumed_from_step"]) + 1, "from": before.get("layout"), "to": now.get("layout"),
            "world_size_from": before.get("world_size"), "world_size_to": now.get("world_size"),
            "micro_batches_from": micro, "micro_batches_to": now.get("microbatches")}


def is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_step(record: dict) -> bool:
    """An optimizer step's record (`{"step": k, "loss": ...}`, no "event")."""
    return "event" not in record and is_number(record.get("step"))


def keep_until(path: str, step: int) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """The (line, record) pairs of the metrics file `path` to keep when a run resumes after `step`
    (those of steps up to it, and step-less ones but the end), and those it drops; a torn or
    unreadable line is dropped, a missing file holds nothing."""
    kept, dropped = [], []
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return [], []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        line = line if line.endswith("\n") else line + "\n"
        at = record.get("step")
        keep = record.get("event") != "end" and (not is_number(at) or at <= step)
        (kept if keep else dropped).append((line, record))
    return kept, dropped


def rewrite(path: str, lines: list[str]) -> None:
    """Replace the file `path` by `lines` at once (a temporary file beside it, then os.replace), so
    a crash leaves either the old file or the new one; a path that is no regular file is left."""
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        return
    tmp = os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
