"""Ulysses sequence-parallel communication primitives, as autograd functions with exact backward passes.

Ulysses splits every sequence across the ranks of the SP group. Outside attention each rank holds a contiguous
slice of the sequence with all heads; attention needs the whole sequence, so it trades the sequence split for a
head split with one all-to-all (:func:`seq_to_heads`) and trades back afterwards (:func:`heads_to_seq`).

Gradient contract (the one FSDP over ``dp_shard × sp`` needs): the batch is cut per rank once, in
``parallel/sequence.py``; each rank's backward then yields only its contribution to every parameter's gradient, and
the contributions summed over the SP group (the gradient reduction over dp_shard × sp) give the single-process
gradient. The all-to-alls here are permutations, so their backward is the inverse permutation.

Every function is the identity when ``group`` is ``None`` or has one rank. Nothing here reads tensor values on the
host: sizes come from shapes only, so there are no host-device synchronisations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["seq_to_heads", "heads_to_seq"]


def _group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _check_divisible(size: int, parts: int, what: str) -> None:
    if size % parts:
        raise ValueError(f"{what} of size {size} cannot be split evenly across {parts} sequence-parallel ranks.")


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``scatter_dim`` into P chunks, send chunk j to rank j, concatenate what arrives along ``gather_dim``."""
    world = dist.get_world_size(group)
    _check_divisible(x.shape[scatter_dim], world, f"dimension {scatter_dim}")
    # Put the destination rank first so all_to_all_single's equal split along dim 0 is chunk j -> rank j.
    send = x.unflatten(scatter_dim, (world, -1)).movedim(scatter_dim, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[i] is rank i's piece; rank order along gather_dim keeps the sequence (or heads) in global order.
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        # The all-to-all is a permutation of elements across ranks; its adjoint is the inverse permutation.
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup | None, seq_dim: int, head_dim: int) -> torch.Tensor:
    """Trade the sequence split for a head split before attention.

    ``x`` holds this rank's contiguous sequence slice with all heads; the result holds the full sequence (slices
    concatenated in rank order) with this rank's contiguous block of ``H / sp`` heads. The head count must divide
    by the group size. Backward is the inverse all-to-all (:func:`heads_to_seq`).
    """
    if _group_size(group) == 1:
        return x
    seq_dim, head_dim = seq_dim % x.ndim, head_dim % x.ndim
    return _AllToAll.apply(x, group, head_dim, seq_dim)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup | None, seq_dim: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: full sequence with local heads in, local sequence slice with all heads out."""
    if _group_size(group) == 1:
        return x
    seq_dim, head_dim = seq_dim % x.ndim, head_dim % x.ndim
    return _AllToAll.apply(x, group, seq_dim, head_dim)
