"""What the Trainer and Fabric strategies share: the parallel config, the mesh, dp-keyed samplers, atomic saves."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from veomni_lightning.parallel import ParallelConfig, ParallelDims, ParallelMesh

from .checkpoint_io import write_atomically

__all__ = ["ParallelMeshMixin"]


class ParallelMeshMixin:
    """Mixed into Lightning's ModelParallelStrategy (Trainer and Fabric flavours) to build our mesh instead of its TP one.

    Subclasses take ``parallel: ParallelConfig`` as a keyword argument (LightningCLI reads the signature) and store
    it with :meth:`_set_parallel_config`; ``setup_environment`` calls :meth:`_validated_dims` before the process group
    exists and :meth:`_build_mesh` after.
    """

    def _set_parallel_config(self, parallel: ParallelConfig | None) -> None:
        if parallel is not None and not isinstance(parallel, ParallelConfig):
            raise TypeError(
                f"parallel must be a ParallelConfig, got {type(parallel).__name__}. Fix: "
                "VeOmniStrategy(parallel=ParallelConfig(sp_size=2, ...)), or in yaml `parallel: {sp_size: 2}`."
            )
        self.parallel_config = parallel or ParallelConfig()
        self._parallel_mesh: ParallelMesh | None = None

    @property
    def parallel_mesh(self) -> ParallelMesh:
        """The mesh with its named sub-meshes; available once the processes are set up."""
        if self._parallel_mesh is None:
            raise RuntimeError("The parallel mesh is built when the strategy sets up its processes; not yet.")
        return self._parallel_mesh

    def _validated_dims(self) -> ParallelDims:
        """Check the layout against the world size on every rank, before any process group or collective exists."""
        return self.parallel_config.dims(self.num_nodes * self.num_processes)

    def _build_mesh(self, dims: ParallelDims) -> None:
        self._parallel_mesh = dims.build_mesh(self.root_device.type)
        self._device_mesh = self._parallel_mesh.mesh
        if self.root_device.type == "cuda":
            use_expandable_segments()

    def _write_checkpoint_atomically(self, path: Any, write: Callable[[Path], None]) -> None:
        """Every rank writes into a temporary folder; it replaces ``path`` only if every rank succeeded."""
        write_atomically(
            Path(self.broadcast(str(path))),
            write,
            rank=self.global_rank,
            all_ok=lambda ok: self.reduce_boolean_decision(ok, all=True),
        )

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
