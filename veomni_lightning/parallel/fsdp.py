"""FSDP2 and activation checkpointing, applied by short explicit functions in a fixed order.

Order (see :func:`parallelize_model`): activation checkpointing → ``fully_shard`` per transformer block → ``fully_shard``
on the root → gradient reduction set to *sum*.

Why sum: the ranks of one SP group hold different tokens of the same samples, and the loss each rank back-propagates is
already normalised by the token count of the whole global batch. The gradient of the global token mean is therefore
the plain sum of the ranks' gradients, while FSDP2 by default averages over its mesh (dp_shard × sp, × dp_replicate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

__all__ = ["FSDPConfig", "find_transformer_blocks", "apply_activation_checkpointing", "apply_fsdp", "parallelize_model"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTypeName = Literal["fp32", "bf16", "fp16"]


@dataclass
class FSDPConfig:
    """FSDP2 and checkpointing options, set from the strategy's constructor (and so from a yaml).

    Attributes:
        param_dtype: compute dtype of the all-gathered weights (master weights stay fp32).
        reduce_dtype: dtype of the gradient reduce-scatter.
        reshard_after_forward: free the gathered weights of a block after its forward (ZeRO-3) or keep them until
            backward (ZeRO-2 style, more memory, less communication).
        activation_checkpointing: recompute each block in backward (non-reentrant).
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory.
    """

    param_dtype: DTypeName = "bf16"
    reduce_dtype: DTypeName = "fp32"
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")

    def mixed_precision(self) -> MixedPrecisionPolicy:
        return MixedPrecisionPolicy(param_dtype=_DTYPES[self.param_dtype], reduce_dtype=_DTYPES[self.reduce_dtype])


def find_transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an HF model, found through the model's own ``_no_split_modules`` class names.

    Every transformers model declares which module classes must not be split across devices; for decoders those are
    the decoder layers, which is exactly the unit FSDP should shard and checkpointing should recompute.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} declares no _no_split_modules, so its transformer blocks cannot be found. "
            "Pass the blocks explicitly."
        )
    # A block class may nest another listed class (rare); shard only the outermost.
    inner = {id(c) for b in blocks for c in b.modules() if c is not b}
    return [b for b in blocks if id(b) not in inner]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in backward, through transformers' own non-reentrant checkpointing.

    Using the model's ``gradient_checkpointing_enable`` keeps parameter names unchanged (a wrapper module would add a
    prefix and break loading and export) and forwards every keyword argument, including the SP group and the packed
    sequence metadata, into the recomputed block.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing.")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False


def apply_fsdp(blocks: list[nn.Module], root: nn.Module, mesh: DeviceMesh, config: FSDPConfig) -> None:
    """``fully_shard`` every block, then the root (which owns what is left: embeddings, final norm, lm_head)."""
    if config.cpu_offload and mesh.device_type == "cpu":
        raise ValueError(
            "cpu_offload moves sharded weights and optimizer state from the GPU to CPU memory; training on CPU keeps "
            "them there already. Set cpu_offload=false (or train on GPUs)."
        )
    common = dict(
        mesh=mesh,
        mp_policy=config.mixed_precision(),
        offload_policy=CPUOffloadPolicy() if config.cpu_offload else OffloadPolicy(),
    )
    for i, block in enumerate(blocks):
        # The last block's weights are needed again right away by backward: resharding them would be wasted work.
        reshard = config.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard, **common)
    fully_shard(root, reshard_after_forward=config.reshard_after_forward, **common)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # Plain SUM collectives: no PREMUL_SUM (unsupported by gloo), no scaling kernel for a factor of 1.
            module.set_force_sum_reduction_for_comms(True)


def parallelize_model(hf_model: nn.Module, root: nn.Module, mesh: DeviceMesh, config: FSDPConfig) -> None:
    """Apply checkpointing and FSDP2 to ``hf_model`` (inside ``root``) in the fixed order."""
    if config.activation_checkpointing:
        apply_activation_checkpointing(hf_model)
    apply_fsdp(find_transformer_blocks(hf_model), root, mesh, config)
