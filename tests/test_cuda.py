"""The CUDA / NCCL path. Skipped where torch sees no GPU; run on a GPU machine."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_train_on_cuda_with_nccl(tmp_path):
    path = tmp_path / "m.jsonl"
    n = torch.cuda.device_count()
    dp = 2 if n >= 2 else 1
    r = subprocess.run(
        [sys.executable, "-m", "paratrain", "train", "--model", "tiny", "--device", "cuda", "--dp", str(dp),
         "--steps", "5", "--global-batch", "8", "--seq-len", "64", "--metrics", str(path), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in open(path)]
    steps = [x for x in lines if "step" in x and "loss" in x]
    assert len(steps) == 5 and steps[-1]["loss"] < steps[0]["loss"]
    assert steps[0]["peak_mem_bytes"] < 2**30  # the CUDA allocator's peak, not the process RSS
    assert "device cuda" in r.stdout


def test_cuda_matches_cpu_losses(tmp_path):
    losses = {}
    for device in ("cpu", "cuda"):
        path = tmp_path / f"{device}.jsonl"
        subprocess.run(
            [sys.executable, "-m", "paratrain", "train", "--model", "tiny", "--device", device, "--dp", "1",
             "--steps", "5", "--global-batch", "8", "--seq-len", "64", "--metrics", str(path), "--no-progress"],
            check=True, capture_output=True, timeout=300,
        )
        losses[device] = [x["loss"] for x in map(json.loads, open(path)) if "loss" in x and "step" in x]
    torch.testing.assert_close(torch.tensor(losses["cuda"]), torch.tensor(losses["cpu"]), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("flags", [["--precision", "bf16", "--zero", "3", "--activation-checkpointing"],
                                   ["--precision", "fp16", "--zero", "1"]], ids=["bf16-zero3-ac", "fp16-zero1"])
def test_mixed_precision_and_zero_on_cuda(tmp_path, flags):
    path = tmp_path / "m.jsonl"
    r = subprocess.run(
        [sys.executable, "-m", "paratrain", "train", "--model", "tiny", "--device", "cuda", "--dp", "1",
         "--steps", "20", "--global-batch", "8", "--seq-len", "64", "--metrics", str(path), "--no-progress", *flags],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    records = [json.loads(x) for x in open(path)]
    steps = [x for x in records if "step" in x and "loss" in x]
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3
    if "fp16" in flags:
        assert all("loss_scale" in x for x in steps)
    assert records[-1]["memory_per_rank"][0]["params"] > 0 or "3" in flags


def test_compiled_bf16_step_profiles_its_kernels_on_cuda(tmp_path):
    """--compile (blocks and loss), fused AdamW and --profile on a GPU: the ops summary counts
    kernels once, with GEMMs and compiled kernels among them."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "benchmarks"))
    import mfu

    prof = tmp_path / "prof"
    r = subprocess.run(
        [sys.executable, "-m", "paratrain", "train", "--model", "tiny", "--device", "cuda", "--dp", "1",
         "--precision", "bf16", "--compile", "--steps", "6", "--global-batch", "8", "--seq-len", "64",
         "--no-progress", "--profile", str(prof), "--profile-steps", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ops = json.load(open(prof / "ops_rank0.json"))
    assert ops["device"] == "cuda" and ops["steps"] == 2
    per_category = {c: s for c, s, _ in mfu.breakdown(ops)}
    assert per_category["matmul"] > 0 and per_category[mfu.COMPILED] > 0
    busy = sum(s for c, s in per_category.items() if not c.startswith("idle"))
    assert 0 < busy < ops["wall_s"] / ops["steps"]
