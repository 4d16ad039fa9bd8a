"""Elastic layouts (paratrain/elastic.py): under torchrun with --dp auto (or no --dp) every start
takes dp from the world, keeps the global batch and the newest checkpoint's micro-batch size, and
refuses a world that does not fit in one line; a resumed attempt in another world size is a
membership change in the metrics file and the end record counts them."""

from __future__ import annotations

import json

import pytest

from paratrain.cli import build_parser, config_from_args
from paratrain.config import ConfigError
from paratrain.elastic import micro_batches_for
from paratrain.metrics import RunHistory


def _cfg(monkeypatch, world: int | None, *flags: str, restart: int = 0):
    if world is None:
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))
    return config_from_args(build_parser().parse_args(["train", "--model", "tiny", "--device", "cpu", *flags]))


@pytest.mark.parametrize("world,flags,dp", [(4, ["--dp", "auto"], 4), (2, ["--dp", "auto"], 2),
                                            (4, ["--tp", "2"], 2), (8, ["--dp", "auto", "--tp", "2", "--pp", "2"], 2)])
def test_dp_comes_from_the_world_under_torchrun(monkeypatch, world, flags, dp):
    cfg = _cfg(monkeypatch, world, "--global-batch", "8", *flags)
    assert cfg.layout.dp == dp and cfg.world_size == world and cfg.train.global_batch == 8


def test_a_given_dp_stays_and_auto_outside_torchrun_is_local(monkeypatch):
    assert _cfg(monkeypatch, 4, "--dp", "2", "--tp", "2").layout.dp == 2
    assert _cfg(monkeypatch, None, "--dp", "auto", "--global-batch", "8").layout.dp >= 1


@pytest.mark.parametrize("world,flags,message", [
    (3, ["--dp", "auto", "--tp", "2"], "does not divide by tp x pp = 2"),
    (3, ["--dp", "auto", "--global-batch", "8"], "--global-batch 8 does not split over dp=3"),
    (2, ["--dp", "auto", "--sync", "ps", "--servers", "1"], "parameter-server"),
])
def test_a_world_that_does_not_fit_is_refused_in_one_line(monkeypatch, world, flags, message):
    with pytest.raises(ConfigError, match=message) as e:
        _cfg(monkeypatch, world, *flags)
    assert "\n" not in str(e.value)


def test_dp_flag_takes_a_number_or_auto(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--dp", "two"])
    assert e.value.code == 2 and "must be a whole number or auto" in capsys.readouterr().err


def _checkpoint(root, step: int, layout: str, world: int) -> None:
    folder = root / f"step_{step}"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"step": step, "layout": layout, "world_size": world}))


def test_a_smaller_world_keeps_the_micro_batch_by_accumulating(monkeypatch, tmp_path):
    _checkpoint(tmp_path, 5, "dp=4,tp=1,pp=1,zero=0,schedule=1f1b,microbatches=1", 4)  # 2 sequences per micro-batch
    flags = ["--dp", "auto", "--global-batch", "8", "--checkpoint-dir", str(tmp_path)]
    shrunk = _cfg(monkeypatch, 2, *flags, restart=1)
    assert (shrunk.layout.dp, shrunk.layout.microbatches) == (2, 2)
    fresh = _cfg(monkeypatch, 2, *flags, restart=0)  # a fresh start: the user's micro-batches
    assert (fresh.layout.dp, fresh.layout.microbatches) == (2, 1)
    _checkpoint(tmp_path, 10, "dp=2,tp=1,pp=1,zero=0,schedule=1f1b,microbatches=2", 2)
    grown = _cfg(monkeypatch, 4, *flags, restart=2)  # the node came back: one micro-batch again
    assert (grown.layout.dp, grown.layout.microbatches) == (4, 1)


@pytest.mark.parametrize("per_rank,micro,at_least,expected", [(4, 2, 1, 2), (4, 4, 1, 1), (6, 4, 1, 2), (6, 4, 4, 6),
                                                              (5, 2, 1, 5), (8, 8, 2, 2)])
def test_micro_batches_for(per_rank, micro, at_least, expected):
    assert micro_batches_for(per_rank, micro, at_least) == expected


def test_the_end_record_counts_membership_changes():
    history = RunHistory()
    history.add({"event": "restart", "attempt": 1, "time_lost_s": 2.0,
                 "membership": {"from": "dp=4,tp=1,pp=1,zero=0", "to": "dp=2,tp=1,pp=1,zero=0"}})
    history.add({"event": "restart", "attempt": 2, "time_lost_s": 1.0})
    summary = history.summary()
    assert summary["restarts"] == 2 and summary["membership_changes"] == 1 and summary["time_lost_s"] == 3.0


@pytest.mark.slow  # default-suite time; the cases beside it stay in the default run
def test_resuming_in_another_world_is_recorded_as_a_membership_change(tmp_path):
    from helpers import cli

    metrics, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    common = ["--model", "tiny", "--global-batch", "8", "--seq-len", "32", "--seed", "5", "--no-progress",
              "--checkpoint-dir", str(ck), "--checkpoint-every", "2", "--metrics", str(metrics)]
    first = cli("train", *common, "--dp", "2", "--steps", "4", "--simulate-failure", "1:3")  # saved step 2, then failed
    assert first.returncode == 1, first.stderr
    second = cli("train", *common, "--dp", "1", "--steps", "4", "--resume")
    assert second.returncode == 0, second.stderr
    assert "membership changed: 2 -> 1 ranks" in second.stdout
    records = [json.loads(line) for line in open(metrics)]
    resumed = [r for r in records if r.get("event") == "resume"]
    assert resumed[0]["membership"]["from"].startswith("dp=2") and resumed[0]["membership"]["to"].startswith("dp=1")
    assert records[-1]["event"] == "end" and records[-1]["membership_changes"] == 1
