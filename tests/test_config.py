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
