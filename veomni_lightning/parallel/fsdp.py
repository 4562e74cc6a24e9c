"""FSDP2, activation checkpointing and compilation, applied by short explicit functions in a fixed order.

Order (see :func:`parallelize_model`): activation checkpointing (on the chosen share of the blocks) →
``torch.compile`` per block (optional) → expert parallelism (MoE experts split on the expert dim over ``ep``) →
``fully_shard`` of each experts module over ``efsdp`` → ``fully_shard`` per block → ``fully_shard`` on the root →
gradient reduction set to *sum*. This module knows no model library: the blocks and the function that turns checkpointing on
come from a model adapter (``veomni_lightning.models.adapters``).

Why sum: the ranks of one SP group hold different tokens of the same samples, and the loss each rank back-propagates is
already normalised by the count of the whole global batch. The gradient of the global mean is therefore the plain sum
of the ranks' gradients, while FSDP2 by default averages over its mesh (dp_shard × sp, × dp_replicate).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from .config import ParallelConfig

__all__ = ["checkpointed_share", "apply_compile", "apply_expert_parallel", "apply_fsdp", "parallelize_model"]

#: ``enable_checkpointing(blocks)`` makes each given block recompute its forward in backward.
CheckpointFn = Callable[[list[nn.Module]], None]


def checkpointed_share(blocks: list[nn.Module], fraction: float) -> list[nn.Module]:
    """The blocks that recompute when a ``fraction`` of them should: exactly round-down(n·f), evenly spread."""
    # Block i recomputes when the running count floor((i+1)·f) steps up.
    return [b for i, b in enumerate(blocks) if int((i + 1) * fraction) != int(i * fraction)]


def apply_compile(blocks: list[nn.Module], activation_memory_budget: float | None = None) -> None:
    """``torch.compile`` each block in place (``Module.compile``: parameter names stay unchanged).

    Inductor fuses the memory-bound ops around the matrix products (RMSNorm, RoPE, SwiGLU, residual adds, dtype
    casts) into a few Triton kernels and its partitioner recomputes cheap elementwise results in backward instead of
    saving them. Attention itself is a graph break (:func:`~veomni_lightning.parallel.attention.ulysses_attention`
    runs eagerly: varlen kernels, all-to-alls), so each block compiles to two graphs. FSDP2's hooks run outside the
    compiled region, and checkpointing wraps the compiled call. With ``activation_memory_budget`` the partitioner
    keeps at most that share of each graph's activations and recomputes the rest in the backward graph.
    """
    import torch._dynamo
    import torch._functorch.config

    if activation_memory_budget is not None:
        # Read when a graph is partitioned (its first call), so it must be set before then and stays process-wide.
        torch._functorch.config.activation_memory_budget = activation_memory_budget

    # Every block is one more entry on the same code object; the default limit (8) would silently send the rest of
    # a 28-layer model back to eager.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 2 * len(blocks) + 8))
    for block in blocks:
        block.compile()


def apply_expert_parallel(experts: list[nn.Module], ep_mesh: DeviceMesh) -> None:
    """Keep this rank's ``num_experts / ep`` experts: every parameter with the expert dim first becomes a DTensor
    sharded on it over ``ep_mesh``; the module learns its group (``ep_group``) for the ``ep`` experts function.
    """
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    for module in experts:
        for name, param in list(module.named_parameters(recurse=False)):
            if param.ndim and param.shape[0] == module.num_experts:
                local = param.chunk(ep, dim=0)[rank]
                sharded = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
                module.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        module.ep_group = ep_mesh.get_group()


def apply_fsdp(
    blocks: list[nn.Module],
    root: nn.Module,
    mesh: DeviceMesh,
    config: ParallelConfig,
    experts: list[nn.Module] = (),
    experts_mesh: DeviceMesh | None = None,
) -> None:
    """``fully_shard`` every block, then the root (which owns what is left: embeddings, final norm, lm_head).

    The root is never resharded after forward: the loss (lm_head, fused cross-entropy) is computed inside the root's
    forward, so backward needs the root's weights right away; resharding them would all-gather the embeddings and
    lm_head a second time per step (FSDP2's own default for the root, made explicit here).
    """
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
    if experts_mesh is not None:
        # Experts first, on their own mesh: the block's fully_shard below then leaves their parameters alone.
        expert_common = {**common, "mesh": experts_mesh}
        for module in experts:
            fully_shard(module, reshard_after_forward=config.reshard_after_forward, **expert_common)
    for i, block in enumerate(blocks):
        # The last block's weights are needed again right away by backward: resharding them would be wasted work.
        reshard = config.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard, **common)
    fully_shard(root, reshard_after_forward=False, **common)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # Plain SUM collectives: no PREMUL_SUM (unsupported by gloo), no scaling kernel for a factor of 1.
            module.set_force_sum_reduction_for_comms(True)


def parallelize_model(
    root: nn.Module,
    blocks: list[nn.Module],
    mesh: DeviceMesh | None,
    config: ParallelConfig,
    enable_checkpointing: CheckpointFn | None = None,
    *,
    experts: list[nn.Module] = (),
    ep_mesh: DeviceMesh | None = None,
    efsdp_mesh: DeviceMesh | None = None,
) -> None:
    """Apply checkpointing, compilation, expert parallelism and FSDP2 to ``root`` and its ``blocks`` in order.

    ``enable_checkpointing`` comes from the model's adapter; it is required when ``config.activation_checkpointing``
    is on. ``experts`` are the MoE experts modules (from the adapter); with ``ep_mesh`` they are split over it and
    FSDP-sharded over ``efsdp_mesh``. Without a mesh (one process, no strategy) only checkpointing and compilation
    apply.
    """
    if config.activation_checkpointing:
        if enable_checkpointing is None:
            raise ValueError("activation_checkpointing is on, but no checkpointing function was given for the blocks.")
        enable_checkpointing(checkpointed_share(blocks, config.checkpoint_fraction))
    if config.compile_blocks:
        apply_compile(blocks, config.activation_memory_budget)
    if ep_mesh is not None:
        apply_expert_parallel(list(experts), ep_mesh)
    if mesh is not None:
        apply_fsdp(blocks, root, mesh, config, list(experts), efsdp_mesh if ep_mesh is not None else None)
