"""``VeOmniFabricStrategy``: the same FSDP2 × Ulysses-SP mesh for Lightning Fabric custom loops."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import ModelParallelStrategy
from torch import nn
from typing_extensions import override

from veomni_lightning.parallel.dims import ParallelMesh
from veomni_lightning.parallel.fsdp import DTypeName, FSDPConfig

from .checkpoint_io import write_atomically
from .mesh_mixin import ParallelMeshMixin

__all__ = ["VeOmniFabricStrategy"]


def _call_module_parallelize(module: nn.Module, strategy: VeOmniFabricStrategy) -> nn.Module:
    """Default parallelize step: the module's own ``parallelize(parallel_mesh, fsdp_config)`` method."""
    if not hasattr(module, "parallelize"):
        raise TypeError(
            f"{type(module).__name__} has no parallelize(parallel_mesh, fsdp_config) method; pass parallelize_fn to "
            "VeOmniFabricStrategy or set up a veomni_lightning module (e.g. CausalLMModule)."
        )
    module.parallelize(strategy.parallel_mesh, strategy.fsdp_config)
    return module


class VeOmniFabricStrategy(ParallelMeshMixin, ModelParallelStrategy):
    """Fabric strategy building the same mesh as :class:`~veomni_lightning.strategies.VeOmniStrategy`.

    ``fabric.setup(module)`` calls ``parallelize_fn(module, parallel_mesh, fsdp_config)``; by default that is the
    module's own ``parallelize`` method, so a ``CausalLMModule`` works unchanged in a custom loop.
    Arguments are those of ``VeOmniStrategy``.
    """

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
        parallelize_fn: Callable[[nn.Module, ParallelMesh, FSDPConfig], nn.Module] | None = None,
    ) -> None:
        user_fn = parallelize_fn

        def parallelize(module: nn.Module, _device_mesh: Any) -> nn.Module:
            if user_fn is not None:
                return user_fn(module, self.parallel_mesh, self.fsdp_config)
            return _call_module_parallelize(module, self)

        super().__init__(
            parallelize_fn=parallelize,
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
        # ParallelStrategy's setup (device selection); ModelParallelStrategy's own would build its 2-D TP mesh.
        super(ModelParallelStrategy, self).setup_environment()
        dims = self._validated_dims()
        self._setup_distributed()
        self._build_mesh(dims)

    @override
    def save_checkpoint(
        self,
        path: Any,
        state: dict[str, Any],
        storage_options: Any | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
    ) -> None:
        target = Path(self.broadcast(str(path)))
        write_atomically(
            target,
            lambda tmp: super(VeOmniFabricStrategy, self).save_checkpoint(tmp, state, storage_options, filter),
            rank=self.global_rank,
            barrier=self.barrier,
        )
