"""Boxes of global tensors: what one rank holds of a canonical tensor, as DCP's planners take it.

A tensor-parallel shard is one box (rows for column-parallel and vocabulary-parallel weights,
columns for row-parallel ones); a ZeRO flat shard cuts a parameter of any shape into a few
boxes that are contiguous in row-major order (`flat_range_boxes`). `Boxes` offers a rank's boxes
of one tensor to DCP in the protocol DTensor implements, so each rank writes what it owns and
reads, for any other layout, the overlapping regions it needs.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@contextmanager
def quiet():
    """DCP's planners warn about features we do not use (ShardedTensor deprecation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


@dataclass
class Piece:
    offset: tuple[int, ...]  # in the global tensor
    tensor: torch.Tensor  # a view of this rank's storage, shaped like the box


@dataclass
class Entry:
    key: str
    shape: tuple[int, ...]  # global
    pieces: list[Piece]
    owner: bool  # this rank writes its pieces (one owner per box over the world)


Box = tuple[tuple[int, ...], tuple[int, ...], int, int]  # (offset, size, first flat index, end flat index)


def flat_range_boxes(a: int, b: int, shape: tuple[int, ...]) -> list[Box]:
    """Elements [a, b) of a row-major tensor of `shape` as boxes, each contiguous in flat order:
    a partial leading row, the whole rows, a partial trailing row, the partial rows cut the same
    way one dimension down; at most 2 (ndim - 1) + 1 boxes."""
    if a >= b:
        return []
    if len(shape) <= 1:
        return [((a,) * len(shape), (b - a,) * len(shape), a, b)]
    row = math.prod(shape[1:])
    if row == 0:
        return []
    rest = tuple(shape[1:])

    def in_row(r: int, lo: int, hi: int) -> list[Box]:
        """Elements [lo, hi) of row r, as boxes of the whole tensor."""
        return [((r, *off), (1, *size), r * row + s, r * row + e) for off, size, s, e in flat_range_boxes(lo, hi, rest)]

    r0, c0 = divmod(a, row)
    if c0 or b - a < row:  # starts inside a row, or ends before the row is full
        end = min(b, (r0 + 1) * row)
        return in_row(r0, c0, end - r0 * row) + flat_range_boxes(end, b, shape)
    r1 = b // row
    boxes = [((r0, *(0,) * len(rest)), (r1 - r0, *rest), r0 * row, r1 * row)]
    return boxes + (in_row(r1, 0, b - r1 * row) if b > r1 * row else [])


def tp_box(local_shape: tuple[int, ...], tp_dim: int | None, tp_rank: int, tp: int):
    """(global shape, offset of this rank's tensor-parallel shard) of a parameter."""
    if tp_dim is None:
        return tuple(local_shape), (0,) * len(local_shape)
    shape = list(local_shape)
    shape[tp_dim] *= tp
    offset = [0] * len(local_shape)
    offset[tp_dim] = tp_rank * local_shape[tp_dim]
    return tuple(shape), tuple(offset)


def shifted_pieces(boxes: list[Box], base: tuple[int, ...], data: torch.Tensor, start: int) -> list[Piece]:
    """Pieces from flat boxes of a local tensor whose flat element `start` is data[0]."""
    return [Piece(tuple(o + b for o, b in zip(off, base)), data[lo - start : hi - start].view(size))
            for off, size, lo, hi in boxes]


class Boxes:
    """A rank's boxes of one global tensor, in the form DCP's planners ask of a checkpointable
    object (the protocol DTensor implements): the chunks it writes or wants, and the tensor of
    each. Unlike a DTensor, the boxes may be any regions, several per rank, and replicas may
    overlap when loading; DCP's planner matches them against the saved chunks."""

    def __init__(self, shape: tuple[int, ...], pieces: list[Piece]):
        self.shape, self.pieces = torch.Size(shape), pieces
        self.by_offset = {tuple(p.offset): p.tensor for p in pieces}

    def __create_write_items__(self, fqn: str, obj) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        return [WriteItem(index=MetadataIndex(fqn, torch.Size(p.offset)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(p.offset), sizes=p.tensor.shape),
                              properties=TensorProperties.create_from_tensor(p.tensor), size=self.shape))
                for p in self.pieces]

    def __create_chunk_list__(self) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=torch.Size(p.offset), sizes=p.tensor.shape) for p in self.pieces]

    def __get_tensor_shard__(self, index) -> torch.Tensor:
        return self.by_offset[tuple(index.offset)]


def boxes_state(entries: list[Entry], saving: bool) -> dict:
    """{key: Boxes}: for saving, the boxes this rank owns; for loading, all it holds."""
    return {e.key: Boxes(e.shape, e.pieces) for e in entries if e.pieces and (e.owner or not saving)}


def planners(cache_as: str | None = None):
    """DCP's default planners, taught to find a `Boxes` piece by its offset. `cache_as`: the save
    planner keeps its plans under that name between saves of the same boxes (DCP's plan caching:
    the planning collectives are skipped once the plans are known)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner

    class SavePlanner(DefaultSavePlanner):
        def __init__(self):
            super().__init__(enable_plan_caching=cache_as is not None)
            self._cached_plans_key = cache_as or type(self).__name__

        def lookup_object(self, index):
            obj = self.state_dict[index.fqn]
            return obj.__get_tensor_shard__(index) if isinstance(obj, Boxes) else super().lookup_object(index)

    class LoadPlanner(DefaultLoadPlanner):
        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            boxes = {k: v for k, v in state_dict.items() if isinstance(v, Boxes)}
            super().set_up_planner(state_dict, metadata, is_coordinator)  # it resets unknown leaves
            state_dict.update(boxes)
            self.state_dict.update(boxes)

        def lookup_tensor(self, index):
            obj = self.state_dict[index.fqn]
            return obj.__get_tensor_shard__(index) if isinstance(obj, Boxes) else super().lookup_tensor(index)

    return SavePlanner(), LoadPlanner()
