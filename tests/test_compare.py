"""`paratrain compare` runs layouts side by side and writes the report: files, coinciding loss
curves, and a refused layout reported as failed while the others complete."""

import json
import subprocess
import sys

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
