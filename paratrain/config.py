"""Run configuration: dataclasses, TOML loading, flag overrides and validation.

A run is described by one `RunConfig` made of five parts (model, layout, train, data,
checkpoint). It is built from defaults, then a TOML file (`--config`), then flags, and
`validate()` rejects impossible settings with one line naming the field *before* any worker
process starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from paratrain.files import read_small_text
from paratrain.layout import LayoutConfig, format_layout  # noqa: F401 (re-exported)


class ConfigError(ValueError):
    """An impossible or unsupported setting. Its message is one line naming the field."""


@dataclass
class ModelConfig:
    name: str = "small"  # a preset (models/catalog.py), a Hugging Face model folder, or MODULE:FUNCTION
    dropout: float = 0.0
    tie_embeddings: bool = True
    vocab_size: int = 0  # a preset's vocabulary; 0: the preset's own, or the tokenizer's when that is larger


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch: int = 16  # sequences per optimizer step, over all dp ranks and micro-batches
    seq_len: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # on the global gradient norm; 0 disables clipping
    seed: int = 1234
    precision: str = "fp32"
    device: str = "cpu"
    bucket_mb: float = 25.0  # data-parallel gradient bucket size
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    metrics: str | None = None
    max_restarts: int = 0
    compress: str = "none"
    allreduce: str = "backend"  # the dp gradient all-reduce: backend, ring, tree, hierarchical, auto (comm/algorithms.py)
    compress_warmup: int = 40  # steps over which compression ramps in (see comm/compress.py)
    sync: str = "allreduce"
    servers: int = 0
    staleness: int = 0
    simulate_failure: str | None = None  # "RANK:STEP[:HOW]": raise there, or HOW (faults.FAULTS); a testing aid
    simulate_straggler: str | None = None  # "RANK:SECONDS": that worker sleeps every step
    simulate_slowdown: str | None = None  # "RANK:FACTOR": that worker's work takes FACTOR times as long
    balance: str = "even"  # each dp replica's share of the global batch: even, or dynamic (balance.py)
    progress: bool = True
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each transformer block
    collective_timeout: float = 300.0  # seconds a collective may wait before the hang report (0: off)
    timeline: str | None = None  # folder for the pipeline timeline of the last step (pp > 1)
    profile: str | None = None  # folder for torch.profiler traces and tables of the last steps
    profile_steps: int = 3  # how many of the last steps --profile records
    report_to: str = "none"  # experiment trackers, comma-separated: tensorboard, wandb, mlflow
    log_dir: str = "runs"  # where the trackers write (TensorBoard events, W&B offline runs, MLflow store)
    broadcast_buffers: bool = True  # dp rank 0's buffers (BatchNorm statistics) before every forward, as DDP
    sync_batchnorm: bool = False  # BatchNorm statistics over the whole dp group (SyncBatchNorm)
    max_skipped_steps: int = 20  # fp16: stop after this many overflowed (skipped) steps in a row (0: never)


@dataclass
class DataConfig:
    path: str = "stdlib"  # "stdlib", a text file or folder, .jsonl / .parquet, or .bin / .npy token ids
    val_fraction: float = 0.05
    tokenizer: str = "byte"  # byte, bpe:VOCAB (trained on the corpus), a tokenizer.json or a tokenizer folder
    text_field: str = "text"  # the text column of .jsonl / .parquet records
    cache_dir: str | None = None  # tokenized corpora and trained tokenizers (default ~/.cache/paratrain)


@dataclass
class CheckpointConfig:
    dir: str | None = None
    every: int = 0  # save every N steps (0: never)
    resume: bool = False  # load the newest good checkpoint of `dir` (restarts do so anyway)
    keep: int = 3  # checkpoints kept
    async_save: bool = False  # write in the background while training goes on
    snapshot_every: int = 0  # in-memory snapshot every N steps, restored by restarts (0: none)
    snapshot_dir: str | None = None  # where each node keeps its snapshots (default /dev/shm/paratrain-snapshots)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def world_size(self) -> int:
        """Processes of the run: dp x tp x pp, plus the parameter servers with `sync = "ps"`."""
        return self.layout.world_size + (self.train.servers if self.train.sync == "ps" else 0)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        cfg = cls()
        merge(cfg, d, source="config")
        return cfg


SECTIONS = ("model", "layout", "train", "data", "checkpoint")
ALLREDUCE = ("backend", "ring", "tree", "hierarchical", "auto")
MAX_WAIT_S = 7 * 24 * 3600  # --collective-timeout: a week; below 1 s a busy rank looks hung
MAX_STRAGGLER_S = 3600  # --simulate-straggler: an hour's sleep per step is already a hang


def parse_layout(text: str) -> LayoutConfig:
    """Parse `dp=2,tp=2` (missing keys default to 1, zero to 0; `schedule=` and `mb=` allowed)."""
    layout = LayoutConfig()
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = {"mb": "microbatches"}.get(key.strip(), key.strip())
        if not sep or key not in {f.name for f in dataclasses.fields(LayoutConfig)}:
            raise ConfigError(f"layout: cannot read {item!r} in {text!r}; write e.g. dp=2,tp=2,pp=1,zero=0")
        if key == "schedule":
            layout.schedule = value.strip()
        else:
            try:
                setattr(layout, key, int(value))
            except ValueError:
                raise ConfigError(f"layout: {key} must be an integer, got {value!r}") from None
    return layout


def merge(cfg: RunConfig, overrides: dict[str, Any], source: str) -> None:
    """Apply a nested dict {section: {key: value}} onto `cfg`, rejecting unknown names."""
    for section, values in overrides.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}]; known: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of settings")
        part = getattr(cfg, section)
        names = {f.name: f for f in dataclasses.fields(part)}
        for key, value in values.items():
            if key not in names:
                raise ConfigError(
                    f"{source}: unknown setting {section}.{key}; known: {', '.join(sorted(names))}"
                )
            setattr(part, key, _coerce(f"{section}.{key}", names[key], value, getattr(part, key)))


def _coerce(name: str, f: dataclasses.Field, value: Any, current: Any) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{name} cannot be empty")
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few dozen lines


def load_toml(path: str) -> dict[str, Any]:
    """The tables of the TOML file `path`; ConfigError (one line) unless it is a regular file of
    UTF-8 TOML of at most MAX_CONFIG_BYTES (a folder, device or FIFO is named, never opened)."""
    try:
        text = read_small_text(path, MAX_CONFIG_BYTES, "TOML file")
    except ValueError as e:
        raise ConfigError(f"--config: {e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"--config: {path} nests arrays or tables too deeply for a config file") from None


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Reject impossible settings with a one-line ConfigError naming the field and a fix.

    `world_size`, when given (a run under torchrun), must equal dp * tp * pp.
    """
    _validate_data(cfg)
    shape = _validate_model_and_layout(cfg)
    _validate_steps_and_batch(cfg, shape)
    _validate_optimizer(cfg)
    _validate_precision_and_device(cfg, world_size)
    _validate_sync(cfg)
    _validate_balance(cfg)
    _validate_local_memory(cfg, world_size)
    _validate_checkpoint(cfg)
    _validate_trackers(cfg)
    _validate_world_size(cfg, world_size)


def validate_settings(cfg: RunConfig) -> None:
    """The Python API's settings (any model: nothing about a preset's shape or a corpus)."""
    lay = cfg.layout
    if lay.microbatches < 1:
        raise ConfigError(f"microbatches: must be at least 1, got {lay.microbatches}")
    if lay.zero not in (0, 1, 2, 3):
        raise ConfigError(f"zero: must be 0, 1, 2 or 3, got {lay.zero}")
    if lay.schedule not in ("gpipe", "1f1b", "interleaved"):
        raise ConfigError(f"schedule: must be gpipe, 1f1b or interleaved, got {lay.schedule!r}")
    if cfg.train.steps < 1:
        raise ConfigError(f"steps: must be at least 1, got {cfg.train.steps}")
    _validate_optimizer(cfg)
    _validate_precision_and_device(cfg, cfg.layout.world_size)
    _validate_checkpoint(cfg)
    _validate_trackers(cfg)
    _validate_balance(cfg)
    _validate_pp_split(lay)


def _validate_balance(cfg: RunConfig) -> None:
    from paratrain.balance import balance_problem

    problem = balance_problem(cfg)
    if problem:
        raise ConfigError(problem)


def _validate_trackers(cfg: RunConfig) -> None:
    from paratrain.metrics import check_report_to

    try:
        check_report_to(cfg.train.report_to)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _validate_model_and_layout(cfg: RunConfig):
    """The model (models/catalog.py), and a layout it can be split into: tp divides its sizes, pp
    its layers. Returns the model's shape (None where only building it would tell)."""
    from paratrain.models.catalog import check_model

    lay, tr = cfg.layout, cfg.train
    for name in ("dp", "tp", "pp", "microbatches"):
        if getattr(lay, name) < 1:
            raise ConfigError(f"--{name}: must be at least 1, got {getattr(lay, name)}")
    if lay.zero not in (0, 1, 2, 3):
        raise ConfigError(f"--zero: must be 0, 1, 2 or 3, got {lay.zero}")
    if lay.schedule not in ("gpipe", "1f1b", "interleaved"):
        raise ConfigError(f"--schedule: must be gpipe, 1f1b or interleaved, got {lay.schedule!r}")
    try:
        preset = check_model(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if lay.tp > 1 and preset is not None:
        for what, n in (("attention heads", preset.n_head), ("key-value heads", preset.n_kv_head),
                        ("hidden size", preset.d_model), ("MLP size", preset.d_mlp),
                        ("vocabulary", preset.vocab_size)):
            if n % lay.tp:
                raise ConfigError(
                    f"--tp: model {cfg.model.name} has {n} {what}, not divisible by tp={lay.tp}; "
                    f"use a tp that divides {n}"
                )
    if lay.sequence_parallel and tr.seq_len % lay.tp:
        raise ConfigError(
            f"--sequence-parallel: --seq-len {tr.seq_len} is not divisible by tp={lay.tp}; use a multiple of {lay.tp}"
        )
    _validate_pipeline(cfg, preset)
    return preset


def _validate_pipeline(cfg: RunConfig, preset) -> None:
    """Enough layers for the stages, enough micro-batches to fill them, and the interleaved chunks."""
    lay, tr = cfg.layout, cfg.train
    _validate_pp_split(lay, cfg.model.name)
    if lay.pp > 1:
        v = lay.virtual_stages if lay.schedule == "interleaved" else 1
        if preset is not None and preset.n_layer < lay.pp * v:
            raise ConfigError(
                f"--pp: model {cfg.model.name} has {preset.n_layer} layers, fewer than the {lay.pp * v} "
                f"stages of pp={lay.pp}" + (f" x {v} virtual stages" if v > 1 else "") + "; use fewer stages"
            )
        if lay.microbatches < lay.pp:
            raise ConfigError(
                f"--microbatches: {lay.microbatches} micro-batches cannot fill pp={lay.pp} stages; "
                f"use at least {lay.pp}"
            )
        if lay.schedule == "interleaved" and lay.microbatches % lay.pp:
            raise ConfigError(
                f"--microbatches: the interleaved schedule needs a multiple of pp={lay.pp}, got {lay.microbatches}"
            )
    if lay.virtual_stages < 1:
        raise ConfigError(f"--virtual-stages: must be at least 1, got {lay.virtual_stages}")
    if lay.virtual_stages != LayoutConfig.virtual_stages and (lay.schedule != "interleaved" or lay.pp == 1):
        raise ConfigError(f"--virtual-stages: only applies to --schedule interleaved with --pp 2 or more, got "
                          f"{lay.virtual_stages} with --schedule {lay.schedule} --pp {lay.pp}; "
                          "add those or leave it out")
    if tr.timeline is not None and lay.pp == 1:
        raise ConfigError("--timeline: draws the pipeline schedule and needs --pp 2 or more")


def _validate_pp_split(lay: LayoutConfig, model: str | None = None) -> None:
    """`--pp-split`: auto, or auto-measured (parallel/pipeline/measure.py) under a pipeline of a model
    whose layers it can time (a preset or a factory's; a folder is cut by its family's adapter)."""
    from paratrain.models.catalog import kind_of

    if lay.pp_split not in ("auto", "auto-measured"):
        raise ConfigError(f"--pp-split: must be auto or auto-measured, got {lay.pp_split!r}")
    if lay.pp_split == "auto-measured" and lay.pp < 2:
        raise ConfigError(f"--pp-split: auto-measured cuts pipeline stages and needs --pp 2 or more, got --pp {lay.pp}")
    if lay.pp_split == "auto-measured" and model is not None and kind_of(model) == "hf":
        raise ConfigError(f"--pp-split: auto-measured times paratrain's presets and sequential models; {model} is "
                          "cut by its family's adapter: use --pp-split auto")


def _validate_steps_and_batch(cfg: RunConfig, preset) -> None:
    """Steps, profiled steps, the global batch's split over dp x micro-batches, sequence length, seed."""
    lay, tr = cfg.layout, cfg.train
    if tr.steps < 1:
        raise ConfigError(f"--steps: must be at least 1, got {tr.steps}")
    if tr.profile_steps < 1:
        raise ConfigError(f"--profile-steps: must be at least 1, got {tr.profile_steps}")
    if tr.profile is None and tr.profile_steps != TrainConfig.profile_steps:
        raise ConfigError("--profile-steps: give the folder with --profile DIR")
    if tr.global_batch < 1:
        raise ConfigError(f"--global-batch: must be at least 1, got {tr.global_batch}")
    if tr.global_batch % (lay.dp * lay.microbatches):
        raise ConfigError(
            f"--global-batch: {tr.global_batch} sequences do not split evenly over dp={lay.dp} x "
            f"microbatches={lay.microbatches}; use a multiple of {lay.dp * lay.microbatches}"
        )
    if not 1 <= tr.seq_len <= (preset.max_seq_len if preset is not None else math.inf):
        raise ConfigError(
            f"--seq-len: must be between 1 and {preset.max_seq_len} for model {cfg.model.name}, got {tr.seq_len}"
        )
    if not 0 <= tr.seed < 2**32:
        raise ConfigError(f"--seed: must be between 0 and {2**32 - 1}, got {tr.seed}")


def _validate_optimizer(cfg: RunConfig) -> None:
    """Learning rate and its schedule, AdamW, clipping, evaluation, dropout, buckets, watchdog, restarts."""
    tr = cfg.train
    if not 0 < tr.lr < math.inf:
        raise ConfigError(f"--lr: must be a positive finite number, got {tr.lr}")
    if not 0 <= tr.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio: must be between 0 and 1, got {tr.min_lr_ratio}")
    for name, value, what in (("--warmup-steps", tr.warmup_steps, ""),
                              ("--grad-clip", tr.grad_clip, " (0 turns clipping off)"),
                              ("train.weight_decay", tr.weight_decay, ""),
                              ("--eval-every", tr.eval_every, " (0: only at the end)")):
        if not 0 <= value < math.inf:
            raise ConfigError(f"{name}: must be {'at least 0' if value < 0 else 'a finite number'}{what}, got {value}")
    if tr.eval_batches < 1:
        raise ConfigError(f"train.eval_batches: must be at least 1, got {tr.eval_batches}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(tr, name) < 1:
            raise ConfigError(f"train.{name}: must be in [0, 1), got {getattr(tr, name)}")
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {cfg.model.dropout}")
    if not 0 < tr.bucket_mb < math.inf:
        raise ConfigError(f"--bucket-mb: must be a positive finite number, got {tr.bucket_mb}")
    if not (tr.collective_timeout == 0 or 1 <= tr.collective_timeout <= MAX_WAIT_S):
        raise ConfigError(f"--collective-timeout: must be 0 (the watchdog off) or between 1 and {MAX_WAIT_S} seconds, "
                          f"got {tr.collective_timeout:g}")
    if tr.max_restarts < 0:
        raise ConfigError(f"--max-restarts: must be at least 0, got {tr.max_restarts}")


def _validate_precision_and_device(cfg: RunConfig, world_size: int | None) -> None:
    """Precision, gradient compression, the device (and enough GPUs here), the failure aid."""
    lay, tr = cfg.layout, cfg.train
    if tr.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision: must be fp32, bf16 or fp16, got {tr.precision!r}")
    from paratrain.comm.compress import parse_compress

    try:
        parse_compress(tr.compress)
    except ValueError as e:
        raise ConfigError(f"--compress: {e}") from None
    if tr.allreduce not in ALLREDUCE:
        raise ConfigError(f"--allreduce: must be one of {', '.join(ALLREDUCE)}, got {tr.allreduce!r}")
    if tr.allreduce != "backend" and (tr.compress != "none" or tr.sync == "ps"):
        raise ConfigError("--allreduce: chooses the all-reduce of uncompressed dp gradients; leave it out with "
                          "--compress or --sync ps")
    if tr.allreduce == "tree" and lay.zero > 0:
        raise ConfigError("--allreduce tree: the tree reduces to one root and has no reduce-scatter for ZeRO-1/2/3; "
                          "choose backend, ring, hierarchical or auto")
    if tr.compress_warmup < 0:
        raise ConfigError(f"--compress-warmup: must be at least 0, got {tr.compress_warmup}")
    if tr.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device: must be cpu or cuda, got {tr.device!r}")
    if tr.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device: cuda was asked for but torch sees no CUDA device; use --device cpu")
        if world_size is None and lay.world_size > torch.cuda.device_count():
            raise ConfigError(
                f"--device: layout {lay} needs {lay.world_size} GPUs but this machine has "
                f"{torch.cuda.device_count()}; use torchrun across nodes or a smaller layout"
            )
    if tr.simulate_failure is not None:
        from paratrain.faults import fault_problem

        problem = fault_problem(tr.simulate_failure, lay.world_size, world_size)
        if problem:
            raise ConfigError(problem)


def _validate_data(cfg: RunConfig) -> None:
    """The data source exists and holds enough tokens, the tokenizer, the validation share (sources.py)."""
    if cfg.data.path != "stdlib" and not os.path.exists(cfg.data.path):
        raise ConfigError(f"--data: no such file or folder {cfg.data.path!r}; give a text file or folder, .jsonl, "
                          f".parquet, .bin or .npy, or 'stdlib'")
    if not 0 < cfg.data.val_fraction < 0.5:
        raise ConfigError(f"data.val_fraction: must be in (0, 0.5), got {cfg.data.val_fraction}")
    from paratrain.sources import check_data

    try:
        check_data(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _validate_local_memory(cfg: RunConfig, world_size: int | None) -> None:
    """What this machine must hold at least: the local workers, the global batch, activations."""
    from paratrain.limits import local_memory_problem

    problem = local_memory_problem(cfg, world_size)
    if problem:
        raise ConfigError(problem)


def _validate_checkpoint(cfg: RunConfig) -> None:
    """Checkpoint cadence and folder, and what parameter servers can save."""
    ck, tr = cfg.checkpoint, cfg.train
    if ck.every < 0:
        raise ConfigError(f"--checkpoint-every: must be at least 0, got {ck.every}")
    if ck.keep < 1:
        raise ConfigError(f"--keep-checkpoints: must be at least 1, got {ck.keep}")
    if (ck.every or ck.resume or ck.async_save) and not ck.dir:
        raise ConfigError("--checkpoint-every/--resume/--async-checkpoint: give the folder with --checkpoint-dir DIR")
    if ck.dir and tr.sync == "ps" and tr.staleness != 0:
        raise ConfigError("--checkpoint-dir: parameter servers checkpoint synchronous runs only (--staleness 0); "
                          "with staleness they share no step to save at")
    if ck.snapshot_every < 0:
        raise ConfigError(f"--snapshot-every: must be at least 0, got {ck.snapshot_every}")
    if ck.snapshot_every and not ck.dir:
        raise ConfigError("--snapshot-every: snapshots stand in front of the disk checkpoints; give --checkpoint-dir DIR")
    if ck.snapshot_every and tr.sync == "ps":
        raise ConfigError("--snapshot-every: parameter-server runs restart from the disk checkpoint; leave it out "
                          "with --sync ps")
    if ck.async_save and tr.sync == "ps":
        raise ConfigError("--async-checkpoint: parameter servers save synchronously; leave it out with --sync ps")


def _validate_world_size(cfg: RunConfig, world_size: int | None) -> None:
    """Under a launcher: the layout (and servers) add up to the processes it started."""
    if world_size is not None and world_size != cfg.world_size:
        servers = f" + {cfg.train.servers} servers" if cfg.train.sync == "ps" else ""
        raise ConfigError(
            f"layout: {cfg.layout}{servers} needs world size {cfg.world_size} but the launcher started {world_size} "
            f"processes; set --dp/--tp/--pp{'/--servers' if servers else ''} so that they add up to {world_size}"
        )


def _validate_sync(cfg: RunConfig) -> None:
    """Parameter-server settings, and the straggler aid."""
    lay, tr = cfg.layout, cfg.train
    if tr.sync not in ("allreduce", "ps"):
        raise ConfigError(f"--sync: must be allreduce or ps, got {tr.sync!r}")
    if tr.sync == "ps":
        if tr.servers < 1:
            raise ConfigError("--servers: --sync ps needs at least one parameter server, e.g. --servers 1")
        if lay.tp > 1 or lay.pp > 1 or lay.zero > 0:
            raise ConfigError("--sync: parameter servers hold whole replicas' gradients; use them with dp only "
                              "(tp=1, pp=1, zero=0)")
        if tr.precision != "fp32" or tr.compress != "none":
            raise ConfigError("--sync: parameter servers exchange fp32 gradients; drop --precision/--compress")
        if tr.staleness < -1:
            raise ConfigError(f"--staleness: must be -1 (asynchronous), 0 (synchronous) or K > 0, got {tr.staleness}")
    elif tr.servers or tr.staleness:
        raise ConfigError("--servers/--staleness: only with --sync ps")
    if tr.simulate_straggler is not None:
        rank, _, seconds = tr.simulate_straggler.partition(":")
        try:
            ok = rank.isdigit() and int(rank) < lay.dp * lay.tp * lay.pp and 0 <= float(seconds) <= MAX_STRAGGLER_S
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"--simulate-straggler: expected RANK:SECONDS with a worker RANK and 0 to "
                              f"{MAX_STRAGGLER_S} seconds, got {tr.simulate_straggler!r}")
