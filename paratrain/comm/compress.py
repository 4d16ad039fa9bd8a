"""Gradient compression for the data-parallel reduction (`--compress`).

A `Compressor` replaces a list of gradient tensors (the views of one bucket or flat group) by
(an approximation of) their sum over a process group, sending fewer bytes than one all-reduce,
and keeps state per key (a bucket or group index) between calls. Every byte goes through the
counted collectives, so `comm_bytes` in the metrics is what was actually sent.

- `CastCompression`: all-reduce in fp16 or bf16 (2x fewer bytes).
- `TopK`: each rank sends its k = ceil(ratio n) largest entries (values and indices, all-gathered)
  and keeps what it did not send as error feedback for the next round (Stich et al. 2018,
  "Sparsified SGD with memory").
- `PowerSGD`: a rank-r factorisation P Q^T of every matrix by one step of power iteration with
  warm start and error feedback (Vogels et al., NeurIPS 2019): two all-reduces of r(n + m)
  numbers per n x m matrix.

The compress / decompress pair is Horovod's interface where a scheme fits it (the cast and top-k);
`reduce` is the whole round, which PowerSGD needs because it communicates twice.

Warm-up (`warmup` steps, `--compress-warmup`): the early steps, where the loss falls fastest and
Adam's statistics form, are compressed less. Top-k's density falls geometrically from 1 at step 1
to `ratio` at step `warmup` (the exponential sparsity warm-up of Lin et al. 2018, "Deep Gradient
Compression"); PowerSGD all-reduces uncompressed until step `warmup` (torch's
`start_powerSGD_iter`). The caller numbers the steps with `begin_step`; a compressor that is never
told the step compresses from the first call.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from paratrain.comm.collectives import RING_FACTOR, CommStats, all_gather, all_reduce, reduce_scatter_flat


def _flatten(grads: list[torch.Tensor]) -> torch.Tensor:
    """The gradients as one new fp32 vector (the reduction dtype)."""
    return torch.cat([g.detach().reshape(-1).float() for g in grads])


def _unflatten(flat: torch.Tensor, grads: list[torch.Tensor]) -> None:
    """Copy `flat` back into the gradient tensors, in order."""
    o = 0
    for g in grads:
        g.copy_(flat[o : o + g.numel()].view_as(g))
        o += g.numel()


def _ring_bytes(op: str, nbytes: int, world: int) -> int:
    return round(nbytes * RING_FACTOR[op](world)) if world > 1 and nbytes else 0


class Compressor:
    """Replace gradients by their (approximate) sum over a group, sending fewer bytes."""

    name = "none"

    def __init__(self, warmup: int = 0) -> None:
        self.state: dict[Any, Any] = {}  # per key: error feedback, warm-start factors
        self.warmup = warmup
        self.step: int | None = None  # the step being reduced (1-based), None: not told

    def begin_step(self, step: int | None = None) -> None:
        """Number the next reductions as step `step` (default: the one after the last)."""
        self.step = step if step is not None else (self.step or 0) + 1

    def warming_up(self) -> bool:
        return self.step is not None and self.step < self.warmup

    def reduce(self, key: Any, grads: list[torch.Tensor], group: dist.ProcessGroup | None,
               stats: CommStats) -> None:
        """Replace `grads` in place by (an approximation of) their sum over `group`. Every rank
        calls it with the same key and shapes, in the same order."""
        flat = _flatten(grads)
        payload, ctx = self.compress(key, flat)
        gathered = self.communicate(payload, group, stats)
        _unflatten(self.decompress(gathered, ctx), grads)

    def reduce_scatter(self, key: Any, flat: torch.Tensor, views: list[torch.Tensor],
                       group: dist.ProcessGroup | None, stats: CommStats) -> torch.Tensor:
        """ZeRO: this rank's 1/n chunk of the sum of `flat` (a padded flat buffer of which `views`
        are the gradients). By default a dense `reduce` of the views, then the chunk."""
        self.reduce(key, views, group, stats)
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        size = flat.numel() // n
        return flat[rank * size : (rank + 1) * size]

    def compress(self, key: Any, flat: torch.Tensor) -> tuple[list[torch.Tensor], Any]:
        raise NotImplementedError

    def communicate(self, payload: list[torch.Tensor], group, stats: CommStats) -> list[torch.Tensor]:
        raise NotImplementedError

    def decompress(self, payload: list[torch.Tensor], ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def sent_bytes(self, shapes: list[torch.Size], world: int) -> int:
        """The formula: bytes one rank sends in one `reduce` of fp32 gradients of `shapes`."""
        raise NotImplementedError


class NoCompression(Compressor):
    """One flat fp32 all-reduce: the reference the others are measured against."""

    def compress(self, key, flat):
        return [flat], None

    def communicate(self, payload, group, stats):
        all_reduce(payload[0], group, stats)
        return payload

    def decompress(self, payload, ctx):
        return payload[0]

    def sent_bytes(self, shapes, world):
        return _ring_bytes("all_reduce", 4 * sum(math.prod(s) for s in shapes), world)


class CastCompression(NoCompression):
    """All-reduce in a 16-bit float type: half the bytes, the rounding of that type."""

    def __init__(self, dtype: torch.dtype, warmup: int = 0) -> None:
        super().__init__(warmup)  # a cast has nothing to warm up: the warm-up is ignored
        self.dtype = dtype
        self.name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]

    def compress(self, key, flat):
        return [flat.to(self.dtype)], flat.dtype

    def decompress(self, payload, ctx):
        return payload[0].to(ctx)

    def reduce_scatter(self, key, flat, views, group, stats):
        """The cast commutes with sharding: a 16-bit reduce-scatter (half its bytes)."""
        n = dist.get_world_size(group)
        out = torch.empty(flat.numel() // n, dtype=self.dtype, device=flat.device)
        reduce_scatter_flat(out, flat.to(self.dtype), group, stats)
        return out.to(flat.dtype)

    def sent_bytes(self, shapes, world):
        item = torch.finfo(self.dtype).bits // 8
        return _ring_bytes("all_reduce", item * sum(math.prod(s) for s in shapes), world)


class TopK(Compressor):
    """Send the k = ceil(ratio n) entries of largest magnitude (values in fp32, indices in int32,
    all-gathered: every rank's sparse vector reaches every rank) and sum them into a dense
    vector; what was not sent stays in this rank's error and is added to the next round."""

    def __init__(self, ratio: float, warmup: int = 0) -> None:
        super().__init__(warmup)
        if not 0 < ratio <= 1:
            raise ValueError(f"top-k ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio
        self.name = f"topk:{ratio:g}"

    def density(self) -> float:
        """The fraction sent this step: `ratio`, or during the warm-up ratio^(step / warmup)."""
        if self.warming_up():
            return self.ratio ** (self.step / self.warmup)
        return self.ratio

    def k_of(self, n: int, density: float | None = None) -> int:
        return min(n, max(1, math.ceil((self.density() if density is None else density) * n)))

    @staticmethod
    def index_dtype(n: int) -> torch.dtype:
        return torch.int32 if n <= torch.iinfo(torch.int32).max else torch.int64

    @staticmethod
    def largest(flat: torch.Tensor, k: int) -> torch.Tensor:
        """Indices of exactly k entries of largest magnitude (a selection, ~3x faster on CPU than
        `topk`). NaN and inf count as largest, so an fp16 overflow reaches the sum and is seen."""
        inf = float("inf")
        a = torch.nan_to_num(flat.abs(), nan=inf, posinf=inf)
        if k == a.numel():
            return torch.arange(k, device=a.device)
        threshold = a.kthvalue(a.numel() - k + 1).values  # the k-th largest
        idx = (a > threshold).nonzero().squeeze(1)  # fewer than k
        ties = (a == threshold).nonzero().squeeze(1)[: k - idx.numel()]
        return torch.cat([idx, ties])

    def compress(self, key, flat):
        error = self.state.get(key)
        flat = flat + error if error is not None and error.shape == flat.shape else flat.clone()
        idx = self.largest(flat, self.k_of(flat.numel()))
        values = flat[idx]
        flat[idx] = 0  # what is left is the error this rank keeps
        # an overflowed (fp16 loss-scaled) step is skipped: do not carry inf into the next one
        self.state[key] = flat if bool(torch.isfinite(flat).all()) else torch.zeros_like(flat)
        return [values, idx.to(self.index_dtype(flat.numel()))], (flat.numel(), flat.device)

    def communicate(self, payload, group, stats):
        return [all_gather(t, group, stats) for t in payload]

    def decompress(self, payload, ctx):
        """The dense sum of the (gathered) sparse vectors."""
        values, idx = payload
        n, device = ctx
        return torch.zeros(n, dtype=values.dtype, device=device).index_add_(0, idx, values)

    def sent_bytes(self, shapes, world):
        """After the warm-up (density `ratio`)."""
        n = sum(math.prod(s) for s in shapes)
        k = self.k_of(n, self.ratio)
        return _ring_bytes("all_gather", k * 4, world) + _ring_bytes(
            "all_gather", k * torch.iinfo(self.index_dtype(n)).bits // 8, world)


class PowerSGD(Compressor):
    """Rank-r PowerSGD (Vogels et al. 2019). Each gradient of two or more dimensions, viewed as
    an n x m matrix M (plus this rank's error), is projected on the warm-started Q (m x r):
    P = M Q, summed over ranks in one flat all-reduce and orthogonalised; then Q = M^T P, summed
    in a second one; P Q^T is the sum's rank-r approximation. Vectors, and matrices whose factors
    would not be `min_ratio` times smaller than themselves, go in one uncompressed all-reduce.
    """

    def __init__(self, rank: int, seed: int = 0, min_ratio: float = 1.0, warmup: int = 0) -> None:
        super().__init__(warmup)
        if rank < 1:
            raise ValueError(f"PowerSGD rank must be at least 1, got {rank}")
        self.rank, self.min_ratio, self.seed = rank, min_ratio, seed
        self.name = f"powersgd:{rank}"

    def compressed(self, shape: torch.Size) -> bool:
        if len(shape) < 2:
            return False
        n, m = shape[0], math.prod(shape[1:])
        r = min(self.rank, n, m)
        return r * (n + m) * self.min_ratio < n * m

    def reduce(self, key, grads, group, stats):
        world = dist.get_world_size(group)
        state = self.state.setdefault(key, {})
        warm = self.warming_up()  # all uncompressed, the error feedback untouched
        mats = [i for i, g in enumerate(grads) if not warm and self.compressed(g.shape)]
        rest = [g for g in grads if warm or not self.compressed(g.shape)]
        if rest:
            flat = _flatten(rest)
            all_reduce(flat, group, stats)
            _unflatten(flat, rest)
        if not mats:
            return
        ms, qs = [], []
        for i in mats:
            g = grads[i]
            m = g.detach().reshape(g.shape[0], -1).float()
            err = state.get(("error", i))
            ms.append(m + err if err is not None and err.shape == m.shape else m)
            q = state.get(("q", i))
            if q is None or q.shape[0] != m.shape[1]:
                # a function of the shape alone: the same on every rank, and on the tp ranks that
                # hold a replicated matrix whatever else their buckets hold
                r = min(self.rank, *m.shape)
                n, k = m.shape
                gen = torch.Generator().manual_seed((((self.seed * 1_000_003 + n) * 1_000_003 + k) * 64 + r) % 2**62)
                q = torch.randn(m.shape[1], r, generator=gen).to(m.device)
            qs.append(torch.linalg.qr(q).Q)  # orthonormal columns: the scale of P stays that of M
        ps = self._all_reduce_flat([m @ q for m, q in zip(ms, qs)], group, stats)
        ps = [torch.linalg.qr(p).Q for p in ps]
        qs_new = self._all_reduce_flat([m.T @ p for m, p in zip(ms, ps)], group, stats)
        for i, m, p, q, q_old in zip(mats, ms, ps, qs_new, qs):
            approx = p @ q.T  # the sum over ranks, rank r
            err = m - approx / world  # this rank's share of the residual (as torch's hook does)
            grads[i].copy_(approx.view_as(grads[i]))  # (m may be a view of grads[i])
            finite = bool(torch.isfinite(q).all())  # the same on every rank (q is summed)
            state[("q", i)] = q if finite else q_old
            state[("error", i)] = err if finite and bool(torch.isfinite(err).all()) else None

    @staticmethod
    def _all_reduce_flat(tensors: list[torch.Tensor], group, stats: CommStats) -> list[torch.Tensor]:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        all_reduce(flat, group, stats)
        out, o = [], 0
        for t in tensors:
            out.append(flat[o : o + t.numel()].view_as(t))
            o += t.numel()
        return out

    def sent_bytes(self, shapes, world):
        """After the warm-up: r(n + m) floats per compressed n x m matrix (P, then Q), plus the rest uncompressed."""
        dense = sum(math.prod(s) for s in shapes if not self.compressed(s))
        ps = qs = 0
        for s in filter(self.compressed, shapes):
            n, m = s[0], math.prod(s[1:])
            ps, qs = ps + min(self.rank, n, m) * n, qs + min(self.rank, n, m) * m
        return sum(_ring_bytes("all_reduce", 4 * x, world) for x in (dense, ps, qs))


SPEC_HELP = "none, fp16, bf16, topk:RATIO (0 < RATIO <= 1) or powersgd:RANK (an integer >= 1)"


def parse_compress(spec: str, warmup: int = 0) -> Compressor | None:
    """`none` -> None; `fp16`, `bf16`, `topk:0.01`, `powersgd:4` -> a compressor (with `warmup`
    steps of warm-up). Raises ValueError naming what would work."""
    kind, sep, arg = spec.strip().partition(":")
    if spec == "none":
        return None
    if spec in ("fp16", "bf16"):
        return CastCompression(torch.float16 if spec == "fp16" else torch.bfloat16, warmup)
    try:
        if kind == "topk" and sep:
            ratio = float(arg)
            if 0 < ratio <= 1:
                return TopK(ratio, warmup=warmup)
        elif kind == "powersgd" and sep:
            rank = int(arg)
            if rank >= 1:
                return PowerSGD(rank, warmup=warmup)
    except ValueError:
        pass
    raise ValueError(f"expected {SPEC_HELP}, got {spec!r}")
