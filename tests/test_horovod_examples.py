"""Horovod's own PyTorch examples with only the import changed (examples/horovod/): the MNIST
example (scikit-learn's digits in MNIST's place, offline) reaches one process's test accuracy on 2
and 4 ranks through `paratrain horovodrun`, and the synthetic benchmark runs with fp16 compression
and with Adasum."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "horovod")
MNIST = ["--epochs", "10", "--lr", "0.05", "--log-interval", "1000"]


def _run(np: int, script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    argv = [sys.executable, os.path.join(EXAMPLES, script), *args] if np == 1 else \
        [sys.executable, "-m", "paratrain", "horovodrun", "-np", str(np), "python", os.path.join(EXAMPLES, script), *args]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _accuracy(stdout: str) -> float:
    return float(re.findall(r"Accuracy: ([\d.]+)%", stdout)[-1])


@pytest.fixture(scope="module")
def one_process() -> float:
    pytest.importorskip("sklearn")
    return _accuracy(_run(1, "pytorch_mnist.py", *MNIST))


@pytest.mark.parametrize("np", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_mnist_example_reaches_the_accuracy_of_one_process(one_process, np):
    accuracy = _accuracy(_run(np, "pytorch_mnist.py", *MNIST))
    assert one_process > 75.0 and abs(accuracy - one_process) < 5.0, (accuracy, one_process)


@pytest.mark.parametrize("np,flags", [(2, ["--fp16-allreduce"]), pytest.param(4, ["--use-adasum"], marks=pytest.mark.slow)])
def test_synthetic_benchmark_runs_unchanged(np, flags):
    out = _run(np, "pytorch_synthetic_benchmark.py", "--model", "resnet_small", "--image-size", "16", "--batch-size", "8",
               "--num-warmup-batches", "1", "--num-batches-per-iter", "2", "--num-iters", "2", *flags)
    assert f"Number of CPUs: {np}" in out and re.search(r"Total img/sec on \d+ CPU\(s\): [\d.]+", out)
