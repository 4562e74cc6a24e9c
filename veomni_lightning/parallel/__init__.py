"""The parallel core: one mesh with named views, Ulysses primitives and attention, FSDP2 application, reductions.

It knows no Lightning and no model library: model adapters (``veomni_lightning.models``) hand it blocks and functions.
"""

from .config import DTypeName, ParallelConfig
from .dims import ParallelDims, ParallelLayoutError, ParallelMesh
from .fsdp import parallelize_model
from .reductions import all_reduce_sum, clip_grad_norm
from .sequence import shard_packed_batch

__all__ = [
    "DTypeName",
    "ParallelConfig",
    "ParallelDims",
    "ParallelLayoutError",
    "ParallelMesh",
    "all_reduce_sum",
    "clip_grad_norm",
    "parallelize_model",
    "shard_packed_batch",
]
