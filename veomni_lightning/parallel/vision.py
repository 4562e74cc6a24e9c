"""Sequence parallelism inside a vision tower: each SP rank runs the tower's blocks on its share of the patches.

A Qwen-VL style tower embeds all patches, computes their rotary embeddings (and, for Qwen2.5-VL, reorders them by
attention window), runs its blocks, and merges every ``merge²`` consecutive patches into one feature with its
``merger``. :func:`split_vision_tower` adds hooks, not a new forward:

* before each block, the patch sequence and its rotary embeddings are cut to this rank's contiguous slice (block 0
  receives the full sequence; later blocks already the slice);
* attention inside the blocks is the Ulysses function registered as ``ENCODER_ATTENTION`` (all-to-all to full
  sequence / local heads, bidirectional varlen attention over the images' ``cu_seqlens``, all-to-all back);
* after the merger (and Qwen3-VL's deepstack mergers) the merged slices are all-gathered, so the tower's output is
  the full feature sequence again, on every rank.

Slices are whole merge units, so the total patch count must divide into ``sp × merge²``: the caller appends a
padding image (:func:`padding_image`). The all-gather's backward sums the gradient over the group and keeps this
rank's slice, which, like every Ulysses collective here, leaves the gradient reduction over dp × sp to produce the
single-process gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GatherSlices", "padding_image", "split_vision_tower"]


class GatherSlices(torch.autograd.Function):
    """All-gather of equal contiguous slices along dim 0; backward: the summed gradient of this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce_scatter; the sum is what each slice needs
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(world)[rank].contiguous(), None


def _slice(x: torch.Tensor, full: int, rank: int, world: int) -> torch.Tensor:
    if x.shape[0] != full:
        return x  # already this rank's slice
    local = full // world
    return x.narrow(0, rank * local, local)


def split_vision_tower(
    blocks: list[nn.Module], gathered: list[nn.Module], group: dist.ProcessGroup | None
) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook ``blocks`` to run on this rank's slice of the patches and ``gathered`` (mergers) to all-gather theirs.

    The block hook also gives the rotary embeddings the dtype of the hidden states. FSDP2's mixed precision casts a
    block's floating inputs in the forward pass but not when activation checkpointing recomputes the block, and a
    tower that computes its rotary table in fp32 (Qwen3-VL) would then recompute with fp32 where it saved bf16. With
    ``group=None`` (no SP) only that cast is applied. Returns the hook handles (``handle.remove()`` undoes them).
    """
    rank, world = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))

    def before_block(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is None:
            raise ValueError(f"{type(module).__name__} got no position_embeddings: not a Qwen-VL style vision block.")
        full = cos_sin[0].shape[0]
        if full % world:
            raise ValueError(f"{full} patches do not split over {world} SP ranks: append a padding image first.")
        if args:
            args = (_slice(args[0], full, rank, world), *args[1:])
            dtype = args[0].dtype
        else:
            kwargs["hidden_states"] = _slice(kwargs["hidden_states"], full, rank, world)
            dtype = kwargs["hidden_states"].dtype
        kwargs["position_embeddings"] = tuple(_slice(t, full, rank, world).to(dtype) for t in cos_sin)
        return args, kwargs

    def after_merger(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return GatherSlices.apply(output, group)

    handles = [b.register_forward_pre_hook(before_block, with_kwargs=True) for b in blocks]
    if world > 1:
        handles += [m.register_forward_hook(after_merger) for m in gathered]
    return handles


def padding_image(
    patches: int, merge: int, sp: int, patch_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
    """A zero image of whole merge units that makes ``patches`` divide into ``sp × merge²`` (None if it already does).

    Returns its ``(pixels [n, patch_dim], grid [[1, merge, merge·k]], the grid as ints)``; its features are dropped
    after the tower.
    """
    unit = merge * merge
    missing = (-(patches // unit)) % sp
    if missing == 0:
        return None
    thw = [1, merge, merge * missing]
    return torch.zeros(unit * missing, patch_dim, device=device), torch.tensor([thw], device=device), thw
