"""The canonical entries a rank holds, for any model under the data-parallel or ZeRO engine.

Every trainable parameter is saved under its global name in `model/...` (fp32: the master
weights under ZeRO and mixed precision) with Adam's two moments in `optim/exp_avg/...` and
`optim/exp_avg_sq/...`; every persistent buffer (what `module.state_dict()` holds: BatchNorm's
running statistics and counter) and every frozen parameter only in `model/...`. Global names are
the vanilla model's, the same in every layout: the engine's modules are walked with the names of
their pipeline stages stripped (a stage's submodules keep the full model's names), unless the
caller gives them. A tensor held under two names (a head tied to the embedding) is kept once,
under the first, and the other names are aliases.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from paratrain.checkpoint.boxes import Entry, Piece, flat_range_boxes, shifted_pieces, tp_box
from paratrain.parallel.roles import role_of

MOMENTS = ("exp_avg", "exp_avg_sq")


# ------------------------------------------------------------------ global names
def stage_roots(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(prefix, module) pairs whose names, prefixed, are global. Under pipeline parallelism the
    engine wraps a ModuleList of this rank's stage chunks (each with `first` and `last`): a chunk
    keeps the full model's names, except a sequence's stage, whose `blocks` are named as the
    sequence names its layers."""
    from paratrain.parallel.pipeline.partition import SequentialStage

    chunks = list(module) if isinstance(module, nn.ModuleList) else []
    if not chunks or not all(hasattr(c, "first") and hasattr(c, "last") for c in chunks):
        return [("", module)]
    roots: list[tuple[str, nn.Module]] = []
    for chunk in chunks:
        if isinstance(chunk, SequentialStage):
            roots += [(f"{k}.", layer) for k, layer in chunk.blocks.items()]
        else:
            roots.append(("", chunk))
    return roots


def global_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(global prefix, submodule) of every submodule, a shared one under each of its names."""
    for base, root in stage_roots(module):
        for name, m in root.named_modules(remove_duplicate=False):
            yield base + (f"{name}." if name else ""), m


class Held:
    """What this rank's modules hold, each tensor once under its global name: parameters and
    persistent buffers, the module prefixes, and the other names of tied tensors."""

    def __init__(self, module: nn.Module, names: dict[int, str] | None, buffer_names: dict[int, str] | None):
        names, buffer_names = names or {}, buffer_names or {}
        self.params: dict[int, tuple[str, nn.Parameter]] = {}
        self.buffers: dict[int, tuple[str, torch.Tensor]] = {}
        self.prefix: dict[int, str] = {}  # id(module) -> its global prefix (the first one)
        self.aliases: dict[str, str] = {}
        for prefix, m in global_modules(module):
            self.prefix.setdefault(id(m), prefix)
            for attr, p in m._parameters.items():
                if p is not None:
                    self._add(self.params, names, prefix + attr, p)
            for attr, b in m._buffers.items():
                if b is not None and attr not in m._non_persistent_buffers_set:
                    self._add(self.buffers, buffer_names, prefix + attr, b)

    def _add(self, into: dict, given: dict[int, str], local: str, t: torch.Tensor) -> None:
        kept = into.setdefault(id(t), (given.get(id(t), local), t))[0]
        if kept != local:
            self.aliases[local] = kept

    def slot_name(self, slot, param: torch.Tensor | None, names: dict[int, str] | None) -> str:
        """A ZeRO slot's global name: given to the engine, or to us, or from where it sits."""
        if slot.name:
            return slot.name
        if param is not None and names and id(param) in names:
            return names[id(param)]
        module, attr = slot.refs[0]
        return self.prefix.get(id(module), "") + attr

    def slot_aliases(self, engine, names: dict[int, str] | None) -> None:
        """ZeRO-3 took the parameters out of the modules: their tied names come from the slots."""
        for g in getattr(engine, "groups", []):
            for i, s in enumerate(g.slots):
                kept = self.slot_name(s, g.params[i] if engine.stage < 3 else None, names)
                for module, attr in s.refs:
                    local = self.prefix.get(id(module), "") + attr
                    if local != kept:
                        self.aliases[local] = kept

    def state_order(self, engine, names: dict[int, str] | None) -> list[str]:
        """This rank's names, tied ones too, in the order of the vanilla `state_dict()`: module
        by module, its parameters, then its persistent buffers. ZeRO-3's parameters are out of
        the modules: they come where their slots sat, in the order of `names` when given."""
        popped: dict[int, list[str]] = {}
        for g in getattr(engine, "groups", []) if getattr(engine, "stage", 0) == 3 else []:
            for s in g.slots:
                for module, attr in s.refs:
                    popped.setdefault(id(module), []).append(attr)
        position = {n: i for i, n in enumerate((names or {}).values())}
        order: dict[str, None] = {}
        for prefix, m in global_modules(engine.module):
            attrs = [*popped.get(id(m), []), *(a for a, p in m._parameters.items() if p is not None)]
            for attr in sorted(attrs, key=lambda a: position.get(prefix + a, len(position))) if position else attrs:
                order.setdefault(prefix + attr)
            for attr, b in m._buffers.items():
                if b is not None and attr not in m._non_persistent_buffers_set:
                    order.setdefault(prefix + attr)
        return list(order)


def derived_aliases(engine, names: dict[int, str] | None = None) -> dict[str, str]:
    """{tied name: kept name} of what this rank's modules hold."""
    held = Held(engine.module, names, None)
    held.slot_aliases(engine, names)
    return held.aliases


# ------------------------------------------------------------------ entries
def _moments(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    """Adam's state of `param`, created (zeros, step 0) in a fresh optimizer to load into; the
    step as the optimizer keeps it (on the device for fused and capturable kernels)."""
    state = optimizer.state[param]
    if "exp_avg" not in state:
        group = next(g for g in optimizer.param_groups if any(q is param for q in g["params"]))
        on_device = group.get("fused") or group.get("capturable")
        step = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
        state.update(step=step, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
    return state


def _add(entries: list[Entry], name: str, shape, pieces, owner: bool, moments: bool) -> None:
    """The parameter (pieces(None)) and, when optimised, its two Adam moments under the same name."""
    entries.append(Entry(f"model/{name}", shape, pieces(None), owner))
    if moments:
        for m in MOMENTS:
            entries.append(Entry(f"optim/{m}/{name}", shape, pieces(m), owner))


def zero_entries(engine, optimizer, mesh, held: Held, names) -> list[Entry]:
    """ZeRO's flat master shards: per parameter, the boxes of its elements in this rank's shard."""
    tp, tp_rank, dp_rank = mesh.size("tp"), mesh.coord("tp"), mesh.coord("dp")
    optimized = _optimized(optimizer)
    entries: list[Entry] = []
    for g in engine.groups:
        owner = not g.role.pp_duplicate and (tp_rank == 0 or g.role.tp_sharded) and (engine.stage > 0 or dp_rank == 0)
        moments = id(g.master) in optimized
        for i, s in enumerate(g.slots):
            a, b = max(s.offset, g.lo) - s.offset, min(s.offset + s.numel, g.hi) - s.offset
            if a >= b:
                continue
            shape, base = tp_box(tuple(s.shape), s.tp_dim, tp_rank, tp)
            boxes = flat_range_boxes(a, b, tuple(s.shape))
            start = g.lo - s.offset  # flat index (in the parameter) of the shard's element 0

            def pieces(moment, g=g, boxes=boxes, base=base, start=start):
                data = g.master.data if moment is None else _moments(optimizer, g.master)[moment]
                return shifted_pieces(boxes, base, data, start)

            name = held.slot_name(s, g.params[i] if engine.stage < 3 else None, names)
            _add(entries, name, shape, pieces, owner, moments)
    return entries


def _optimized(optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]} if optimizer is not None else set()


def held_entries(engine, optimizer, mesh, held: Held) -> list[Entry]:
    """What the modules hold whole: parameters (with moments when optimised; under ZeRO only the
    frozen ones, the rest are its masters) and persistent buffers. One owner: dp rank 0, tp rank
    0 unless tp-sharded, not the last stage's copy of a tied matrix."""
    from paratrain.parallel.zero import ZeroDataParallel

    zero = isinstance(engine, ZeroDataParallel)
    optimized = set() if zero else _optimized(optimizer)
    first, tp_first = mesh.coord("dp") == 0, mesh.coord("tp") == 0
    entries: list[Entry] = []
    for name, p in held.params.values():
        if zero and p.requires_grad:
            continue  # a view of ZeRO's flat buffer: saved from the master shards
        role = role_of(p)
        owner = first and not role.pp_duplicate and (tp_first or role.tp_sharded)
        shape, base = tp_box(tuple(p.shape), role.tp_dim, mesh.coord("tp"), mesh.size("tp"))

        def pieces(moment, p=p, base=base):
            return [Piece(base, p.data if moment is None else _moments(optimizer, p)[moment])]

        _add(entries, name, shape, pieces, owner, id(p) in optimized)
    for name, b in held.buffers.values():  # replicated over tp
        entries.append(Entry(f"model/{name}", tuple(b.shape), [Piece((0,) * b.dim(), b)], first and tp_first))
    return entries


def checkpoint_entries(engine, optimizer: torch.optim.Optimizer | None, mesh, names: dict[int, str] | None,
                       buffer_names: dict[int, str] | None = None) -> list[Entry]:
    """Every canonical entry this rank holds (without `optimizer`: the model alone)."""
    from paratrain.parallel.zero import ZeroDataParallel

    held = Held(engine.module, names, buffer_names)
    entries = zero_entries(engine, optimizer, mesh, held, names) if isinstance(engine, ZeroDataParallel) else []
    return entries + held_entries(engine, optimizer, mesh, held)


# ------------------------------------------------------------------ the whole model on one rank
@torch.no_grad()
def full_state_dict(engine, mesh, names: dict[int, str] | None = None, *, buffer_names: dict[int, str] | None = None,
                    aliases: dict[str, str] | None = None, group=None) -> dict[str, torch.Tensor] | None:
    """The consolidated model as the vanilla model's `state_dict()` holds it, under the same
    keys: parameters (fp32 masters under ZeRO), persistent buffers, frozen parameters, and every
    tied name (the same tensor under each, as `state_dict()` has it). Gathered from every rank's
    owned pieces on global rank 0 (one `gather_object` over `group`, default the world); None
    elsewhere."""
    mine = [(e.key[len("model/"):], e.shape, [(p.offset, p.tensor.detach().cpu().clone()) for p in e.pieces])
            for e in checkpoint_entries(engine, None, mesh, names, buffer_names) if e.owner and e.pieces]
    held = Held(engine.module, names, buffer_names)
    held.slot_aliases(engine, names)
    local_aliases = held.aliases if aliases is None else dict(aliases)
    rank = dist.get_rank()
    gathered = [None] * dist.get_world_size(group) if rank == 0 else None
    dist.gather_object((mine, local_aliases, held.state_order(engine, names)), gathered, dst=0, group=group)
    if rank != 0:
        return None
    kept = assemble([p for pieces, _, _ in gathered for p in pieces])
    tied = {a: k for _, their, _ in gathered for a, k in their.items() if k in kept}
    order = dict.fromkeys([n for _, _, names_of_rank in gathered for n in names_of_rank] + list(kept) + list(tied))
    return {n: kept[n] if n in kept else kept[tied[n]] for n in order if n in kept or n in tied}


def assemble(pieces: list[tuple[str, tuple, list]]) -> dict[str, torch.Tensor]:
    """Whole tensors from (name, global shape, [(offset, tensor)]) pieces that tile them."""
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    for name, shape, boxes in pieces:
        full = out.setdefault(name, torch.empty(shape, dtype=boxes[0][1].dtype))
        for offset, t in boxes:
            full[tuple(slice(o, o + n) for o, n in zip(offset, t.shape))] = t
            filled[name] = filled.get(name, 0) + t.numel()
    short = [n for n, t in out.items() if filled[n] != t.numel()]
    if short:
        raise RuntimeError(f"full_state_dict: {short[0]} was not covered exactly once by the ranks' pieces")
    return out
