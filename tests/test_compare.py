"""`paratrain compare` runs layouts side by side and writes the report: files, coinciding loss
curves, and a refused layout reported as failed while the others complete."""

import json
import subprocess
import sys

import pytest
import torch


def test_compare_four_layouts_and_one_invalid(tmp_path):
    out = tmp_path / "report"
    r = subprocess.run(
        [sys.executable, "-m", "paratrain", "compare", "--model", "tiny", "--steps", "5", "--seq-len", "32",
         "--layouts", "dp=2", "tp=2", "pp=2,schedule=1f1b,mb=4", "dp=2,zero=3", "tp=3", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    for name in ("report.md", "report.html", "results.json", "loss.png", "throughput.png", "memory.png",
                 "comm.png", "timeline-pp2-schedule1f1b-mb4.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())["results"]
    done = [x for x in results if "error" not in x]
    assert [x["layout"] for x in done] == ["dp=2", "tp=2", "pp=2,schedule=1f1b,mb=4", "dp=2,zero=3"]
    failed = [x for x in results if "error" in x]
    assert failed == [{"layout": "tp=3", "error": failed[0]["error"]}] and "not divisible by tp=3" in failed[0]["error"]
    for x in done[1:]:  # the same math: the loss curves coincide
        torch.testing.assert_close(torch.tensor(x["losses"]), torch.tensor(done[0]["losses"]), rtol=1e-5, atol=0)
    md = (out / "report.md").read_text()
    assert "## Recommendation" in md and "fastest layout" in md and "`tp=3` failed" in md
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert abs(done[2]["bubble_theory"] - 0.2) < 1e-9 and 0 <= done[2]["bubble_measured"] < 1
    # model FLOP/s per device beside tokens/s (no MFU on a CPU: its peak is not known)
    from paratrain.models.gpt import PRESETS
    from paratrain.planner import flops_per_token

    for x in done:
        assert x["mfu"] is None
        assert abs(x["tflops_per_device"] * 2e12 - x["tokens_per_s"] * flops_per_token(PRESETS["tiny"], 32)) < 1e-6 * x["tokens_per_s"]
    assert "TFLOP/s per device (MFU)" in md


def test_compare_with_no_layout_completed_writes_the_report_and_exits_1(tmp_path, capsys):
    """Layouts that cannot be read fail before any training: the report lists them, status 1."""
    from paratrain.cli import main

    out = tmp_path / "report"
    assert main(["compare", "--model", "tiny", "--layouts", "foo", "dp=x", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"paratrain compare: no layout completed; their errors are in {out}/report.md\n"
    results = json.loads((out / "results.json").read_text())["results"]
    assert [x["layout"] for x in results] == ["foo", "dp=x"] and all("error" in x for x in results)
    assert "`foo` failed" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--out", "{tmp}/file"], "--out: cannot create the folder '{tmp}/file': a file has that name"),
    (["--out", "{tmp}/file/report"], "--out: cannot create the folder"),
    (["--seed", "-1"], "--seed: must be between 0 and 4294967295, got -1"),
])
def test_compare_bad_input_is_one_line_before_any_layout(argv, message, tmp_path, capsys):
    from paratrain.cli import main

    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["compare", "--model", "tiny", "--layouts", "dp=1", "--out", str(tmp_path / "r"),
              *(a.format(tmp=tmp_path) for a in argv)])
    assert e.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paratrain: error: " + message.format(tmp=tmp_path)), lines
    assert "paratrain compare: dp=1" not in captured.out  # no layout ran
