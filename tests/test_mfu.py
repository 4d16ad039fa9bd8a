"""benchmarks/mfu.py: the FLOPs formula, and the whole path (paratrain train as a subprocess,
tokens/s from its metrics, MFU against a given peak) on the CPU; on a GPU the peak comes from the
device's name."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import mfu  # noqa: E402


def test_flops_per_token_is_6n_plus_attention():
    # GPT-2 small: 124,475,904 parameters (vocabulary padded to 50304, embedding tied), 12 layers, d 768
    assert mfu.flops_per_token("gpt2", 1024) == 6 * 124_475_904 + 12 * 12 * 1024 * 768


def test_mfu_path_on_cpu():
    peak = 2.0
    r = subprocess.run([sys.executable, str(BENCH / "mfu.py"), "--device", "cpu", "--peak-tflops", str(peak),
                        "--models", "tiny", "--batch", "4", "--seq-len", "32", "--steps", "4", "--warmup", "1",
                        "--no-compile", "--precision", "fp32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line.split() for line in r.stdout.splitlines() if line.startswith("tiny"))
    tokens_per_s, mfu_pct = float(row[2].replace(",", "")), float(row[4].rstrip("%"))
    assert tokens_per_s > 0
    expected = 100 * tokens_per_s * mfu.flops_per_token("tiny", 32) / (peak * 1e12)
    assert abs(mfu_pct - expected) <= 0.05 + 0.01 * expected  # printed to one decimal
