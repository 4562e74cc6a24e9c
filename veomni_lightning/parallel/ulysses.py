"""Ulysses sequence-parallel communication primitives, as autograd functions with exact backward passes.

Ulysses splits every sequence across the ranks of the SP group. Outside attention each rank holds a contiguous
slice of the sequence with all heads; attention needs the whole sequence, so it trades the sequence split for a
head split with one all-to-all (:func:`seq_to_heads`) and trades back afterwards (:func:`heads_to_seq`).

Gradient contract (the one FSDP over ``dp_shard × sp`` needs): a tensor that is *sliced* per rank produces, on
each rank, only that rank's contribution to the gradient of the replicated input — the contributions summed over
the SP group give the single-process gradient, which is exactly what the gradient reduction over the SP ranks
does for every parameter. A tensor that is *gathered* is assumed to feed computation that runs identically on all
ranks, so each rank keeps the gradient of its own chunk.

Every function is the identity when ``group`` is ``None`` or has one rank. Nothing here reads tensor values on the
host: sizes come from shapes only, so there are no host-device synchronisations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["seq_to_heads", "heads_to_seq", "slice_for_rank", "gather_from_ranks", "pad_to_multiple"]


# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single; 2.11 may only have the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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


class _SliceForRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        _check_divisible(x.shape[dim], world, f"dimension {dim}")
        chunk = x.shape[dim] // world
        ctx.dim, ctx.start, ctx.full = dim, rank * chunk, x.shape[dim]
        # Copy so the slice does not keep the whole replicated tensor alive through a view.
        return x.narrow(dim, rank * chunk, chunk).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # This rank only used its own chunk, so its contribution to the replicated input's gradient is the chunk's
        # gradient embedded in zeros. No communication: the SP-group gradient reduction sums the contributions.
        shape = list(grad.shape)
        shape[ctx.dim] = ctx.full
        full = grad.new_zeros(shape)
        full.narrow(ctx.dim, ctx.start, grad.shape[ctx.dim]).copy_(grad)
        return full, None, None


def slice_for_rank(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's contiguous chunk of a tensor that is identical on all SP ranks (e.g. embeddings, labels).

    ``x.shape[dim]`` must divide by the group size (pad first with :func:`pad_to_multiple`). Backward returns this
    rank's *contribution*: a full-size gradient that is zero outside the local chunk. Summed over the SP group the
    contributions equal the single-process gradient; gradients of parameters upstream of the slice are therefore
    partial per rank, like those of every parameter inside the SP region, and are completed by the same sum over
    the SP ranks (the FSDP reduce-scatter over ``dp_shard × sp``).
    """
    if _group_size(group) == 1:
        return x
    return _SliceForRank.apply(x, dim % x.ndim, group)


class _GatherFromRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        world = dist.get_world_size(group)
        ctx.dim, ctx.rank, ctx.world = dim, dist.get_rank(group), world
        x = x.contiguous()
        # all_gather_into_tensor concatenates along dim 0 (the only layout gloo accepts); regroup by rank after.
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x, group=group)
        if dim == 0:
            return out
        return out.unflatten(0, (world, -1)).movedim(0, dim).flatten(dim, dim + 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Downstream ran identically on every rank, so every rank already holds the full gradient: keep our chunk.
        chunk = grad.shape[ctx.dim] // ctx.world
        return grad.narrow(ctx.dim, ctx.rank * chunk, chunk).contiguous(), None, None


def gather_from_ranks(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather equal-size chunks along ``dim`` (rank order), e.g. logits or hidden states of the local slice.

    Contract: the computation on the gathered tensor must be identical on every SP rank (same inputs, same loss),
    so each rank holds the full output gradient and backward simply keeps this rank's chunk — no communication.
    Parameters used only downstream then get the full gradient on every rank; if the SP group's gradients are
    summed afterwards, scale that replicated loss by ``1 / sp``.
    """
    if _group_size(group) == 1:
        return x
    return _GatherFromRanks.apply(x, dim % x.ndim, group)


def pad_to_multiple(x: torch.Tensor, dim: int, multiple: int, value: float = 0.0) -> torch.Tensor:
    """Pad ``x`` at the end of ``dim`` with ``value`` so its size is a multiple of ``multiple`` (e.g. the SP size).

    Used before :func:`slice_for_rank` on packed sequences; returns ``x`` itself when no padding is needed.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple}.")
    dim = dim % x.ndim
    extra = -x.shape[dim] % multiple
    if extra == 0:
        return x
    # F.pad lists (left, right) pairs starting from the last dimension.
    pad = [0, 0] * (x.ndim - 1 - dim) + [0, extra]
    return F.pad(x, pad, value=value)
