"""Bad input gives one line `paratrain: error: ...` and exit status 2 before any worker starts
(issue 17, point 10): unreadable configs, checkpoints whose manifest lists nothing, output files
that cannot be appended to, values past what the machine can hold, corpus folders holding FIFOs
or dangling links; and `paratrain plan` on 100,000 layers returns (a near-linear partition)."""

import itertools
import os
import random

import pytest

import paratrain.launch
from paratrain.cli import main
from paratrain.parallel.pipeline import partition

TRAIN = ["train", "--model", "tiny", "--device", "cpu", "--steps", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def no_workers(monkeypatch):
    """Should a check let a case through, the test fails here instead of starting workers."""
    def refuse(*args, **kwargs):
        raise AssertionError("a worker would have started")
    monkeypatch.setattr(paratrain.launch, "launch", refuse)


def one_line_exit_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("paratrain: error: "), err
    return lines[0]


# ------------------------------------------------------------------ --config
def test_config_that_is_not_utf8_is_named(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_bytes(b"\xff\xfe\x00[train]\x00\x01")
    line = one_line_exit_2([*TRAIN, "--config", str(path)], capsys)
    assert line == f"paratrain: error: --config: {str(path)!r} is not UTF-8 text (byte 0xff at offset 0); a TOML file is UTF-8"


@pytest.mark.parametrize("what", ["folder", "/dev/zero", "fifo", "dangling link", "deep"])
def test_config_that_is_no_regular_toml_file_is_named_without_blocking(what, tmp_path, capsys):
    path = {"folder": tmp_path, "/dev/zero": "/dev/zero"}.get(what, tmp_path / "run.toml")
    if what == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer forever
    elif what == "dangling link":
        os.symlink(tmp_path / "gone.toml", path)
    elif what == "deep":
        path.write_text("a = " + "[" * 50_000)
    line = one_line_exit_2([*TRAIN, "--config", str(path)], capsys)
    expected = {"folder": "is a folder, not a TOML file", "/dev/zero": "is a character device, not a TOML file",
                "fifo": "is a FIFO (named pipe), not a TOML file", "dangling link": "which does not exist",
                "deep": "nests arrays or tables too deeply"}[what]
    assert line.startswith("paratrain: error: --config: ") and expected in line, line


# ------------------------------------------------------------------ checkpoint export
@pytest.mark.parametrize("manifest", ['{"step": 1, "files": {}}', "{}", "[]", '"step"', "folder"])
def test_export_of_a_manifest_listing_no_files_is_one_line(manifest, tmp_path, capsys):
    step = tmp_path / "step_00000001"
    step.mkdir()
    if manifest == "folder":
        (step / "manifest.json").mkdir()
    else:
        (step / "manifest.json").write_text(manifest)
    for path in (step, tmp_path):  # the checkpoint itself, and the folder holding it
        line = one_line_exit_2(["checkpoint", "export", str(path), "--to", str(tmp_path / "m.pt")], capsys)
        assert line.startswith("paratrain: error: checkpoint export: "), line
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("error", [FileNotFoundError(2, "No such file or directory", "/ck/step_1/.metadata"),
                                   AttributeError("'list' object has no attribute 'get'"), KeyError("bytes")])
def test_whatever_escapes_export_is_one_line(error, tmp_path, monkeypatch, capsys):
    import paratrain.checkpoint

    def export(folder, out):
        raise error
    monkeypatch.setattr(paratrain.checkpoint, "export", export)
    line = one_line_exit_2(["checkpoint", "export", str(tmp_path), "--to", str(tmp_path / "m.pt")], capsys)
    assert line.startswith("paratrain: error: checkpoint export: ") and str(tmp_path) in line, line
    if isinstance(error, OSError):
        assert line.endswith("/ck/step_1/.metadata: No such file or directory")


# ------------------------------------------------------------------ output files
@pytest.mark.parametrize("path,message", [
    ("/dev/full", "'/dev/full' is a character device, not a regular file"),
    ("/proc/version", "'/proc/version' is a kernel file under /proc, not a file to write to"),
])
def test_metrics_file_that_cannot_be_appended_to_is_refused(path, message, capsys):
    if not os.path.exists(path):
        pytest.skip(f"no {path} here")
    assert one_line_exit_2([*TRAIN, "--metrics", path], capsys) == f"paratrain: error: --metrics: {message}; " \
        "give a file such as metrics.jsonl"


def test_metrics_file_is_checked_without_touching_its_content(tmp_path):
    from paratrain.cli import build_parser, config_from_args
    from paratrain.outputs import prepare_outputs

    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n')
    prepare_outputs(config_from_args(build_parser().parse_args([*TRAIN, "--metrics", str(path)])))
    assert path.read_text() == '{"step": 1}\n'
    prepare_outputs(config_from_args(build_parser().parse_args([*TRAIN, "--metrics", os.devnull])))


# ------------------------------------------------------------------ values past what the machine can hold
@pytest.mark.parametrize("argv,message", [
    (["--dp", "2", "--simulate-straggler", "1:1e300"],
     "--simulate-straggler: expected RANK:SECONDS with a worker RANK and 0 to 3600 seconds, got '1:1e300'"),
    (["--collective-timeout", "0.001"],
     "--collective-timeout: must be 0 (the watchdog off) or between 1 and 604800 seconds, got 0.001"),
    (["--dp", "2", "--global-batch", "200000000"], "--global-batch: 200000000 sequences of 128 tokens need at least "),
    (["--dp", "1", "--global-batch", "2000000", "--microbatches", "2"], "GiB of token ids and "),
])
def test_values_past_the_machine_are_refused(argv, message, capsys):
    line = one_line_exit_2([*TRAIN, *argv], capsys)
    assert message in line, line


def test_zero_turns_the_watchdog_off_and_one_second_is_allowed():
    from paratrain.cli import build_parser, config_from_args
    from paratrain.config import validate

    for seconds in ("0", "1"):
        validate(config_from_args(build_parser().parse_args([*TRAIN, "--collective-timeout", seconds])))


# ------------------------------------------------------------------ --data folders
@pytest.mark.parametrize("what", ["dangling link", "fifo"])
def test_corpus_folder_with_a_fifo_or_dangling_link_names_it(what, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("plenty of text " * 2000)  # enough on its own: the check must not stop there
    bad = tmp_path / "b.txt"
    os.mkfifo(bad) if what == "fifo" else os.symlink(tmp_path / "gone.txt", bad)
    line = one_line_exit_2([*TRAIN, "--data", str(tmp_path)], capsys)
    said = "is a FIFO (named pipe), not a text file" if what == "fifo" else "which does not exist"
    assert line.startswith(f"paratrain: error: --data: {str(bad)!r} ") and said in line, line
    from paratrain.data import load_corpus

    with pytest.raises(ValueError, match="b.txt"):  # the workers' loader has the same rule
        load_corpus(str(tmp_path))


# ------------------------------------------------------------------ the pipeline partition
def _reference(costs: list[float], k: int) -> list[range]:
    """Every split, by the old rule (the full dynamic program, written as plain recursion):
    the least largest stage cost, then the least sum of squares, then the earliest ends."""
    prefix = list(itertools.accumulate(costs, initial=0.0))
    n = len(costs)

    def best(stage, lo):
        if stage == k - 1:
            c = prefix[n] - prefix[lo]
            return c, c * c, (n,)
        options = []
        for hi in range(lo + 1, n - (k - stage - 1) + 1):
            c = prefix[hi] - prefix[lo]
            worst, squares, ends = best(stage + 1, hi)
            options.append((max(c, worst), c * c + squares, (hi, *ends)))
        return min(options)
    ends = best(0, 0)[2]
    return [range(a, b) for a, b in zip((0, *ends[:-1]), ends)]


def _least_max(costs, k):
    """Brute force over every set of k - 1 cut points."""
    prefix = list(itertools.accumulate(costs, initial=0.0))
    return min(max(prefix[b] - prefix[a] for a, b in zip((0, *cuts), (*cuts, len(costs))))
               for cuts in itertools.combinations(range(1, len(costs)), k - 1))


def _random_costs(rng: random.Random, n: int) -> list[float]:
    kind = rng.randrange(4)
    if kind == 0:
        return [float(rng.randint(0, 5)) for _ in range(n)]
    if kind == 1:
        return [rng.random() for _ in range(n)]
    if kind == 2:  # a GPT: equal blocks, the embedding on the first, the head on the last
        costs = [7.5] * n
        costs[0] += rng.choice([0, 0.5])
        costs[-1] += rng.choice([0, 3.0, 15.0, 40.0])
        return costs
    return [float(rng.choice([1, 1000, 10**6 + 1])) for _ in range(n)]


def test_partition_matches_the_exhaustive_split_on_small_cases():
    rng = random.Random(17)
    for _ in range(400):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        costs = _random_costs(rng, n)
        got = partition.balanced_partition(costs, k)
        assert got == _reference(costs, k), (costs, k)


def test_past_the_exact_budget_the_split_keeps_the_least_largest_stage(monkeypatch):
    monkeypatch.setattr(partition, "EXACT_WORK", 0)
    rng = random.Random(18)
    for _ in range(300):
        n = rng.randint(1, 10)
        k = rng.randint(1, n)
        costs = _random_costs(rng, n)
        got = partition.balanced_partition(costs, k)
        assert len(got) == k and all(len(r) for r in got) and got[0].start == 0 and got[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(got, got[1:]))
        assert max(sum(costs[i] for i in r) for r in got) == pytest.approx(_least_max(costs, k), rel=1e-12)


def test_plan_of_100000_layers_returns(capsys):
    assert main(["plan", "--layers", "100000", "--hidden", "256", "--heads", "4", "--vocab", "256",
                 "--seq-len", "128", "--gpus", "2", "--gpu", "cpu-local"]) == 0
    assert "100000 layers" in capsys.readouterr().out


def test_plan_shapes_past_the_bounds_are_one_line(capsys):
    line = one_line_exit_2(["plan", "--layers", "100000000", "--hidden", "64", "--heads", "1", "--vocab", "256",
                            "--seq-len", "8", "--gpus", "2"], capsys)
    assert line == "paratrain: error: --layers: must be between 1 and 1,000,000, got 100000000"
    line = one_line_exit_2(["plan", "--model", "tiny", "--gpus", "1000000007"], capsys)
    assert line == "paratrain: error: --gpus: must be between 1 and 65,536, got 1000000007"
