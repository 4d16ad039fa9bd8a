"""ZeRO-3's gathers (Rajbhandari et al., SC 2020): units, the sites that gather them, prefetch.

A *unit* is a set of flat groups gathered and released together: each repeated block, and the
parameters of a top module outside its blocks. Those are split further where the modules holding
them are standard layers that use only their own parameters (`SITE_TYPES`: an embedding, the
final norm, the head): each such module is a *site* that gathers only its own units, around its
own forward, and releases them after it, as torch FSDP2 does for each `fully_shard` module and
as the issue of a large vocabulary demands (the head's full weight and its full gradient are
then alive only around the head, not for the whole step). A weight that two sites share (a tied
embedding and head) is a unit of its own, gathered at each site and freed in between; its
gradient arrives twice and is reduced twice into the one shard. Parameters held by anything
else stay in the top's root unit, gathered around the whole forward.

The sites of a top are linked in the order of the first forward (recorded, not assumed): a site's
forward starts the gather of the next site, and in backward the unpacking of the last of a site's
saved parameter views starts the gather of the one before (prefetch, one site ahead). Not at the
first one, as FSDP2's pre-backward hook does: the peak of a step is early in a block's backward,
where its activations and their gradients are alive together, and a block gathered ahead there
adds its size to the peak; by the last unpack most of the block's backward is done.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
import torch.nn as nn

# standard layers whose forward reads only their own parameters: safe to gather around it alone
SITE_TYPES = (nn.Embedding, nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.Conv1d, nn.Conv2d, nn.Conv3d,
              nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Unit:
    """Flat groups gathered together (a block, a site's parameters, or a top's root)."""

    def __init__(self, engine, module: nn.Module, groups: list, name: str):
        self.engine, self.module, self.groups, self.name = engine, module, groups, name
        self.gathered: list[torch.Tensor] | None = None  # full buffers while in use
        self.inflight: tuple | None = None  # (buffers, handles) of a prefetch
        device = groups[0].master.device if groups else None
        self.anchor = torch.zeros((), device=device, requires_grad=True)  # puts the gather in autograd

    def fetch(self) -> None:
        """Start the all-gather of this unit's shards (a prefetch), unless done or in flight."""
        if self.gathered is not None or self.inflight is not None:
            return
        bufs, handles = [], []
        for g in self.groups:
            # the fp32 master, cast to compute's dtype into its own place in the full buffer (as
            # FSDP2 casts before its all-gather): no second copy of the shard is kept, and no
            # temporary; the all-gather runs in place
            full = torch.empty(g.padded, dtype=g.dtype, device=g.master.device)
            mine = full[g.lo : g.hi]
            mine.copy_(g.master.detach())
            handles.append(self.engine.reduction.start_all_gather(full, mine))
            bufs.append(full)
        self.inflight = (bufs, handles)

    def wait(self) -> list[torch.Tensor]:
        if self.gathered is None:
            self.fetch()
            bufs, handles = self.inflight
            for h in handles:
                h.wait()
            self.gathered, self.inflight = bufs, None
            for i, b in enumerate(bufs):
                self.engine.live[b.untyped_storage().data_ptr()] = (self, i)
        return self.gathered

    def views(self) -> tuple[torch.Tensor, ...]:
        return tuple(v for b, g in zip(self.wait(), self.groups) for v in g.views(b))

    def release(self) -> None:
        if self.gathered is not None:
            for b in self.gathered:
                self.engine.live.pop(b.untyped_storage().data_ptr(), None)
            self.gathered = None

    def drain(self) -> None:
        """Wait for a prefetch that nobody consumed (before the parameters change)."""
        if self.inflight is not None:
            for h in self.inflight[1]:
                h.wait()
            self.inflight = None
        self.release()


class Site:
    """A module whose forward gathers `units` (a block, an embedding, a head, a top's root)."""

    def __init__(self, module: nn.Module, units: list[Unit], save_hooks: bool = True):
        self.module, self.units, self.save_hooks = module, [u for u in units if u.groups], save_hooks
        self.prev: Site | None = None
        self.next: Site | None = None
        # backward needs the parameters again: its forward saved views of them, or it is recomputed
        self.in_backward = not save_hooks
        self.saved = 0  # views of its parameters its last forward saved for backward, not yet unpacked

    def fetch(self) -> None:
        for u in self.units:
            u.fetch()

    def before(self) -> Site | None:
        """The nearest site before this one whose backward needs its parameters (an embedding's
        does not: its gradient needs only the indices), the one to prefetch in backward."""
        site = self.prev
        while site is not None and not site.in_backward:
            site = site.prev
        return site


class _Gather(torch.autograd.Function):
    """Forward: the unit's full parameters (views into gathered buffers). Backward: their
    gradients, reduce-scattered to the owned shards (the full copy is released first)."""

    @staticmethod
    def forward(ctx, anchor, unit):
        ctx.unit = unit
        return unit.views()

    @staticmethod
    def backward(ctx, *grads):
        unit = ctx.unit
        unit.release()  # the parameters are no longer needed: free them before the reduction
        i = 0
        for g in unit.groups:
            unit.engine.reduce_group(g, list(grads[i : i + len(g.slots)]))
            i += len(g.slots)
        return None, None


def blocks_of(module: nn.Module) -> list[nn.Module]:
    """The repeated layers of a model, ZeRO-3's units: its `blocks` (paratrain's GPT and pipeline
    stages), else the longest ModuleList of layers of one type (a Hugging Face model's
    `transformer.h`, a torchvision ResNet's stages are not: pass them yourself)."""
    if hasattr(module, "blocks"):
        return list(module.blocks.values() if isinstance(module.blocks, nn.ModuleDict) else module.blocks)
    best: list[nn.Module] = []
    for m in module.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and len({type(c) for c in m}) == 1:
            best = list(m)
    return best


def root_holders(top: nn.Module, blocks: list[nn.Module], rest: list[nn.Parameter]) -> tuple[list, list]:
    """Split a top's parameters outside its blocks: ([(holder modules, params)] for parameters
    held only by SITE_TYPES modules, grouped by the set of modules holding them; the rest)."""
    inside = {id(m) for b in blocks for m in b.modules()}
    holders: dict[int, list[nn.Module]] = {}
    for m in top.modules():
        if id(m) not in inside:
            for p in m._parameters.values():
                if p is not None:
                    holders.setdefault(id(p), []).append(m)
    by_holders: dict[tuple, tuple[list, list]] = {}
    root = []
    for p in rest:
        ms = holders.get(id(p), [])
        if ms and all(type(m) in SITE_TYPES for m in ms):
            key = tuple(sorted({id(m) for m in ms}))
            by_holders.setdefault(key, ([], []))
            if not by_holders[key][0]:
                by_holders[key][0].extend({id(m): m for m in ms}.values())
            by_holders[key][1].append(p)
        else:
            root.append(p)
    return list(by_holders.values()), root


def _in_backward() -> bool:
    return torch._C._current_autograd_node() is not None


def wrap(engine, site: Site, order: list[Site] | None = None) -> None:
    """Gather the site's units around its module's forward. `order`: the top's sites in the order
    of the first forward (the root site records it and links them after that forward)."""
    inner = site.module.forward
    is_root = order is not None

    def forward(*args, **kwargs):
        if is_root and not engine.linked.get(id(site)):
            engine.recording = order
            order[:] = [site]
        elif engine.recording is not None and site not in engine.recording:
            engine.recording.append(site)
        if not site.units and not is_root:
            return inner(*args, **kwargs)
        grad = torch.is_grad_enabled()
        views = [v for u in site.units for v in (_Gather.apply(u.anchor, u) if grad else u.views())]
        ahead = site.before() if _in_backward() else site.next
        if ahead is not None:
            ahead.fetch()  # overlap the next gather with this site's compute
        slots = [s for u in site.units for g in u.groups for s in g.slots]
        for s, v in zip(slots, views):
            for m, name in s.refs:
                m.__dict__[name] = v
        site.saved = 0
        hooks = torch.autograd.graph.saved_tensors_hooks(partial(_pack, engine, site), partial(_unpack, engine))
        try:
            with hooks if (grad and site.save_hooks and site.units) else nullcontext():
                return inner(*args, **kwargs)
        finally:
            for s in slots:
                for m, name in s.refs:
                    m.__dict__.pop(name, None)
            for u in site.units:
                u.release()
            if is_root and engine.recording is order:
                engine.recording = None
                _link(order)
                engine.linked[id(site)] = True

    site.module.forward = forward


def _link(order: list[Site]) -> None:
    for a, b in zip(order, order[1:]):
        a.next, b.prev = b, a


def _pack(engine, site: Site, t: torch.Tensor):
    """A saved tensor that is a view of a gathered parameter buffer is saved as a recipe, so
    the buffer can be freed after forward and gathered again for backward."""
    hit = engine.live.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
    if hit is None or t.dtype != hit[0].groups[hit[1]].dtype:
        return t
    site.in_backward = True
    site.saved += 1
    return (hit[0], hit[1], site, t.size(), t.stride(), t.storage_offset())


def _unpack(engine, packed):
    if isinstance(packed, torch.Tensor):
        return packed
    unit, index, site, size, stride, offset = packed
    bufs = unit.wait()
    site.saved -= 1
    before = site.before()
    if before is not None and site.saved == 0:
        before.fetch()  # backward runs the sites in reverse: prefetch the one before
    return bufs[index].as_strided(size, stride, offset)
