"""Ulysses sequence parallelism inside a diffusers video DiT (Wan): each SP rank runs the blocks on its tokens.

The transformer patchifies the latent video into one token sequence, computes its rotary table, runs the blocks
and projects back before unpatchifying. :func:`split_wan_transformer` adds hooks and one attention processor, the
extension points diffusers offers, and leaves the model a diffusers model:

* the rotary table (the ``rope`` module's output) and the block input are padded with zero tokens to a multiple of
  the SP size and cut to this rank's contiguous slice (the places diffusers' own ``_cp_plan`` splits);
* each block's self-attention runs a Ulysses processor: all-to-all to the full sequence with local heads,
  bidirectional attention in which the padding is a segment of its own (so real tokens never see it), all-to-all
  back; cross-attention needs nothing (local queries, the full prompt as keys);
* after ``proj_out`` the slices are all-gathered and the padding dropped, so unpatchifying sees every token.

Gradients follow the encoder towers' rule (``parallel/vision.py``): every rank's loss is its share of the sample's
loss, the gather's backward sums the partial gradients and keeps this rank's slice, and FSDP's sum over dp × sp
gives the single-process gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from veomni_lightning.parallel.attention import ulysses_attention
from veomni_lightning.parallel.vision import GatherSlices

__all__ = ["UlyssesWanSelfAttention", "split_wan_transformer"]


@dataclass
class _Split:
    """The SP group and the token counts of the forward in flight (set by the rotary hook, read by the others)."""

    group: dist.ProcessGroup
    tokens: int = 0
    padded: int = 0

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    def cut(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Pad ``x`` along ``dim`` from ``tokens`` to ``padded`` and keep this rank's slice."""
        if self.padded != x.shape[dim]:
            pad = [0, 0] * (x.dim() - 1 - dim) + [0, self.padded - x.shape[dim]]
            x = F.pad(x, pad)
        local = self.padded // self.world
        return x.narrow(dim, self.rank * local, local)


class UlyssesWanSelfAttention:
    """A diffusers attention processor for Wan's self-attention over a sequence split across SP ranks.

    The projections, q/k norms and rotary embedding are Wan's (``WanAttnProcessor``); the attention itself is
    :func:`~veomni_lightning.parallel.attention.ulysses_attention` (bidirectional, the padding a separate segment).
    """

    def __init__(self, split: _Split) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.split = split
        self.plain = WanAttnProcessor()  # cross-attention and any call this one does not handle

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # [B, S_local, H, D]
        if rotary_emb is not None:
            query, key = (_rotate(t, *rotary_emb) for t in (query, key))
        split = self.split
        ends = [0, split.tokens] + ([split.padded] if split.padded > split.tokens else [])
        cu = torch.tensor(ends, dtype=torch.int32, device=query.device)
        out, _ = ulysses_attention(
            attn, *(t.transpose(1, 2) for t in (query, key, value)), None, sp_group=split.group,
            cu_seq_lens_q=cu, max_length_q=split.tokens, is_causal=False,
        )  # fmt: skip
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (the same arithmetic as ``WanAttnProcessor``)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def split_wan_transformer(model: nn.Module, group: dist.ProcessGroup | None) -> list[Any]:
    """Hook a ``WanTransformer3DModel`` to run its blocks on this rank's share of the tokens (see the module doc).

    No-op without a group of more than one rank. Returns the hook handles.
    """
    if group is None or dist.get_world_size(group) == 1:
        return []
    split = _Split(group)

    def after_rope(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        split.tokens = output[0].shape[1]
        split.padded = -(-split.tokens // split.world) * split.world
        return tuple(split.cut(t, dim=1) for t in output)

    def before_first_block(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (split.cut(args[0], dim=1), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": split.cut(kwargs["hidden_states"], dim=1)}

    def after_proj_out(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        gathered = GatherSlices.apply(output.transpose(0, 1).contiguous(), group).transpose(0, 1)
        return gathered[:, : split.tokens]

    for block in model.blocks:
        block.attn1.set_processor(UlyssesWanSelfAttention(split))
    return [
        model.rope.register_forward_hook(after_rope),
        model.blocks[0].register_forward_pre_hook(before_first_block, with_kwargs=True),
        model.proj_out.register_forward_hook(after_proj_out),
    ]
