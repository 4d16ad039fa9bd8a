"""Config: TOML + flags, and every invalid setting gives one line and exit status 2."""

import subprocess
import sys

import pytest

from paratrain.cli import config_from_args, build_parser, main
from paratrain.config import ConfigError, RunConfig, format_layout, parse_layout, validate


def cfg_of(*argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_layout_spelling_round_trips():
    lay = parse_layout("dp=2,tp=2")
    assert (lay.dp, lay.tp, lay.pp, lay.zero) == (2, 2, 1, 0)
    assert format_layout(lay) == "dp=2,tp=2,pp=1,zero=0"
    assert format_layout(parse_layout(format_layout(lay))) == format_layout(lay)
    with pytest.raises(ConfigError):
        parse_layout("dp=two")


def test_toml_then_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nname = "tiny"\n[layout]\ndp = 4\n[train]\nsteps = 7\nlr = 0.01\n')
    cfg = cfg_of("--config", str(path), "--steps", "3", "--device", "cpu")
    assert (cfg.model.name, cfg.layout.dp, cfg.train.steps, cfg.train.lr) == ("tiny", 4, 3, 0.01)
    validate(cfg)


def test_default_layout_is_local_data_parallel():
    cfg = cfg_of("--device", "cpu")
    assert cfg.model.name == "small" and cfg.layout.tp == cfg.layout.pp == 1
    assert 1 <= cfg.layout.dp <= 4 and cfg.train.global_batch % cfg.layout.dp == 0
    assert cfg_of("--dp", "1", "--device", "cpu").layout.dp == 1  # an explicit layout is kept
    validate(cfg)


def test_config_dict_round_trip():
    cfg = cfg_of("--model", "tiny", "--dp", "2", "--metrics", "m.jsonl", "--device", "cpu")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


BAD = [
    (["--model", "huge"], "--model"),
    (["--dp", "0"], "--dp"),
    (["--dp", "3"], "--global-batch"),  # 16 sequences over 3 ranks
    (["--global-batch", "10", "--dp", "2", "--microbatches", "2"], "--global-batch"),
    (["--seq-len", "5000"], "--seq-len"),
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--zero", "5"], "--zero"),
    (["--timeline", "out"], "--timeline"),  # needs --pp
    (["--servers", "1"], "--servers"),  # only with --sync ps
    (["--sync", "ps", "--servers", "0"], "--servers"),
    (["--sync", "ps", "--servers", "1", "--tp", "2"], "--sync"),
    (["--sync", "ps", "--servers", "1", "--staleness", "-2"], "--staleness"),
    (["--sync", "gossip"], "--sync"),
    (["--simulate-straggler", "0:slow"], "--simulate-straggler"),
    (["--schedule", "zigzag"], "--schedule"),
    (["--precision", "fp8"], "--precision"),
    (["--compress", "zip"], "--compress"),
    (["--allreduce", "butterfly"], "--allreduce: must be one of backend, ring, tree, hierarchical, auto"),
    (["--allreduce", "ring", "--compress", "fp16"], "--allreduce"),
    (["--allreduce", "tree", "--zero", "1", "--dp", "2"], "--allreduce tree: the tree reduces to one root"),
    (["--compress", "topk:0"], "--compress"),
    (["--compress", "powersgd:x"], "--compress"),
    (["--device", "tpu"], "--device"),
    (["--data", "/no/such/file.txt"], "--data"),
    (["--steps", "ten"], "--steps"),
    (["--bogus-flag"], "unrecognized"),
    (["--tp", "3"], "--tp"),  # 4 heads
    (["--tp", "2", "--sequence-parallel", "--seq-len", "33"], "--sequence-parallel"),
    (["--pp", "2", "--microbatches", "1"], "--microbatches"),
    (["--layout", "auto", "--tp", "3"], "--layout"),
    (["--layout", "dp=x"], "layout"),
    (["--simulate-failure", "9:1"], "--simulate-failure"),
    (["--config", "/no/such.toml"], "--config"),
    (["--seed", "-1"], "--seed: must be between 0 and 4294967295, got -1"),
    (["--seed", str(2**32)], "--seed"),
    (["--profile-steps", "2"], "--profile-steps: give the folder with --profile DIR"),
    (["--virtual-stages", "3"], "--virtual-stages: only applies to --schedule interleaved"),
    (["--virtual-stages", "3", "--schedule", "interleaved"], "--virtual-stages"),  # pp=1
    (["--pp", "2", "--microbatches", "2", "--virtual-stages", "3"], "--virtual-stages"),  # 1f1b
    (["--virtual-stages", "0"], "--virtual-stages: must be at least 1"),
    (["--warmup-steps", "-5"], "--warmup-steps: must be at least 0, got -5"),
    (["--grad-clip", "-1"], "--grad-clip: must be at least 0"),
    (["--grad-clip", "nan"], "--grad-clip: must be a finite number"),
    (["--eval-every", "-1"], "--eval-every: must be at least 0"),
    (["--checkpoint-every", "-1", "--checkpoint-dir", "x"], "--checkpoint-every: must be at least 0, got -1"),
    (["--keep-checkpoints", "0", "--checkpoint-dir", "x"], "--keep-checkpoints: must be at least 1, got 0"),
    (["--lr", "inf"], "--lr"),
    (["--bucket-mb", "nan"], "--bucket-mb"),
    (["--collective-timeout", "inf"], "--collective-timeout"),
    (["--simulate-straggler", "0:inf"], "--simulate-straggler"),
    (["--dp", "100000", "--global-batch", "100000"], "layout: 100000 local workers need about"),
]


@pytest.mark.parametrize("argv,field", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_invalid_settings_exit_2_with_one_line(argv, field, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "tiny", "--device", "cpu", *argv] if argv[0] != "--model" else ["train", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paratrain: error: ") and field in lines[0], err


def test_bad_toml_names_the_setting(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nstepz = 3\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(path)])
    assert e.value.code == 2 and "train.stepz" in capsys.readouterr().err
    path.write_text('[train]\nsteps = "many"\n')
    with pytest.raises(SystemExit):
        main(["train", "--config", str(path)])
    assert "train.steps must be an integer" in capsys.readouterr().err


@pytest.mark.parametrize("setting,message", [
    ("weight_decay = -1", "train.weight_decay: must be at least 0, got -1.0"),
    ("eval_batches = 0", "train.eval_batches: must be at least 1, got 0"),
    ("beta2 = 1.0", "train.beta2: must be in [0, 1), got 1.0"),
    ("lr = inf", "--lr: must be a positive finite number, got inf"),
])
def test_toml_only_settings_are_named_one_at_a_time(setting, message, tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text(f"[train]\n{setting}\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "tiny", "--device", "cpu", "--config", str(path)])
    assert e.value.code == 2 and capsys.readouterr().err == f"paratrain: error: {message}\n"


def _paths(tmp):
    (tmp / "file").write_text("x")
    (tmp / "empty.txt").write_text("")
    (tmp / "empty").mkdir()
    (tmp / "dir.pt").mkdir()
    (tmp / "binary.dat").write_bytes(b"\0" * 5000)
    (tmp / "short.txt").write_text("hello world")


PATHS = [
    (["--metrics", "{tmp}/file/m.jsonl"], "--metrics: cannot create the folder"),
    (["--metrics", "{tmp}/empty"], "--metrics: '{tmp}/empty' is a folder"),
    (["--profile", "{tmp}/file"], "--profile: cannot create the folder"),
    (["--pp", "2", "--microbatches", "2", "--timeline", "{tmp}/file/t"], "--timeline: cannot create the folder"),
    (["--checkpoint-dir", "{tmp}/file", "--checkpoint-every", "1"], "--checkpoint-dir: cannot create the folder"),
    (["--data", "{tmp}/empty"], "--data: no text found"),
    (["--data", "{tmp}/empty.txt"], "--data: no text found"),
    (["--data", "{tmp}/binary.dat"], "--data: no text found"),
    (["--data", "{tmp}/short.txt", "--seq-len", "32"], "--data: the corpus has 11 bytes, too few for --seq-len 32"),
]


@pytest.mark.parametrize("argv,field", PATHS, ids=[" ".join(a) for a, _ in PATHS])
def test_unusable_paths_exit_2_before_any_worker(argv, field, tmp_path, capsys):
    _paths(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "tiny", "--device", "cpu", *(a.format(tmp=tmp_path) for a in argv)])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"paratrain: error: {field.format(tmp=tmp_path)}"), lines


def test_output_folders_are_created_before_the_workers(tmp_path):
    from paratrain.outputs import prepare_outputs

    cfg = cfg_of("--model", "tiny", "--device", "cpu", "--metrics", str(tmp_path / "a" / "b" / "m.jsonl"),
                 "--profile", str(tmp_path / "prof"), "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "5")
    validate(cfg)
    prepare_outputs(cfg)
    assert (tmp_path / "a" / "b").is_dir() and (tmp_path / "prof").is_dir() and (tmp_path / "ck").is_dir()
    assert not (tmp_path / "a" / "b" / "m.jsonl").exists()  # the workers write it


def test_resume_of_a_finished_run_is_refused(tmp_path, monkeypatch, capsys):
    import json

    import paratrain.checkpoint

    step = tmp_path / "step_00000004"
    step.mkdir()
    (step / "manifest.json").write_text(json.dumps({"step": 4, "config": {"train": {"seed": 1234}}}))
    monkeypatch.setattr(paratrain.checkpoint, "resumable", lambda root, run: (str(step), {"step": 4}))
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "tiny", "--device", "cpu", "--steps", "4", "--checkpoint-dir", str(tmp_path), "--resume"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"paratrain: error: --resume: {step} is at step 4, so --steps 4 leaves nothing "
                                       "to train\n")


def test_layout_auto_keeps_virtual_stages_to_interleaved_pipelines():
    from collections import Counter

    from paratrain.models.gpt import PRESETS
    from paratrain.planner.search import candidates

    found = list(candidates(PRESETS["tiny"], 32, 8, 2, "fp32", 2, False, Counter(), {"virtual_stages": 3}))
    assert found and all(c.schedule == "interleaved" and c.pp > 1 for c in found)


@pytest.mark.parametrize("argv,field", [
    (["{tmp}/file", "--to", "{tmp}/m.pt"], "checkpoint export: '{tmp}/file' is a file"),
    (["{tmp}", "--to", "{tmp}/dir.pt"], "--to: '{tmp}/dir.pt' is a folder"),
    (["{tmp}", "--to", "{tmp}/file/m.pt"], "--to: cannot create the folder"),
    (["{tmp}", "--to", "{tmp}/m.bin"], "--to: write a .safetensors or .pt file"),
])
def test_checkpoint_export_refuses_bad_paths_in_one_line(argv, field, tmp_path, capsys):
    _paths(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["checkpoint", "export", *(a.format(tmp=tmp_path) for a in argv)])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"paratrain: error: {field.format(tmp=tmp_path)}"), lines


def test_console_script_rejects_before_starting_workers():
    r = subprocess.run(
        [sys.executable, "-m", "paratrain", "train", "--model", "tiny", "--dp", "3"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "paratrain: error: --global-batch: 16 sequences do not split evenly over dp=3 x microbatches=1; "
        "use a multiple of 3"
    ]
