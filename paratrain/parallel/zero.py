"""ZeRO (Rajbhandari et al., SC 2020): shard model states over the data-parallel group.

The model's parameters are grouped into *units*: each transformer block, and the rest of a top
module (embedding, final norm, head). Inside a unit, parameters that share weight decay and
parallel role form one `FlatGroup`: a flat buffer padded to a multiple of dp, of which dp rank
r owns elements [r S, (r + 1) S). Per stage:

- stage 0: nothing sharded (S is the whole buffer); gradients all-reduced. Used for mixed
  precision without sharding, so that every precision runs on one code path.
- stage 1: the fp32 master weights and Adam's moments exist only for the owned shard. Gradients
  accumulate in a full buffer, are reduce-scattered once per step, and after the update the
  shards are all-gathered into the full parameters.
- stage 2: as 1, but gradients are kept only as shards: a unit's gradients are reduce-scattered
  as soon as backward has produced them (every micro-batch) and the full gradients are dropped.
- stage 3: parameters are sharded too. Before a unit runs (forward, or backward through the
  saved-tensor hooks) its shards are all-gathered, and the full copy is dropped right after; the
  next unit's gather is started early (prefetch). Gradients leave through a reduce-scatter in the
  backward of the gather.

Mixed precision (`dtype` bf16 / fp16) keeps the parameters and gradients that compute sees in
`dtype` and the optimizer's master weights and moments in fp32, as in the paper: per parameter
2 + 2 + 12 bytes, of which stage 1 shards the 12, stage 2 the 14 and stage 3 all 16. Reductions
run in fp32. Gradients are summed over dp (the trainer divides the loss by the global token
count), like `DataParallel`.

With a gradient `compressor` (`--compress`) each group's reduction (stages 0 and 1: once per step;
2 and 3: per micro-batch) becomes the compressor's: the dense (approximate) sum of the group's
gradients, of which this rank keeps its shard; a 16-bit cast stays a reduce-scatter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from paratrain.comm import Compressor, all_reduce
from paratrain.comm.reduction import GradientAllReduce
from paratrain.mesh import Mesh
from paratrain.parallel.data import SyncSwitch, sync_module_states
from paratrain.parallel.roles import ParamRole, role_of, set_role
from paratrain.parallel.zero3 import Site, Unit, blocks_of, root_holders, wrap

__all__ = ["FlatGroup", "ZeroDataParallel", "blocks_of"]



@dataclass
class Slot:
    """One parameter inside a flat group: every (module, attribute) that holds it, and where."""
    refs: list[tuple[nn.Module, str]]
    shape: torch.Size
    offset: int
    numel: int
    name: str = ""  # the parameter's global name (checkpoints)
    tp_dim: int | None = None  # the dimension tensor parallelism split, if any


class FlatGroup:
    def __init__(self, params: list[nn.Parameter], refs: dict[int, list], role: ParamRole, decay: bool,
                 stage: int, dtype: torch.dtype, dp: int, dp_rank: int, names: dict[int, str]):
        """`role`: what the group's parameters share (each slot keeps its own tp_dim)."""
        self.role, self.decay, self.stage, self.dtype = role, decay, stage, dtype
        self.slots, n = [], 0
        for p in params:
            self.slots.append(Slot(refs[id(p)], p.shape, n, p.numel(), names.get(id(p), ""),
                                   role_of(p).tp_dim))
            n += p.numel()
        self.numel = n
        shards = dp if stage > 0 else 1
        self.padded = math.ceil(n / shards) * shards
        self.shard_size = self.padded // shards
        lo = (dp_rank if stage > 0 else 0) * self.shard_size
        self.lo, self.hi = lo, lo + self.shard_size
        device = params[0].device
        flat = torch.zeros(self.padded, dtype=torch.float32, device=device)
        for s, p in zip(self.slots, params):
            flat[s.offset : s.offset + s.numel] = p.detach().flatten().float()
        self.full: torch.Tensor | None = None
        self.full_grad: torch.Tensor | None = None
        if stage < 3:
            # the parameters compute uses: views into one flat buffer in `dtype`
            self.full = flat if dtype == torch.float32 else flat.to(dtype)
            self.params = params
            for s, p in zip(self.slots, params):
                p.data = self.full[s.offset : s.offset + s.numel].view(s.shape)
            if stage < 2:  # gradients accumulate in one flat buffer too
                self.full_grad = torch.zeros(self.padded, dtype=dtype, device=device)
        # the fp32 master shard; in fp32 it is the owned part of the full buffer itself
        owned = flat[lo : lo + self.shard_size]
        aliased = dtype == torch.float32 and stage < 3
        self.master = nn.Parameter(owned if aliased else owned.clone())
        self.master_is_copy = not aliased
        set_role(self.master, **vars(role))
        # reduced gradient of the owned shard (stages 0 and 1: a view into full_grad)
        # stages 2 and 3: allocated by the step's first reduction (None: zero), dropped by zero_grad
        self.grad_shard = self.full_grad[lo : lo + self.shard_size] if self.full_grad is not None else None

    def views(self, full: torch.Tensor) -> list[torch.Tensor]:
        return [full[s.offset : s.offset + s.numel].view(s.shape) for s in self.slots]

    def add_grad(self, out: torch.Tensor, own: bool = False) -> None:
        """grad_shard += out (stages 2 and 3). The shard is fp32, the reduction's dtype, whatever
        compute's: the optimizer reads fp32, and rounding the dp sum to bf16 first would lose its
        low bits (as FSDP2's reduce_dtype=fp32, Megatron's fp32 main grads). The first of a step
        becomes the shard itself when it is `own` (a buffer nobody else keeps): no copy."""
        if self.grad_shard is None:
            self.grad_shard = out.to(torch.float32, copy=not own)
        else:
            self.grad_shard.add_(out)

    def grad_or_zeros(self) -> torch.Tensor:
        if self.grad_shard is None:
            self.grad_shard = torch.zeros(self.shard_size, dtype=torch.float32, device=self.master.device)
        return self.grad_shard

    def flat_grads(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """The gradients of the slots as one padded fp32 vector (the reduction dtype)."""
        flat = torch.zeros(self.padded, dtype=torch.float32, device=self.master.device)
        for s, g in zip(self.slots, grads):
            if g is not None:
                flat[s.offset : s.offset + s.numel] = g.detach().flatten()
        return flat


class ZeroDataParallel(SyncSwitch, nn.Module):
    """ZeRO stages 0-3 over the dp group. `no_sync()`: stages 0 and 1 accumulate full gradients
    locally (all but the last micro-batch); stages 2 and 3 keep no full gradients, so they reduce
    every micro-batch regardless."""

    def __init__(self, module: nn.Module, mesh: Mesh, stage: int, dtype: torch.dtype = torch.float32,
                 tops: list[nn.Module] | None = None, activation_checkpointing: bool = False,
                 compressor: Compressor | None = None, names: dict[int, str] | None = None,
                 find_blocks: Callable[[nn.Module], list[nn.Module]] | None = None,
                 broadcast_buffers: bool = True, allreduce: str = "backend", split_root: bool = True):
        """`tops`: the modules whose forward is a whole model or pipeline chunk (each has a
        `blocks` container); default `[module]`. `compressor`: compress the gradient reduction.
        `names`: id(parameter) -> global name, kept with each slot for checkpoints.
        `find_blocks(top)`: a top module's repeated layers, the units (default `blocks_of`).
        `broadcast_buffers`: dp rank 0's buffers before each forward, as DDP (`SyncSwitch.forward`).
        `split_root` (stage 3): gather an embedding, a final norm, a head around their own forward
        (zero3.py's sites) rather than the top's parameters around the whole forward."""
        super().__init__()
        self.broadcast_buffers = broadcast_buffers
        self.require_forward_param_sync = True  # DDP's name: sync buffers before the next forward
        self.module, self.mesh, self.stage, self.dtype = module, mesh, stage, dtype
        self.names = names or {}
        self.compressor = compressor
        self.group, self.dp, self.dp_rank = mesh.group("dp"), mesh.size("dp"), mesh.coord("dp")
        # --allreduce: stage 0's all-reduce, or the reduce-scatters and all-gathers of stages 1-3
        self.reduction = GradientAllReduce(allreduce, mesh, sharded=stage > 0)
        self.require_sync = True
        self.live: dict[int, tuple[Unit, int]] = {}  # storage -> gathered unit (stage 3)
        self.pending: list = []  # in-flight gradient reductions: (group, out, handle)
        self.units: list[Unit] = []
        tops = tops or [module]
        refs: dict[int, list] = {}
        for m in module.modules():
            for name, p in m._parameters.items():
                if p is not None:
                    refs.setdefault(id(p), []).append((m, name))
        sync_module_states(module, mesh)
        for p in module.parameters():  # frozen: not trained nor sharded, but computed in `dtype` too
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)
        seen: set[int] = set()
        self.linked: dict[int, bool] = {}  # stage 3: root sites whose order of sites is known
        self.recording: list | None = None  # the order of sites being recorded by a first forward
        for t, top in enumerate(tops):
            blocks = (find_blocks or blocks_of)(top)
            in_blocks = {id(p) for b in blocks for p in b.parameters()}
            rest = [p for p in top.parameters() if id(p) not in in_blocks]
            held, rest = root_holders(top, blocks, rest) if stage == 3 and split_root else ([], rest)
            root = self._make_unit(top, rest, refs, seen, f"top{t}")
            held = [(ms, self._make_unit(ms[0], ps, refs, seen, f"top{t}.site{i}")) for i, (ms, ps) in enumerate(held)]
            chain = [self._make_unit(b, list(b.parameters()), refs, seen, f"top{t}.block{i}") for i, b in enumerate(blocks)]
            if stage == 3:
                for b, u in zip(blocks, chain):
                    wrap(self, Site(b, [u], save_hooks=not activation_checkpointing))
                for m in {id(m): m for ms, _ in held for m in ms}.values():
                    wrap(self, Site(m, [u for ms, u in held if any(x is m for x in ms)]))
                wrap(self, Site(top, [root]), order=[])
        self.groups = [g for u in self.units for g in u.groups]
        self._key = {id(g): i for i, g in enumerate(self.groups)}  # the compressor's state key
        if stage < 3:
            for g in self.groups:
                for p in g.params:
                    p.register_post_accumulate_grad_hook(self._on_grad_ready)
            self._slot_of = {id(p): (g, i) for g in self.groups for i, p in enumerate(g.params)}
            self._ready = {id(g): 0 for g in self.groups}
            self.zero_grad()
        else:
            for g in self.groups:  # the full parameters are gone from the modules
                for s in g.slots:
                    for m, name in s.refs:
                        m._parameters.pop(name, None)

    def _make_unit(self, module, params, refs, seen, name) -> Unit:
        buckets: dict[tuple, list] = {}
        for p in params:
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            r = role_of(p)  # grouped by what the reductions and the norm need; tp_dim stays per slot
            key = (p.dim() >= 2, r.tp_sharded, r.sequence_parallel, r.pp_tied, r.pp_duplicate)
            buckets.setdefault(key, []).append(p)
        groups = [FlatGroup(ps, refs, ParamRole(0 if sharded else None, sp, tied, dup), decay, self.stage, self.dtype,
                            self.dp, self.dp_rank, self.names)
                  for (decay, sharded, sp, tied, dup), ps in buckets.items()]
        unit = Unit(self, module, groups, name)
        if groups:
            self.units.append(unit)
        return unit

    # ------------------------------------------------------------ gradients
    def _on_grad_ready(self, p: nn.Parameter) -> None:
        g, i = self._slot_of[id(p)]
        if g.full_grad is not None:
            s = g.slots[i]
            view = g.full_grad[s.offset : s.offset + s.numel].view(s.shape)
            if p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
                p.grad = view
            if not self.require_sync:
                return
        self._ready[id(g)] += 1
        if self._ready[id(g)] == len(g.params):
            self._ready[id(g)] = 0
            if g.full_grad is None:  # stage 2: reduce now, keep only the shard
                grads = [q.grad for q in g.params]
                for q in g.params:
                    q.grad = None
                self.reduce_group(g, grads)

    def reduce_group(self, g: FlatGroup, grads: list[torch.Tensor | None]) -> None:
        """Start the reduction of one group's gradients into its owned shard (stages 2 and 3)."""
        flat = g.flat_grads(grads)
        if self.dp == 1:
            self.pending.append((g, flat, None))
            return
        if self.compressor is not None:
            key = self._key[id(g)]
            out = self.compressor.reduce_scatter(key, flat, g.views(flat), self.group, self.mesh.comm)
            g.add_grad(out)  # done: the compressed round is synchronous
            return
        out = torch.empty(g.shard_size, dtype=torch.float32, device=flat.device)
        handle = self.reduction.start_reduce_scatter(out, flat)
        self.pending.append((g, out, handle))
        self._retire(self.MAX_IN_FLIGHT)

    MAX_IN_FLIGHT = 1  # reductions left running while backward goes on: each holds a full fp32 gradient group

    def _retire(self, keep: int) -> None:
        """Wait for all but the newest `keep` reductions and add them to the shards."""
        while len(self.pending) > keep:
            g, out, handle = self.pending.pop(0)
            if handle is not None:
                handle.wait()
            g.add_grad(out, own=True)

    def finish_grad_sync(self) -> None:
        """Afterwards every group's `grad_shard` holds the dp-summed gradient of its shard."""
        self._retire(0)
        if self.stage >= 2:
            return
        for g in self.groups:  # stages 0 and 1: one reduction of the accumulated full gradient
            if self.dp == 1:
                continue
            if self.compressor is not None:
                flat, key = g.full_grad.float(), self._key[id(g)]
                if self.stage == 0:
                    self.compressor.reduce(key, g.views(flat), self.group, self.mesh.comm)
                    g.full_grad.copy_(flat)
                else:
                    out = self.compressor.reduce_scatter(key, flat, g.views(flat), self.group, self.mesh.comm)
                    g.grad_shard.copy_(out)
            elif self.stage == 0:
                flat = g.full_grad.float()
                self.reduction.run(flat)
                g.full_grad.copy_(flat)
            else:
                out = torch.empty(g.shard_size, dtype=torch.float32, device=g.full_grad.device)
                flat = g.full_grad.float()
                if flat is g.full_grad and self.reduction.pool is not None:
                    flat = flat.clone()  # our algorithms work in their input: keep the local gradients
                self.reduction.reduce_scatter(out, flat)
                g.grad_shard.copy_(out)

    def all_reduce_grads(self, flag: str, group) -> None:
        """Sum the owned gradient shards of groups with `flag` over `group` (the tied embedding
        over the first and last pipeline stage; sequence-parallel norms over tp)."""
        shards = [g.grad_or_zeros() for g in self.groups if getattr(g.role, flag)]
        if shards and group is not None:
            flat = torch.cat([s.float() for s in shards])
            all_reduce(flat, group, self.mesh.comm)
            o = 0
            for s in shards:
                s.copy_(flat[o : o + s.numel()])
                o += s.numel()

    def zero_grad(self, set_to_none: bool = False) -> None:
        for g in self.groups:
            if g.full_grad is not None:
                g.full_grad.zero_()
                for s, p in zip(g.slots, g.params):
                    p.grad = g.full_grad[s.offset : s.offset + s.numel].view(s.shape)
                continue
            g.grad_shard = None
            if self.stage == 2:
                for p in g.params:
                    p.grad = None

    # ------------------------------------------------------------ the update
    def master_params(self, decay: bool) -> list[nn.Parameter]:
        return [g.master for g in self.groups if g.decay == decay]

    def unscale_grads(self, scale: float) -> bool:
        """Set each master's fp32 `.grad` = grad shard / scale. In fp16, return True if any (on
        any rank) is not finite (an overflow: the step must be skipped). bf16 and fp32 have fp32's
        range and skip nothing, so they return False without the check, which would make the host
        wait for the device in the middle of every step."""
        for g in self.groups:
            shard = g.grad_or_zeros()
            g.master.grad = shard.float().div_(scale) if scale != 1.0 else shard.float()
        if self.dtype != torch.float16:
            return False
        bad = torch.stack([(~torch.isfinite(g.master.grad)).any() for g in self.groups]).any().float()
        if torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bool(bad > 0)

    def grad_parts(self) -> list[tuple[torch.Tensor, nn.Parameter]]:
        """(fp32 gradient, parameter carrying the role) of every owned shard, for the norm."""
        return [(g.master.grad, g.master) for g in self.groups]

    @torch.no_grad()
    def publish(self) -> None:
        """After the optimizer updated the masters: refresh what compute sees."""
        for u in self.units:
            u.drain()
        for g in self.groups:
            g.master.grad = None
            if self.stage == 3:  # gathered from the master itself, cast to `dtype` on the way (zero3.py)
                continue
            if g.master_is_copy:
                g.full[g.lo : g.hi].copy_(g.master)
            if self.stage > 0 and self.dp > 1:
                mine = g.full[g.lo : g.hi].clone()
                self.reduction.all_gather(g.full, mine)

    def memory_bytes(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Bytes of model states this rank holds: the parameters compute uses, gradients, and
        optimizer state (fp32 masters where they are copies, plus the optimizer's moments)."""
        params = sum(g.full.numel() * g.full.element_size() for g in self.groups if g.full is not None)
        grads = sum(g.full_grad.numel() * g.dtype.itemsize if g.full_grad is not None else g.shard_size * 4
                    for g in self.groups)
        opt = sum(g.master.numel() * 4 for g in self.groups if g.master_is_copy or self.stage == 3)
        if optimizer is not None:
            opt += sum(t.numel() * t.element_size() for st in optimizer.state.values()
                       for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
        return {"params": params, "grads": grads, "optimizer": opt}
