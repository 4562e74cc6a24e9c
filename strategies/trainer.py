"""``VeOmniStrategy``: Lightning's ModelParallelStrategy with one FSDP2 × Ulysses-SP (× EP) device mesh."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

from veomni_lightning.parallel import ParallelConfig

from .mesh_mixin import ParallelMeshMixin

__all__ = ["VeOmniStrategy"]


class VeOmniStrategy(ParallelMeshMixin, ModelParallelStrategy):
    """Trainer strategy that builds the FSDP2 × Ulysses-SP mesh and hands it, with the parallel config, to the module.

    The LightningModule applies the parallelism in ``configure_model`` by reading :attr:`parallel_mesh` and
    :attr:`parallel_config` (the strategy knows no particular module). Data loaders are keyed on the data-parallel
    rank, so the ranks of one SP group see the same samples. Checkpoints are sharded DCP folders (or one file with
    ``save_distributed_checkpoint=False``), written atomically.

    Args:
        parallel: mesh sizes and per-block options (:class:`~veomni_lightning.parallel.ParallelConfig`).
        save_distributed_checkpoint: one shard per rank (True) or a single full file (False).
        process_group_backend: ``nccl`` / ``gloo``; default chosen from the device.
        timeout: collective timeout.
    """

    strategy_name = "veomni"

    def __init__(
        self,
        *,
        parallel: ParallelConfig | None = None,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._set_parallel_config(parallel)

    @override
    def setup_environment(self) -> None:
        self.set_world_ranks()
        # Validate the layout on every rank before any process group or collective exists.
        dims = self._validated_dims()
        self._setup_distributed()
        self._build_mesh(dims)
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @override
    def _configure_launcher(self) -> None:
        # One process needs no launcher; without one the strategy also runs in notebooks and interactive shells
        # (Lightning refuses a subprocess launcher there, even for a single device).
        if self.num_processes * self.num_nodes > 1:
            super()._configure_launcher()

    @override
    def model_to_device(self) -> None:
        # configure_model already put every shard where FSDP2 wants it; with CPU offload that is CPU memory, and
        # Lightning's blanket ``model.to(root_device)`` would move the root's shards to the GPU and break offloading.
        if not self.parallel_config.cpu_offload:
            super().model_to_device()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        self._write_checkpoint_atomically(
            filepath, lambda tmp: super(VeOmniStrategy, self).save_checkpoint(checkpoint, tmp, storage_options)
        )
