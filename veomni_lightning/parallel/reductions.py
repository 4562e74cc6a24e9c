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

__all__ = ["all_reduce_sum", "clip_grad_norm"]


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum ``tensor`` in place over ``group`` (nothing to do for ``None``, a group of one); returns it."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Global gradient norm over all (sharded) parameters, clipping to ``max_norm`` when given.

    With FSDP2 the gradients are DTensors sharded over the FSDP mesh; the norm is reduced over that mesh so every
    rank gets the norm of the full gradient. No host sync: the clip coefficient stays on the device.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm is not None:
        # torch.nn.utils.clip_grads_with_norm_'s arithmetic on the local shards: one foreach kernel, no DTensor
        # dispatch per parameter.
        with torch.no_grad():
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
            torch._foreach_mul_(local, coef.to(local[0].device))
    return total
