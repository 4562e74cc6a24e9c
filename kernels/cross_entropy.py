"""Cross-entropy on top of the output projection without materialising the full ``[tokens, vocab]`` logits.

``linear_cross_entropy`` splits the tokens into chunks and checkpoints each chunk: a chunk's logits exist only while
its loss (forward) or its gradient (backward, recomputed) is computed, so peak memory holds one chunk of logits
instead of all of them. The reduction is a *sum* over non-ignored tokens in fp32, so callers can divide by a token
count reduced over the whole global batch (data- and sequence-parallel ranks, accumulation micro-batches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["linear_cross_entropy"]


def _chunk_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_size: int = 4096,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Sum of token cross-entropies of ``hidden @ weight.T (+ bias)`` against ``labels`` (already shifted).

    Args:
        hidden: ``[..., hidden_size]`` final hidden states (any leading shape).
        weight: ``[vocab, hidden_size]`` output projection (the lm_head weight).
        labels: ``hidden.shape[:-1]`` target ids; ``ignore_index`` entries contribute nothing.
        chunk_size: tokens per chunk; smaller saves memory, larger launches fewer kernels.

    Returns:
        A 0-dim fp32 tensor: the *sum* of per-token losses (0 when every label is ignored).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden states {tuple(hidden.shape[:-1])}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        if needs_grad and hidden.shape[0] > chunk_size:
            total = total + checkpoint(_chunk_loss_sum, h, weight, bias, y, ignore_index, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, weight, bias, y, ignore_index)
    return total
