"""``VeOmniStrategy``: Lightning's ModelParallelStrategy with one FSDP2 × Ulysses-SP (× EP) device mesh."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

from veomni_lightning.parallel import ParallelConfig

from .checkpoint_io import load_trainable_checkpoint
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

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        names = self._trainable_only_names()
        return state if names is None else {k: v for k, v in state.items() if k in names}

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        names = self._trainable_only_names()
        path = Path(self.broadcast(checkpoint_path))
        if names is None or not path.is_dir():  # a full-file checkpoint: the module's strict_loading decides
            return super().load_checkpoint(path, weights_only)
        return load_trainable_checkpoint(path, self.model, self.optimizers, names, weights_only)

    def _trainable_only_names(self) -> set[str] | None:
        """The parameter names a trainable-only checkpoint holds, or None when the module saves everything."""
        if not getattr(self.lightning_module, "checkpoints_trainable_only", False):
            return None
        return {name for name, param in self.model.named_parameters() if param.requires_grad}
