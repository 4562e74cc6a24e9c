"""``VeOmniFabricStrategy``: the same FSDP2 × Ulysses-SP mesh for Lightning Fabric custom loops."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import ModelParallelStrategy
from torch import nn
from typing_extensions import override

from veomni_lightning.parallel import ParallelConfig, ParallelMesh

from .mesh_mixin import ParallelMeshMixin

__all__ = ["VeOmniFabricStrategy"]


def _setup_module(module: nn.Module, mesh: ParallelMesh, config: ParallelConfig) -> nn.Module:
    """Default parallelize step: the module's own ``setup_model(parallel_mesh, parallel_config)``."""
    if not hasattr(module, "setup_model"):
        raise TypeError(
            f"{type(module).__name__} has no setup_model(parallel_mesh, parallel_config) method; pass parallelize_fn "
            "to VeOmniFabricStrategy or set up a veomni_lightning module (e.g. CausalLMModule)."
        )
    module.setup_model(mesh, config)
    return module


class VeOmniFabricStrategy(ParallelMeshMixin, ModelParallelStrategy):
    """Fabric strategy building the same mesh as :class:`~veomni_lightning.strategies.VeOmniStrategy`.

    ``fabric.setup(module)`` calls ``parallelize_fn(module, parallel_mesh, parallel_config)``; by default that is the
    module's own ``setup_model``, so any veomni_lightning module works unchanged in a custom loop.

    Args:
        parallel: mesh sizes and per-block options (:class:`~veomni_lightning.parallel.ParallelConfig`).
        save_distributed_checkpoint, process_group_backend, timeout: as for ``VeOmniStrategy``.
        parallelize_fn: replaces the default ``module.setup_model`` call.
    """

    def __init__(
        self,
        *,
        parallel: ParallelConfig | None = None,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        parallelize_fn: Callable[[nn.Module, ParallelMesh, ParallelConfig], nn.Module] | None = None,
    ) -> None:
        setup = parallelize_fn or _setup_module

        def parallelize(module: nn.Module, _device_mesh: Any) -> nn.Module:
            return setup(module, self.parallel_mesh, self.parallel_config)

        super().__init__(
            parallelize_fn=parallelize,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._set_parallel_config(parallel)

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
        self._write_checkpoint_atomically(
            path, lambda tmp: super(VeOmniFabricStrategy, self).save_checkpoint(tmp, state, storage_options, filter)
        )
