"""benchmarks/mfu.py: the FLOPs formula, and the whole path (paratrain train as a subprocess,
tokens/s from its metrics, MFU against a given peak) on the CPU; on a GPU the peak comes from the
device's name."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import mfu  # noqa: E402


def test_flops_per_token_is_6n_plus_attention():
    # GPT-2 small: N = 12 L d^2 in the blocks' matrices + 50304 x 768 in the tied embedding (the
    # head's matrix); 12 layers, d 768
    n = 12 * 12 * 768**2 + 50304 * 768
    assert n == 123_568_128
    assert mfu.flops_per_token("gpt2", 1024) == 6 * n + 12 * 12 * 1024 * 768


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


# --ceiling ----------------------------------------------------------------------------------------

def test_gemm_ceiling_shapes_counts_and_flops():
    from paratrain.models.gpt import PRESETS, build_model, count_params

    cfg, B, T = PRESETS["tiny"], 2, 16
    d, L, M = cfg.d_model, cfg.n_layer, 2 * 16
    model = build_model("tiny", 0)
    c = mfu.gemm_ceiling(model, B, T, torch.float32, "cpu", warmup=1, iters=3)
    # Per block q, k, v, attn.proj are d x d, mlp.fc d x 4d, mlp.proj 4d x d; the head d x vocab,
    # which for `tiny` (vocab 256 = 4d) shares mlp.fc's shape: 6 L + 1 linears in 3 shapes.
    shapes = {(r["M"], r["K"], r["N"]): r["count"] for r in c["rows"]}
    assert shapes == {(M, d, d): 4 * L, (M, d, 4 * d): L + 1, (M, 4 * d, d): L}
    assert sum(shapes.values()) == 6 * L + 1
    layers = {(r["K"], r["N"]): r["layers"] for r in c["rows"]}
    assert layers[(d, d)] == ["attn.q", "attn.k", "attn.v", "attn.proj"]
    assert layers[(d, 4 * d)] == ["mlp.fc", "head"] and layers[(4 * d, d)] == ["mlp.proj"]
    a = c["attention"]
    assert (a["B"], a["H"], a["T"], a["head_dim"], a["count"]) == (B, cfg.n_head, T, d // cfg.n_head, L)
    for r in c["rows"]:
        assert min(r["fwd_s"], r["dx_s"], r["dw_s"]) > 0
        assert r["seconds"] == r["count"] * (r["fwd_s"] + r["dx_s"] + r["dw_s"])
    assert a["seconds"] > 0 and c["floor_s"] == c["gemm_s"] + a["seconds"]

    # FLOPs: the GEMMs are 3 x 2 M K N each, i.e. 6 M per weight of a linear (the tied embedding
    # counted once, through the head); attention is the formula's 12 L T d per token. The formula's
    # N is exactly these weights: the biases, LayerNorms and wpe, in no GEMM, are left out.
    gemm_weights = L * (4 * d * d + 2 * 4 * d * d) + d * cfg.vocab_size
    no_gemm = L * (9 * d + 4 * d) + 2 * d + cfg.max_seq_len * d
    assert count_params(model) == gemm_weights + no_gemm
    assert c["gemm_flops"] == sum(3 * 2 * M * k * n * count for (_, k, n), count in shapes.items()) == 6 * M * gemm_weights
    assert a["flops"] == 12 * L * T * d * M
    assert c["model_flops"] == mfu.flops_per_token("tiny", T) * M == c["gemm_flops"] + a["flops"]


def test_linear_gemms_of_gpt2():
    from paratrain.models.gpt import build_model

    M = 16 * 1024
    shapes = {(r["M"], r["K"], r["N"]): r["count"] for r in mfu.linear_gemms(build_model("gpt2", 0), M)}
    assert shapes == {(M, 768, 768): 48, (M, 768, 3072): 12, (M, 3072, 768): 12, (M, 768, 50304): 1}


@pytest.mark.slow
def test_ceiling_on_cpu():
    r = subprocess.run([sys.executable, str(BENCH / "mfu.py"), "--device", "cpu", "--peak-tflops", "2",
                        "--models", "tiny", "--batch", "4", "--seq-len", "32", "--steps", "4", "--warmup", "1",
                        "--no-compile", "--precision", "fp32", "--ceiling"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    row = next(line.split() for line in lines if line.startswith("tiny"))
    achieved, ceiling, of_ceiling = (float(x.rstrip("%")) for x in row[4:7])
    # achieved / ceiling, from the two printed to one decimal
    assert 100 * (achieved - 0.05) / (ceiling + 0.05) - 0.05 <= of_ceiling <= 100 * (achieved + 0.05) / (ceiling - 0.05) + 0.05
    assert any(line.startswith(f"ceiling tiny: MFU {ceiling:.1f}% at most") for line in lines)
    assert sum(line.lstrip().startswith("128 x ") for line in lines) == 3  # the three GEMM shapes


# --breakdown --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel__5x_cublas", "matmul"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "matmul"),
    ("ampere_bf16_s16816gemm_bf16_128x256_ldg8_f2f_stages_64x3_tn", "matmul"),
    ("cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)", "matmul"),
    ("triton_tem_fused_mm_4", "matmul"),
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"), ("aten::linear", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t, "
     "Flash_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t> >, false, true, false, false, true, true, false, false>"
     "(Flash_fwd_params)", "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128, 128, 8>>", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<cutlass::arch::Sm80>::Params)", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, "
     "(at::native::ADAM_MODE)1, false>, double*, double, double, double, double, double, bool, float*, float*>", "optimizer"),
    ("fused_adamw", "optimizer"), ("aten::_fused_adamw_", "optimizer"), ("aten::_foreach_mul_", "optimizer"),
    ("aten::addcdiv_", "optimizer"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
     "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)", "loss (softmax/cross-entropy)"),
    ("void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>", "loss (softmax/cross-entropy)"),
    ("aten::_log_softmax", "loss (softmax/cross-entropy)"), ("aten::_log_softmax_backward_data", "loss (softmax/cross-entropy)"),
    ("aten::nll_loss_forward", "loss (softmax/cross-entropy)"),
    ("triton_poi_fused_add_native_layer_norm_0", mfu.COMPILED), ("triton_red_fused__log_softmax_1", mfu.COMPILED),
    ("triton_per_fused_native_layer_norm_backward_2", mfu.COMPILED), ("cpp_fused_add_gelu_3", mfu.COMPILED),
    ("Memcpy HtoD (Pageable -> Device)", "copies/memset"), ("Memset (Device)", "copies/memset"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
     "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const>", "copies/memset"),
    ("aten::copy_", "copies/memset"), ("aten::_to_copy", "copies/memset"),
    ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::BinaryFunctor<float, "
     "float, float, at::native::binary_internal::MulFunctor<float> > >(at::TensorIteratorBase&)::{lambda(int)#1}>", "other elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&)>", "other elementwise"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "other elementwise"),
    ("aten::native_layer_norm", "other elementwise"), ("aten::gelu", "other elementwise"), ("aten::add", "other elementwise"),
])
def test_categorize(name, category):
    assert mfu.categorize(name) == category


def op(name, calls, device_s, cpu_s, on_device=False, annotation=False):
    return {"name": name, "calls": calls, "self_device_s": device_s, "self_cpu_s": cpu_s,
            "on_device": on_device, "annotation": annotation}


def kernel(name, calls, device_s):
    return op(name, calls, device_s, 0.0, on_device=True)


def test_breakdown_cuda():
    # 2 steps in 1 s; times are binary fractions so that the sums are exact.
    gemm, flash = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>"
    ops = {"device": "cuda", "steps": 2, "wall_s": 1.0, "ops": [
        # a named range, and its copy on the GPU timeline (an annotation)
        op("paratrain step 1", 1, 0.0, 0.01), op("paratrain step 1", 1, 0.4, 0.0, on_device=True, annotation=True),
        op("Optimizer.step#AdamW.step", 2, 0.0, 0.01),
        op("Optimizer.step#AdamW.step", 2, 0.03, 0.0, on_device=True, annotation=True),
        op("aten::linear", 8, 0.0, 0.002), op("aten::mm", 8, 0.25, 0.003),  # aten::mm: its kernels' time too
        kernel(gemm, 4, 0.125), kernel("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", 4, 0.125),
        op("aten::_scaled_dot_product_flash_attention", 2, 0.0625, 0.001), kernel(flash, 2, 0.0625),
        # a triton kernel is named like its launcher on the CPU
        op("triton_poi_fused_add_gelu_0", 2, 0.03125, 0.0005), kernel("triton_poi_fused_add_gelu_0", 2, 0.03125),
        op("aten::_fused_adamw_", 2, 0.015625, 0.001), kernel("void multi_tensor_apply_kernel<FusedAdamMathFunctor>", 2, 0.015625),
        kernel("Memcpy HtoD (Pageable -> Device)", 2, 0.00390625), kernel("Memset (Device)", 2, 0.00390625),
        kernel("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>", 2, 0.00390625),
        op("cudaLaunchKernel", 30, 0.0, 0.004), op("aten::empty", 10, 0.0, 0.0),
    ]}
    assert sorted(name for name, _, _ in mfu.counted_ops(ops)) == sorted([
        gemm, "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", flash, "triton_poi_fused_add_gelu_0",
        "void multi_tensor_apply_kernel<FusedAdamMathFunctor>", "Memcpy HtoD (Pageable -> Device)", "Memset (Device)",
        "void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>"])
    per_step = [("matmul", 0.125), ("attention", 0.03125), (mfu.COMPILED, 0.015625), ("optimizer", 0.0078125),
                ("copies/memset", 0.00390625), ("other elementwise", 0.001953125)]
    busy = sum(s for _, s in per_step)
    expected = [(c, s, s / 0.5) for c, s in per_step + [("idle / host (step wall - busy)", 0.5 - busy)]]
    assert mfu.breakdown(ops) == expected
    assert expected[-1][1] == 0.314453125


def test_breakdown_cpu():
    ops = {"device": "cpu", "steps": 2, "wall_s": 1.0, "ops": [
        op("paratrain step 1", 1, 0.0, 0.0625), op("Optimizer.step#AdamW.step", 2, 0.0, 0.25),
        op("autograd::engine::evaluate_function: MmBackward0", 8, 0.0, 0.5), op("MmBackward0", 8, 0.0, 0.125),
        op("aten::linear", 8, 0.0, 0.0078125), op("aten::addmm", 8, 0.0, 0.25), op("aten::mm", 16, 0.0, 0.125),
        op("aten::native_layer_norm", 4, 0.0, 0.09375),
        op("aten::_scaled_dot_product_flash_attention_for_cpu", 2, 0.0, 0.0625),
        op("aten::_fused_adamw_", 2, 0.0, 0.03125),
        op("aten::_log_softmax", 2, 0.0, 0.015625), op("aten::nll_loss_forward", 2, 0.0, 0.0078125),
        op("cpp_fused_add_gelu_0", 2, 0.0, 0.015625), op("aten::copy_", 6, 0.0, 0.00390625),
    ]}
    per_step = [("matmul", 0.19140625), ("other elementwise", 0.046875), ("attention", 0.03125), ("optimizer", 0.015625),
                ("loss (softmax/cross-entropy)", 0.01171875), (mfu.COMPILED, 0.0078125), ("copies/memset", 0.001953125)]
    assert mfu.breakdown(ops) == [(c, s, s / 0.5) for c, s in per_step]  # no idle row on a CPU
