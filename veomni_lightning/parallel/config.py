"""``ParallelConfig``: the one description of how a model is spread over devices and run.

Both strategies (``VeOmniStrategy`` for the Trainer, ``VeOmniFabricStrategy`` for Fabric) take one of these as their
``parallel`` argument, so a yaml sets it in one block::

    strategy:
      class_path: veomni_lightning.strategies.VeOmniStrategy
      init_args:
        parallel: {sp_size: 2, activation_checkpointing: true, compile_blocks: true}

It holds the mesh sizes (turned into :class:`~veomni_lightning.parallel.dims.ParallelDims` once the world size is
known) and the per-block options that :func:`~veomni_lightning.parallel.fsdp.parallelize_model` applies in one
fixed order: activation checkpointing, ``torch.compile``, FSDP2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from .dims import ParallelDims, ParallelLayoutError

__all__ = ["ParallelConfig", "DTypeName"]

DTypeName = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Mesh sizes and per-block options (keyword-only; every field has a default).

    Attributes:
        dp_replicate_size: HSDP replica groups (parameters sharded within a group, replicated across groups).
        dp_shard_size: ranks that shard the parameters per replica; ``-1`` infers it from the world size.
        sp_size: Ulysses sequence-parallel degree (heads it does not divide are zero-padded, at some cost).
        ep_size: expert-parallel degree: MoE experts are split over this many ranks inside dp_shard × sp (it must
            divide dp_shard × sp and the model's number of experts).
        param_dtype: compute dtype of the all-gathered weights (master weights stay fp32).
        reduce_dtype: dtype of the gradient reduce-scatter.
        reshard_after_forward: free a block's gathered weights after its forward (ZeRO-3) or keep them until
            backward (more memory, less communication).
        activation_checkpointing: recompute blocks in backward (non-reentrant).
        checkpoint_policy: with checkpointing on, what a block recomputes: ``full`` (its whole forward) or
            ``selective`` (keep matmul and attention outputs, recompute the elementwise ops; see
            ``parallel/checkpointing.py``).
        checkpoint_fraction: with checkpointing on, the share of blocks that recompute (evenly spread); each block
            left out trades its activations' memory for one forward less.
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory (GPU training only).
        compile_blocks: ``torch.compile`` every block (fuses norms, RoPE, SwiGLU, residual adds; attention eager).
        activation_memory_budget: with ``compile_blocks``, the share (0–1] of a compiled graph's activations its
            partitioner may keep for backward; below 1 it recomputes the cheapest ops (by its FLOP estimate) until
            the saved activations fit: checkpointing chosen by the compiler inside each block, with no extra forward.
            Process-wide (``torch._functorch.config``); ``None`` leaves torch's default (1.0).
    """

    dp_replicate_size: int = 1
    dp_shard_size: int = -1
    sp_size: int = 1
    ep_size: int = 1
    param_dtype: DTypeName = "bf16"
    reduce_dtype: DTypeName = "fp32"
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    checkpoint_policy: Literal["full", "selective"] = "full"
    checkpoint_fraction: float = 1.0
    cpu_offload: bool = False
    compile_blocks: bool = False
    activation_memory_budget: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.checkpoint_fraction <= 1.0:
            raise ValueError(
                f"checkpoint_fraction must be in (0, 1], got {self.checkpoint_fraction}; to turn checkpointing off set "
                "activation_checkpointing=false."
            )
        if self.activation_memory_budget is not None:
            if not 0.0 <= self.activation_memory_budget <= 1.0:
                raise ValueError(f"activation_memory_budget must be in [0, 1], got {self.activation_memory_budget}.")
            if not self.compile_blocks:
                raise ValueError("activation_memory_budget applies to compiled blocks: set compile_blocks=true too.")
        if self.checkpoint_policy not in ("full", "selective"):
            raise ValueError(f"checkpoint_policy must be 'full' or 'selective', got {self.checkpoint_policy!r}")
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")
        for name in ("dp_replicate_size", "sp_size", "ep_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParallelLayoutError(f"{name} must be a positive integer, got {value!r}.")

    def dims(self, world_size: int) -> ParallelDims:
        """The validated sizes for ``world_size`` processes (raises :class:`ParallelLayoutError` with the fix)."""
        return ParallelDims(
            world_size=world_size,
            dp_replicate=self.dp_replicate_size,
            dp_shard=self.dp_shard_size,
            sp=self.sp_size,
            ep=self.ep_size,
        )

    def mixed_precision(self) -> MixedPrecisionPolicy:
        """FSDP2's policy: gathered weights in ``param_dtype``, gradients reduced in ``reduce_dtype``."""
        return MixedPrecisionPolicy(param_dtype=_DTYPES[self.param_dtype], reduce_dtype=_DTYPES[self.reduce_dtype])
