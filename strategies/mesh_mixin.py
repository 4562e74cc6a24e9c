"""What the Trainer and Fabric strategies share: parallel sizes, FSDP options, the mesh and dp-keyed samplers."""

from __future__ import annotations

import os
from typing import Any

import torch

from veomni_lightning.parallel.dims import ParallelDims, ParallelMesh
from veomni_lightning.parallel.fsdp import DTypeName, FSDPConfig

__all__ = ["ParallelMeshMixin"]


class ParallelMeshMixin:
    """Mixed into Lightning's ModelParallelStrategy (Trainer and Fabric flavours) to build our mesh instead of its TP one.

    Subclasses keep their own explicit ``__init__`` arguments (LightningCLI reads the signature) and pass them to
    :meth:`_init_parallel`; ``setup_environment`` calls :meth:`_validated_dims` before the process group exists and
    :meth:`_build_mesh` after.
    """

    def _init_parallel(
        self,
        dp_replicate_size: int,
        sp_size: int,
        ep_size: int,
        param_dtype: DTypeName,
        reduce_dtype: DTypeName,
        reshard_after_forward: bool,
        activation_checkpointing: bool,
        cpu_offload: bool,
        checkpoint_fraction: float = 1.0,
    ) -> None:
        self.dp_replicate_size = dp_replicate_size
        self.sp_size = sp_size
        self.ep_size = ep_size
        self.fsdp_config = FSDPConfig(
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            reshard_after_forward=reshard_after_forward,
            activation_checkpointing=activation_checkpointing,
            checkpoint_fraction=checkpoint_fraction,
            cpu_offload=cpu_offload,
        )
        self._parallel_mesh: ParallelMesh | None = None

    @property
    def parallel_mesh(self) -> ParallelMesh:
        """The mesh with its named sub-meshes; available once the processes are set up."""
        if self._parallel_mesh is None:
            raise RuntimeError("The parallel mesh is built when the strategy sets up its processes; not yet.")
        return self._parallel_mesh

    def _validated_dims(self) -> ParallelDims:
        """Check the layout against the world size on every rank, before any process group or collective exists."""
        return ParallelDims(
            world_size=self.num_nodes * self.num_processes,
            dp_replicate=self.dp_replicate_size,
            sp=self.sp_size,
            ep=self.ep_size,
        )

    def _build_mesh(self, dims: ParallelDims) -> None:
        self._parallel_mesh = dims.build_mesh(self.root_device.type)
        self._device_mesh = self._parallel_mesh.mesh
        if self.root_device.type == "cuda":
            use_expandable_segments()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Samplers are keyed on the data-parallel rank: the ranks of one SP group read the same samples."""
        return {"num_replicas": self.parallel_mesh.dp_size, "rank": self.parallel_mesh.dp_rank}


def use_expandable_segments() -> bool:
    """Switch PyTorch's CUDA caching allocator to expandable segments, unless the user configured the allocator.

    FSDP2 frees and re-allocates gathered weights and activations of changing sizes every block; with fixed-size
    segments the freed blocks fragment and the reserved memory grows past the allocated peak, which turns a step
    that fits into an out-of-memory error. Runs before the model is built, so every block comes from the new kind of
    segment. Returns whether the setting was applied.
    """
    if any(os.environ.get(name) for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        return False
    setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is None:
        return False
    setter("expandable_segments:True")
    return True
