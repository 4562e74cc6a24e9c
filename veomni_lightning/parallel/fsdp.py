"""FSDP2 and activation checkpointing, applied by short explicit functions in a fixed order.

Order (see :func:`parallelize_model`): activation checkpointing → ``torch.compile`` per transformer block (optional)
→ ``fully_shard`` per transformer block → ``fully_shard`` on the root → gradient reduction set to *sum*.

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

__all__ = [
    "FSDPConfig",
    "find_transformer_blocks",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_fsdp",
    "parallelize_model",
]

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
        checkpoint_fraction: with checkpointing on, the share of blocks that recompute (evenly spread); the others
            keep their activations. Spend spare memory on speed: each block left out saves its forward recompute.
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory.
    """

    param_dtype: DTypeName = "bf16"
    reduce_dtype: DTypeName = "fp32"
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    checkpoint_fraction: float = 1.0
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.checkpoint_fraction <= 1.0:
            raise ValueError(
                f"checkpoint_fraction must be in (0, 1], got {self.checkpoint_fraction}; to turn checkpointing off set "
                "activation_checkpointing=false."
            )
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


def apply_activation_checkpointing(model: nn.Module, fraction: float = 1.0) -> None:
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
    if fraction < 1.0:
        blocks = find_transformer_blocks(model)
        for i, block in enumerate(blocks):
            # Block i recomputes when the running count floor((i+1)·f) steps up: evenly spread, exactly round(n·f).
            if int((i + 1) * fraction) == int(i * fraction):
                if not hasattr(block, "gradient_checkpointing"):
                    raise ValueError(f"{type(block).__name__} has no per-block gradient_checkpointing switch.")
                block.gradient_checkpointing = False


def apply_compile(blocks: list[nn.Module]) -> None:
    """``torch.compile`` each transformer block in place (``Module.compile``: parameter names stay unchanged).

    Inductor fuses the memory-bound ops around the matrix products (RMSNorm, RoPE, SwiGLU, residual adds, dtype
    casts) into a few Triton kernels and its partitioner recomputes cheap elementwise results in backward instead of
    saving them. Attention itself is a graph break (:func:`~veomni_lightning.parallel.attention.ulysses_attention`
    runs eagerly: varlen kernels, all-to-alls), so each block compiles to two graphs. FSDP2's hooks run outside the
    compiled region, and transformers' checkpointing wraps the compiled call.
    """
    import torch._dynamo

    # Every block is one more entry on the same code object; the default limit (8) would silently send the rest of
    # a 28-layer model back to eager.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 2 * len(blocks) + 8))
    for block in blocks:
        block.compile()


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


def parallelize_model(
    hf_model: nn.Module, root: nn.Module, mesh: DeviceMesh | None, config: FSDPConfig, compile_blocks: bool = False
) -> None:
    """Apply checkpointing, compilation and FSDP2 to ``hf_model`` (inside ``root``) in the fixed order.

    Without a mesh (one process, no strategy) only checkpointing and compilation apply.
    """
    blocks = find_transformer_blocks(hf_model)
    if config.activation_checkpointing:
        apply_activation_checkpointing(hf_model, config.checkpoint_fraction)
    if compile_blocks:
        apply_compile(blocks)
    if mesh is not None:
        apply_fsdp(blocks, root, mesh, config)
