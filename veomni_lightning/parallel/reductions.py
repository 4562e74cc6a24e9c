"""Reductions over the mesh's views and the global gradient norm: the arithmetic that makes parallel equal serial.

The training step reduces two kinds of numbers (see ``veomni_lightning.modules.base``):

* **counts** (loss tokens, image patches, ...) come from the data; every rank of one SP group holds the same
  micro-batches, so counts are summed over the ``batch`` view (dp) only;
* **loss sums** are this rank's share of the global sum (its sequence slice); they are summed over the ``loss``
  view (dp × sp).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

__all__ = ["all_reduce_sum", "clip_grad_norm", "split_groups"]


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


def split_groups(groups: list[dict], key: Callable[[torch.nn.Parameter], object]) -> list[dict]:
    """Optimizer parameter groups, each split by ``key(param)`` into groups with the same options (none empty).

    MoE experts get their own groups (``key``: is the parameter an expert's): the optimizer's foreach/fused kernels
    take one group's tensors together, and expert DTensors live on another mesh than the dense ones under EP. The
    split is by kind, not by mesh, so the groups (and the saved optimizer and scheduler state) are the same at every
    layout and a checkpoint resumes at another one.
    """
    out = []
    for group in groups:
        by_key: dict[object, list[torch.nn.Parameter]] = {}
        for p in group["params"]:
            by_key.setdefault(key(p), []).append(p)
        out += [{**group, "params": params} for params in by_key.values() if params]
    return out
