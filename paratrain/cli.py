"""`paratrain` command line. Bad input: one line on stderr and exit status 2, before any worker."""

from __future__ import annotations

import argparse
import sys

from paratrain.config import ConfigError, RunConfig, load_toml, merge, parse_layout, validate
from paratrain.outputs import make_folder, prepare_outputs

def dp_degree(text: str) -> int | str:
    """--dp: a number, or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number or auto, got {text!r}") from None


# flag -> (section, setting, type). Every flag defaults to None: "not given", so that the
# TOML file (--config) can supply a value and a flag overrides it.
FLAGS: dict[str, tuple[str, str, type, str]] = {
    "--model": ("model", "name", str, "a preset (tiny, small, gpt2, gpt2-medium, llama-*), a Hugging Face model "
                "folder (config.json, optional safetensors weights), or MODULE:FUNCTION returning a model"),
    "--dp": ("layout", "dp", dp_degree, "data-parallel degree, or auto: the world "
             "over tp x pp (under torchrun --nnodes MIN:MAX, at every restart: elastic)"),
    "--tp": ("layout", "tp", int, "tensor-parallel degree"),
    "--pp": ("layout", "pp", int, "pipeline-parallel degree"),
    "--zero": ("layout", "zero", int, "ZeRO stage 0..3"),
    "--schedule": ("layout", "schedule", str, "pipeline schedule: gpipe, 1f1b, interleaved"),
    "--microbatches": ("layout", "microbatches", int, "micro-batches per step (pipeline; gradient accumulation in dp)"),
    "--virtual-stages": ("layout", "virtual_stages", int, "model chunks per rank for --schedule interleaved"),
    "--pp-split": ("layout", "pp_split", str, "the pipeline's stage split: auto (by modelled cost) or "
                   "auto-measured (by each layer's timed forward and backward, printed)"),
    "--balance": ("train", "balance", str, "each dp replica's share of the global batch: even (default) or "
                  "dynamic (by its measured speed, the same math)"),
    "--global-batch": ("train", "global_batch", int, "sequences per optimizer step, over all ranks"),
    "--seq-len": ("train", "seq_len", int, "tokens per sequence"),
    "--steps": ("train", "steps", int, "optimizer steps"),
    "--lr": ("train", "lr", float, "peak learning rate (warm-up then cosine decay)"),
    "--warmup-steps": ("train", "warmup_steps", int, "linear warm-up steps"),
    "--grad-clip": ("train", "grad_clip", float, "clip the global gradient norm (0: off)"),
    "--seed": ("train", "seed", int, "seed of the weights and the batches"),
    "--precision": ("train", "precision", str, "fp32, bf16 or fp16"),
    "--device": ("train", "device", str, "cpu (gloo) or cuda (NCCL); default: cuda if present"),
    "--bucket-mb": ("train", "bucket_mb", float, "data-parallel gradient bucket size in MiB"),
    "--eval-every": ("train", "eval_every", int, "validation every N steps (0: at the end only)"),
    "--metrics": ("train", "metrics", str, "write JSON-lines metrics to this file"),
    "--max-restarts": ("train", "max_restarts", int, "restart the workers up to R times after a failure"),
    "--max-skipped-steps": ("train", "max_skipped_steps", int, "fp16: stop after N overflowed (skipped) steps in a row (0: never)"),
    "--compress": ("train", "compress", str, "gradient compression: none, fp16, bf16, topk:R, powersgd:R"),
    "--allreduce": ("train", "allreduce", str, "the dp gradient all-reduce: backend (default), ring, tree, "
                    "hierarchical (inside each node, then across), or auto (per bucket, by the link model)"),
    "--compress-warmup": ("train", "compress_warmup", int, "steps over which compression ramps in (top-k density 1 -> R; PowerSGD uncompressed until then)"),
    "--sync": ("train", "sync", str, "allreduce or ps (parameter server)"),
    "--servers": ("train", "servers", int, "parameter servers with --sync ps"),
    "--staleness": ("train", "staleness", int, "bounded staleness for --sync ps (-1: asynchronous)"),
    "--collective-timeout": ("train", "collective_timeout", float, "seconds before a stuck collective is reported and the run stops (0: off)"),
    "--simulate-failure": ("train", "simulate_failure", str, "testing aid: RANK:STEP raises there (first attempt "
                           "only); RANK:STEP:HOW with HOW kill, permanent (its node is lost for good: torchrun "
                           "--nnodes MIN:MAX), or save-kill, save-permanent, save-freeze in that step's save"),
    "--timeline": ("train", "timeline", str, "with --pp: write the last step's pipeline timeline (JSON trace + PNG) here"),
    "--profile": ("train", "profile", str, "profile the last steps with torch.profiler; traces and tables per rank go here"),
    "--profile-steps": ("train", "profile_steps", int, "how many of the last steps --profile records (default 3)"),
    "--simulate-straggler": ("train", "simulate_straggler", str, "testing aid: RANK:SECONDS delays that worker every step"),
    "--simulate-slowdown": ("train", "simulate_slowdown", str, "testing aid: RANK:FACTOR makes that worker's "
                            "work take FACTOR times as long"),
    "--report-to": ("train", "report_to", str, "experiment trackers, comma-separated: tensorboard, wandb, mlflow"),
    "--log-dir": ("train", "log_dir", str, "where the trackers write (default runs/)"),
    "--data": ("data", "path", str, "'stdlib' (default), a text file or folder, .jsonl/.parquet records, or "
               ".bin/.npy token ids"),
    "--tokenizer": ("data", "tokenizer", str, "byte (default), bpe:VOCAB (trained on the corpus, cached), or a "
                    "tokenizer.json / Hugging Face tokenizer folder"),
    "--text-field": ("data", "text_field", str, "the text field of .jsonl/.parquet records (default text)"),
    "--cache-dir": ("data", "cache_dir", str, "where tokenized corpora and trained tokenizers are kept "
                    "(default ~/.cache/paratrain)"),
    "--checkpoint-dir": ("checkpoint", "dir", str, "checkpoint folder"),
    "--checkpoint-every": ("checkpoint", "every", int, "save every N steps"),
    "--keep-checkpoints": ("checkpoint", "keep", int, "how many checkpoints to keep (default 3)"),
    "--snapshot-every": ("checkpoint", "snapshot_every", int, "keep the state in each node's memory every N steps; "
                         "a restart that finds it newer than the disk checkpoint restores it"),
    "--snapshot-dir": ("checkpoint", "snapshot_dir", str, "each node's snapshot folder (default "
                       "/dev/shm/paratrain-snapshots: memory that outlives the workers, not the node)"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and exit status 2."""

    def error(self, message: str):
        fail(message)


def fail(message: str):
    print(f"paratrain: error: {message}", file=sys.stderr)
    sys.exit(2)


PLAN_EXAMPLES = """examples:
  paratrain plan --model gpt2 --gpus 64 --gpu h100-80gb --gpus-per-node 8
  paratrain plan --calibrate                      measure this machine (cpu-local)
  paratrain plan --calibrate --nodes 2 --ranks-per-node 2 --rate 1gbit
                                                  measure a cluster of this machine (root): cpu-cluster
  paratrain plan --model small --gpu cpu-cluster --gpus 4 --gpus-per-node 2 --allreduce auto
                                                  price layouts on it, the dp all-reduce the cheapest of ours"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="paratrain", description="Distributed training on torch.distributed.")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    train = sub.add_parser("train", help="train a model (no flags: `small` on the stdlib corpus)")
    train.add_argument("--config", help="TOML file with [model] [layout] [train] [data] [checkpoint] tables")
    train.add_argument("--layout", help="a layout such as dp=2,tp=1,pp=1,zero=0, or 'auto'")
    for flag, (_, _, typ, help_) in FLAGS.items():
        train.add_argument(flag, type=typ, default=None, help=help_)
    train.add_argument("--sequence-parallel", action="store_true", default=None,
                       help="with --tp: shard norms and dropout along the sequence (reduce-scatter + all-gather)")
    train.add_argument("--activation-checkpointing", action="store_true", default=None,
                       help="recompute each block's activations in backward instead of keeping them")
    train.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile each transformer block (fused kernels; GPU)")
    train.add_argument("--resume", action="store_true", default=None, help="resume from the latest checkpoint")
    train.add_argument("--async-checkpoint", action="store_true", default=None,
                       help="write checkpoints in the background while training goes on")
    cmp = sub.add_parser("compare", help="run layouts side by side and write a report with plots")
    cmp.add_argument("--model", default="small", help="model preset (default small)")
    cmp.add_argument("--layouts", nargs="+", help="layouts such as dp=4 tp=4 pp=4,schedule=1f1b,mb=8 dp=2,tp=2 "
                                                   "(default: a set for this machine)")
    cmp.add_argument("--steps", type=int, default=30, help="steps per layout (default 30)")
    cmp.add_argument("--global-batch", type=int, default=16)
    cmp.add_argument("--seq-len", type=int, default=128)
    cmp.add_argument("--seed", type=int, default=1234)
    cmp.add_argument("--device", choices=["cpu", "cuda"], default=None)
    cmp.add_argument("--out", default="compare-report", help="folder for report.md, report.html, results.json, plots")
    ckpt = sub.add_parser("checkpoint", help="work with checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="action", parser_class=OneLineParser)
    export = ckpt_sub.add_parser("export", help="write the model of a checkpoint as one file or a Hugging Face folder")
    export.add_argument("path", help="a checkpoint folder (step_N) or the --checkpoint-dir holding them")
    export.add_argument("--to", required=True, help="output: a .safetensors or .pt file (the model's own names), or "
                                                    "a folder for a Hugging Face model (config.json + model.safetensors)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    plan = sub.add_parser("plan", help="rank layouts by predicted step time and memory (starts no processes)",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PLAN_EXAMPLES)
    plan.add_argument("--model", help="a preset (tiny, small, gpt2, gpt2-medium, llama-tiny, llama-small, llama-1b, "
                                       "llama-7b), a Hugging Face model folder, or the shape flags")
    for flag, help_ in (("--layers", "transformer blocks"), ("--hidden", "hidden size"), ("--heads", "attention heads"),
                        ("--vocab", "vocabulary (padded to a multiple of 128)"), ("--seq-len", "tokens per sequence"),
                        ("--global-batch", "sequences per optimizer step"), ("--gpus", "devices (cpu-local: workers)"),
                        ("--gpus-per-node", "devices per node"), ("--top", "layouts to show (default 10)")):
        plan.add_argument(flag, type=int, default=10 if flag == "--top" else None, help=help_)
    plan.add_argument("--gpu", help="a100-80gb, h100-80gb, cpu-local (this machine) or cpu-cluster (this machine's "
                                     "cores with the links `--calibrate --nodes` measured; default: cpu-local)")
    plan.add_argument("--precision", help="fp32, bf16 or fp16 (default: bf16 on GPUs, fp32 on cpu-local/cpu-cluster)")
    plan.add_argument("--allow-cross-node-tp", action="store_true", help="let tensor-parallel groups span nodes")
    plan.add_argument("--allreduce", default="backend",
                      help="the data-parallel all-reduce to price, as `train --allreduce` runs it: backend (default), "
                           "ring, tree, hierarchical, or auto (the cheapest of the three)")
    plan.add_argument("--json", action="store_true", help="print the ranked layouts as JSON")
    plan.add_argument("--calibrate", action="store_true",
                      help="measure this machine for cpu-local and save it; with --nodes, a cluster on this machine "
                           "(network namespaces, root) for cpu-cluster")
    plan.add_argument("--nodes", type=int, help="with --calibrate: nodes of the cluster to build and measure (>= 2)")
    plan.add_argument("--ranks-per-node", type=int, help="with --calibrate --nodes: ranks on each node (default 2)")
    plan.add_argument("--rate", help="with --calibrate --nodes: each node's link, as tc says it (default 1gbit; "
                                     "none: no limit)")
    from paratrain.horovod.run import add_parser as add_horovodrun

    add_horovodrun(sub)
    return parser


def default_layout_dp(global_batch: int, device: str) -> int:
    """A local data-parallel degree for this machine: one rank per GPU, or per core (up to 4) on CPU."""
    from paratrain.launch import cpu_count

    if device == "cuda":
        import torch

        limit = torch.cuda.device_count()
    else:
        limit = min(cpu_count(), 4)
    dp = 1
    while dp * 2 <= limit and global_batch % (dp * 2) == 0:
        dp *= 2
    return dp


def config_from_args(args: argparse.Namespace) -> RunConfig:
    cfg = RunConfig()
    toml = load_toml(args.config) if args.config else {}
    dp_auto = args.dp == "auto" or toml.get("layout", {}).get("dp") == "auto"
    dp_given = args.dp is not None or "dp" in toml.get("layout", {}) or (args.layout not in (None, "auto"))
    if toml.get("layout", {}).get("dp") == "auto":
        del toml["layout"]["dp"]
    merge(cfg, toml, source=args.config)
    layout_given = "layout" in toml
    device_given = "device" in toml.get("train", {}) or args.device is not None
    auto = args.layout == "auto"
    if args.layout and not auto:
        lay = parse_layout(args.layout)
        cfg.layout.dp, cfg.layout.tp, cfg.layout.pp, cfg.layout.zero = lay.dp, lay.tp, lay.pp, lay.zero
        layout_given = True
    overrides: dict[str, dict] = {}
    for flag, (section, name, _, _) in FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and not (flag == "--dp" and value == "auto"):
            overrides.setdefault(section, {})[name] = value
            layout_given = layout_given or flag in ("--dp", "--tp", "--pp")
    if args.sequence_parallel is not None:
        overrides.setdefault("layout", {})["sequence_parallel"] = True
    if args.activation_checkpointing is not None:
        overrides.setdefault("train", {})["activation_checkpointing"] = True
    if args.compile is not None:
        overrides.setdefault("train", {})["compile"] = True
    if args.resume is not None:
        overrides.setdefault("checkpoint", {})["resume"] = True
    if args.async_checkpoint is not None:
        overrides.setdefault("checkpoint", {})["async_save"] = True
    merge(cfg, overrides, source="flags")
    if args.no_progress:
        cfg.train.progress = False
    if not device_given:
        import torch

        cfg.train.device = "cuda" if torch.cuda.is_available() else "cpu"
    if auto:
        apply_auto_layout(cfg, {**overrides.get("layout", {}), **(
            {"activation_checkpointing": True} if args.activation_checkpointing else {})})
        layout_given = True
    resolve_dp(cfg, dp_auto, dp_given and not auto, layout_given)
    return cfg


def resolve_dp(cfg: RunConfig, dp_auto: bool, dp_given: bool, layout_given: bool) -> None:
    """dp when none was given: under torchrun, the world over tp x pp at every start (elastic;
    --dp auto says so outright); else, and for --dp auto outside torchrun, a local default."""
    import os

    from paratrain.group import under_torchrun

    if under_torchrun() and (dp_auto or not dp_given):
        from paratrain.elastic import derive_dp

        derive_dp(cfg, int(os.environ["WORLD_SIZE"]))
    elif dp_auto or not layout_given:
        cfg.layout.dp = default_layout_dp(cfg.train.global_batch, cfg.train.device)


def apply_auto_layout(cfg: RunConfig, fixed: dict) -> None:
    """--layout auto: the planner's first choice on this machine, within the layout flags given."""
    import os

    from paratrain.planner.search import auto_layout

    best, hw, gpus = auto_layout(cfg, fixed)
    c = best.candidate
    for name in ("dp", "tp", "pp", "zero", "schedule", "microbatches", "sequence_parallel", "virtual_stages"):
        setattr(cfg.layout, name, getattr(c, name))
    cfg.train.activation_checkpointing = c.activation_checkpointing
    if os.environ.get("RANK", "0") == "0":
        extra = "".join(s for s, on in ((" sequence-parallel", c.sequence_parallel),
                                        (" activation-checkpointing", c.activation_checkpointing)) if on)
        print(f"paratrain: --layout auto chose {c.label} schedule={c.schedule} microbatches={c.microbatches}{extra} "
              f"for {gpus} x {hw.name} (predicted {best.step_time_s:.3g} s/step)", flush=True)


def cmd_plan(args: argparse.Namespace) -> int:
    from paratrain.planner.search import run_plan

    try:
        return run_plan(args)
    except ConfigError as e:
        fail(str(e))


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from paratrain.launch import WorkerFailed, launch, run_worker, under_torchrun
    from paratrain.sources import prepare_data
    from paratrain.stops import RunStopped

    try:
        cfg = config_from_args(args)
        world = int(os.environ["WORLD_SIZE"]) if under_torchrun() else None
        validate(cfg, world_size=world)
        prepare_outputs(cfg)
        check_checkpoint_dir(cfg)
        prepare_data(cfg)  # tokenizer trained, corpus tokenized into the cache: once, before the workers
    except ConfigError as e:
        fail(str(e))
    except ValueError as e:  # the data could not be prepared (one line)
        fail(str(e))
    if under_torchrun():
        result = run_worker(cfg.to_dict())
        if int(os.environ["RANK"]) == 0:
            return stopped_status(result)
        return int((result or {}).get("stopped", {}).get("status", 0))
    try:
        result = launch(cfg)
    except WorkerFailed as e:
        for line in e.lines:
            print(f"paratrain: {line}", file=sys.stderr)
        return e.status  # 3 after a hang, else 1
    except RunStopped as e:  # this process was signalled: the line from what the folder holds
        return stopped_status(e.record())
    return stopped_status(result)


def stopped_status(result: dict | None) -> int:
    """A run that stopped on purpose (paratrain.stops): its one line on stderr and its exit status."""
    stopped = (result or {}).get("stopped")
    if not stopped:
        return 0
    print(f"paratrain: {stopped['message']}", file=sys.stderr, flush=True)
    return int(stopped["status"])


def check_checkpoint_dir(cfg: RunConfig) -> None:
    """Before any worker starts: with --resume a checkpoint this run may continue must exist (a
    missing folder, no intact checkpoint, another model's or another run's checkpoint, or nothing
    left to train is one line and exit status 2; broken newer ones are skipped with a warning);
    a fresh run needs a folder without checkpoints; and the folder is locked for this run (it is
    released when this process ends; under torchrun, rank 0 takes it)."""
    import atexit
    import os

    from paratrain.checkpoint import CheckpointError, latest_good, model_identity, read_manifest, resumable, runs
    from paratrain.group import under_torchrun

    ck = cfg.checkpoint
    if not ck.dir:
        return
    if ck.resume and not os.path.isdir(ck.dir):
        raise ConfigError(f"--resume: there is no checkpoint folder {ck.dir!r}; check --checkpoint-dir")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return  # a restart under torchrun: rank 0 resumes the run's own checkpoints
    if under_torchrun() and (os.environ.get("RANK") != "0" or runs.joins_running_job(ck.dir)):
        return  # rank 0 chooses for every rank (checkpointer.open_run); a node joining an elastic run continues it
    run = runs.run_identity(cfg.to_dict(), model_identity(cfg))
    try:
        if not under_torchrun():  # first: a live run's folder is not read further
            runs.acquire(ck.dir, os.getpid())
            atexit.register(runs.release, ck.dir, os.getpid())
        if ck.resume:
            folder, manifest = resumable(ck.dir, run)
            if manifest["step"] >= cfg.train.steps:
                raise ConfigError(f"--resume: {folder} is at step {manifest['step']}, so --steps {cfg.train.steps} "
                                  f"leaves nothing to train")
        elif (folder := latest_good(ck.dir)[0]) is not None:
            raise ConfigError(f"--checkpoint-dir: {ck.dir!r} already holds checkpoints ({os.path.basename(folder)}, "
                              f"step {read_manifest(folder)['step']}); add --resume to continue that run, or give "
                              f"an empty folder")
    except (CheckpointError, runs.LockHeld, ConfigError) as e:
        runs.release(ck.dir, os.getpid())
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"--resume: {e}" if ck.resume else f"--checkpoint-dir: {e}") from None


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from torch.distributed.checkpoint.api import CheckpointException

    from paratrain.checkpoint import CheckpointError, export
    from paratrain.checkpoint.hf_export import ExportError, export_hf
    from paratrain.outputs import check_output_file

    if args.action != "export":
        fail("checkpoint: say what to do, e.g. `paratrain checkpoint export DIR --to model.safetensors`")
    import os

    hf_folder = not args.to.endswith((".safetensors", ".pt", ".pth"))
    if hf_folder and os.path.splitext(args.to)[1] not in ("", ".hf") and not os.path.isdir(args.to):
        fail(f"--to: write a .safetensors or .pt file, or a folder for a Hugging Face model, got {args.to!r}")

    if not os.path.exists(args.path):
        fail(f"checkpoint export: no such folder {args.path!r}")
    if not os.path.isdir(args.path):
        fail(f"checkpoint export: {args.path!r} is a file; give a checkpoint folder (step_N) or the --checkpoint-dir")
    try:
        if hf_folder:
            make_folder("--to", args.to)
            folder = export_hf(args.path, args.to)
        else:
            check_output_file("--to", args.to, "model.safetensors")
            folder = export(args.path, args.to)
    except ConfigError as e:
        fail(str(e))
    except ExportError as e:  # "export: ..."
        fail(f"checkpoint {e}")
    except ImportError as e:  # a Hugging Face folder without transformers
        fail(f"checkpoint export: {e}")
    except CheckpointError as e:
        fail(f"checkpoint export: {e}")
    except OSError as e:  # a file the manifest or DCP's metadata names, or --to itself
        where = f"{e.filename}: " if e.filename else ""
        fail(f"checkpoint export: cannot export {args.path!r}: {where}{e.strerror or e}")
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, EOFError, CheckpointException) as e:
        # a manifest or metadata that is not what paratrain writes ([], {}, a string, ...)
        why = " ".join(str(e).split()) or type(e).__name__
        fail(f"checkpoint export: {args.path!r} is not a usable checkpoint ({type(e).__name__}: {why[:200]})")
    print(f"paratrain: wrote {args.to} from {folder}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import shlex

    import torch

    from paratrain.report.compare import compare, default_layouts

    cfg = RunConfig()
    cfg.model.name = args.model
    tr = cfg.train
    tr.steps, tr.global_batch, tr.seq_len, tr.seed = args.steps, args.global_batch, args.seq_len, args.seed
    tr.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tr.progress, tr.eval_batches = False, 2
    try:
        validate(cfg)  # the parts every layout shares
        make_folder("--out", args.out)
    except ConfigError as e:
        fail(str(e))
    world = torch.cuda.device_count() if tr.device == "cuda" else default_layout_dp(16, "cpu")
    layouts = args.layouts or default_layouts(world)
    summary = compare(cfg, layouts, args.out, "paratrain compare " + shlex.join(sys.argv[2:])
                      if sys.argv[1:2] == ["compare"] else "paratrain compare")
    done = [r for r in summary["results"] if "error" not in r]
    print(f"paratrain compare: wrote {args.out}/report.md, report.html, results.json" + (" and plots" if done else ""))
    if not done:
        print(f"paratrain compare: no layout completed; their errors are in {args.out}/report.md", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        return cmd_train(args)
    if args.command == "checkpoint":
        return cmd_checkpoint(args)
    if args.command == "compare":
        return cmd_compare(args)
    if args.command == "plan":
        return cmd_plan(args)
    if args.command == "horovodrun":
        from paratrain.horovod.run import run as horovodrun

        return horovodrun(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
