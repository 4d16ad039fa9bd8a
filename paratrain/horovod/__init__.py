"""`import paratrain.horovod as hvd`: Horovod's PyTorch API (0.28.1) on paratrain's engine, so
that Horovod scripts run unchanged (Sergeev and Del Balso 2018, "Horovod: fast and easy
distributed deep learning in TensorFlow").

basics.py: init, sizes and ranks, process sets; ops.py (engine.py, negotiation.py, adasum.py):
the collectives; functions.py: object collectives; compression.py: Compression.none / fp16;
optimizer.py: DistributedOptimizer, broadcast_parameters, broadcast_optimizer_state,
SyncBatchNorm.

Where this differs from Horovod: every rank of a process set must issue its collectives in the
same order (Horovod matches them by name; here a mismatch raises on every rank, see
negotiation.py); process sets need no "dynamic" mode; mpi4py communicators and sparse allreduce are not
supported (DistributedOptimizer reduces sparse gradients as dense ones); timeline.py writes
Horovod's timeline as a Chrome trace.
"""

from paratrain.horovod.basics import (
    HorovodInternalError, HostsUpdatedInterrupt, ProcessSet, add_process_set, ccl_built, cross_rank, cross_size,
    cuda_built, ddl_built, global_process_set, gloo_built, gloo_enabled, init, is_homogeneous, is_initialized,
    local_rank, local_size, mpi_built, mpi_enabled, mpi_threads_supported, nccl_built, rank, remove_process_set,
    rocm_built, shutdown, size,
)
from paratrain.horovod.compression import Compression
from paratrain.horovod.functions import allgather_object, broadcast_object
from paratrain.horovod.ops import (
    Adasum, Average, Max, Min, Product, Sum, allgather, allgather_async, allreduce, allreduce_, allreduce_async,
    allreduce_async_, alltoall, alltoall_async, barrier, broadcast, broadcast_, broadcast_async, broadcast_async_,
    grouped_allgather, grouped_allgather_async, grouped_allreduce, grouped_allreduce_, grouped_allreduce_async,
    grouped_allreduce_async_, grouped_reducescatter, grouped_reducescatter_async, join, poll, reducescatter,
    reducescatter_async, synchronize,
)
from paratrain.horovod.timeline import start_timeline, stop_timeline
from paratrain.horovod.optimizer import (
    DistributedOptimizer, SyncBatchNorm, broadcast_optimizer_state, broadcast_parameters,
)

from paratrain.horovod import elastic  # noqa: E402  hvd.elastic.State / TorchState / run, on paratrain's restarts

__all__ = [
    "Adasum", "Average", "Compression", "DistributedOptimizer", "HorovodInternalError", "HostsUpdatedInterrupt",
    "Max", "Min", "ProcessSet", "Product", "Sum", "SyncBatchNorm", "add_process_set", "allgather", "allgather_async",
    "allgather_object", "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "alltoall",
    "alltoall_async", "barrier", "elastic", "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "broadcast_object",
    "broadcast_optimizer_state", "broadcast_parameters", "ccl_built", "cross_rank", "cross_size", "cuda_built",
    "ddl_built", "global_process_set", "gloo_built", "gloo_enabled", "grouped_allgather", "grouped_allgather_async",
    "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_",
    "grouped_reducescatter", "grouped_reducescatter_async", "init", "is_homogeneous", "is_initialized", "join",
    "local_rank", "local_size", "mpi_built", "mpi_enabled", "mpi_threads_supported", "nccl_built", "poll", "rank",
    "reducescatter", "reducescatter_async", "remove_process_set", "rocm_built", "shutdown", "size", "start_timeline",
    "stop_timeline", "synchronize",
]
