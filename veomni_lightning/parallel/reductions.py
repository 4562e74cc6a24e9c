"""Reductions over the mesh's views and the global gradient norm: the arithmetic that makes parallel equal serial.

The training step reduces two kinds of numbers (see ``veomni_lightning.modules.base``):

* **counts** (loss tokens, image patches, ...) come from the data; every rank of one SP group holds the same
  micro-batches, so counts are summed over the ``batch`` view (dp) only;
* **loss sums** are this rank's share of the global sum (its sequence slice); they are summed over the ``loss``
  view (dp × sp).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

__all__ = ["all_reduce_sum", "clip_grad_norm", "split_groups_by_mesh"]


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum ``tensor`` in place over ``group`` (nothing to do for ``None``, a group of one); returns it."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def clip_grad_norm(
    parameters: Iterable[torch.nn.Parameter], max_norm: float | None, shard_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Global gradient norm over all (sharded) parameters, clipping to ``max_norm`` when given.

    With FSDP2 every gradient is a DTensor whose local shards over ``shard_group`` (the ranks of one replica that
    shard parameters: dp_shard × sp) are disjoint pieces of it, whichever mesh it lives on (the dense FSDP mesh, or
    ep × efsdp for MoE experts, which spans the same ranks). So the squared norm is the sum over that group of the
    local squared norms: one all-reduce, whatever the number of meshes. No host sync: the clip coefficient stays on
    the device.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    squares = torch.stack([n.float() for n in torch._foreach_norm(local)]).pow(2).sum()
    if any(isinstance(g, DTensor) for g in grads):
        all_reduce_sum(squares, shard_group)
    total = squares.sqrt()
    if max_norm is not None:
        # torch.nn.utils.clip_grads_with_norm_'s arithmetic on the local shards: one foreach kernel, no DTensor
        # dispatch per parameter.
        with torch.no_grad():
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            torch._foreach_mul_(local, coef.to(local[0].device))
    return total


def split_groups_by_mesh(groups: list[dict]) -> list[dict]:
    """Optimizer parameter groups with each group's parameters split by the mesh they live on (same options).

    The optimizer's foreach/fused kernels take one group's tensors together, and DTensors of different meshes (MoE
    experts and dense weights) cannot be.
    """
    out = []
    for group in groups:
        by_mesh: dict[object, list[torch.nn.Parameter]] = {}
        for p in group["params"]:
            by_mesh.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
        out += [{**group, "params": params} for params in by_mesh.values()]
    return out
