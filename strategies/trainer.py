"""``VeOmniStrategy``: Lightning's ModelParallelStrategy with one FSDP2 × Ulysses-SP (× EP) device mesh."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

from veomni_lightning.parallel.fsdp import DTypeName

from .checkpoint_io import write_atomically
from .mesh_mixin import ParallelMeshMixin

__all__ = ["VeOmniStrategy"]


class VeOmniStrategy(ParallelMeshMixin, ModelParallelStrategy):
    """Trainer strategy that builds the FSDP2 × Ulysses-SP mesh and hands it, with the FSDP options, to the module.

    The LightningModule applies the parallelism in ``configure_model`` by reading :attr:`parallel_mesh` and
    :attr:`fsdp_config` (the strategy knows no particular module). Data loaders are keyed on the data-parallel rank,
    so the ranks of one SP group see the same samples. Checkpoints are sharded DCP folders (or one file with
    ``save_distributed_checkpoint=False``), written atomically.

    Args:
        dp_replicate_size: HSDP replica groups (parameters are sharded within a group, replicated across groups).
        sp_size: Ulysses sequence-parallel degree (heads it does not divide are zero-padded, at some cost).
        ep_size: expert-parallel degree (reserved for MoE; must divide dp_shard × sp).
        param_dtype: compute dtype of gathered weights; master weights stay fp32.
        reduce_dtype: gradient reduction dtype.
        reshard_after_forward: ZeRO-3 (True) or keep gathered weights until backward (False).
        activation_checkpointing: recompute transformer blocks in backward.
        checkpoint_fraction: share of the blocks that recompute when checkpointing is on (evenly spread).
        cpu_offload: keep sharded parameters and optimizer state on the CPU.
        save_distributed_checkpoint: one shard per rank (True) or a single full file (False).
        process_group_backend: ``nccl`` / ``gloo``; default chosen from the device.
    """

    strategy_name = "veomni"

    def __init__(
        self,
        dp_replicate_size: int = 1,
        sp_size: int = 1,
        ep_size: int = 1,
        param_dtype: DTypeName = "bf16",
        reduce_dtype: DTypeName = "fp32",
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        checkpoint_fraction: float = 1.0,
        cpu_offload: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._init_parallel(
            dp_replicate_size,
            sp_size,
            ep_size,
            param_dtype,
            reduce_dtype,
            reshard_after_forward,
            activation_checkpointing,
            cpu_offload,
            checkpoint_fraction,
        )

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
    def model_to_device(self) -> None:
        # configure_model already put every shard where FSDP2 wants it; with CPU offload that is CPU memory, and
        # Lightning's blanket ``model.to(root_device)`` would move the root's shards to the GPU and break offloading.
        if not self.fsdp_config.cpu_offload:
            super().model_to_device()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        write_atomically(
            path,
            lambda tmp: super(VeOmniStrategy, self).save_checkpoint(checkpoint, tmp, storage_options),
            rank=self.global_rank,
            barrier=self.barrier,
        )
