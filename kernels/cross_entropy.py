"""Fused linear cross-entropy: the loss of ``hidden @ weight.T`` without materialising the ``[tokens, vocab]`` logits.

``linear_cross_entropy`` walks the tokens in chunks. For each chunk it computes the logits, then one row kernel
(Triton on CUDA, :func:`cross_entropy_rows_torch` elsewhere) reads them once for the log-sum-exp and once more to
overwrite them *in place* with the gradient ``softmax - onehot``; the chunk's input and weight gradients follow from
two matrix products while the chunk is still in memory. So the forward pass already holds the gradients: backward
only scales them by the incoming scalar, and no chunk's logits are ever recomputed (a checkpointed chunked loss
recomputes the ``tokens × hidden × vocab`` product once more in backward).

The reduction is a *sum* over non-ignored tokens in fp32. Callers divide by a token count reduced over the whole
global batch (data- and sequence-parallel ranks, accumulation micro-batches), which is what makes the loss SP-aware:
each sequence-parallel rank sums the tokens of its own slice (labels arrive already shifted), and the division by
the global count makes the summed gradients equal to single-process training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_cross_entropy import cross_entropy_rows_triton, triton_available

__all__ = ["linear_cross_entropy", "cross_entropy_rows", "cross_entropy_rows_torch"]


def cross_entropy_rows_torch(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, write_grad: bool
) -> torch.Tensor:
    """Per-row loss ``logsumexp(row) - row[label]`` (0 for ignored rows), in fp32.

    With ``write_grad`` the rows are overwritten in place with ``d loss / d logits = softmax - onehot`` (zero rows
    for ignored labels), in the logits' dtype. Reference semantics of the Triton kernel; used on CPU.
    """
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    loss = (lse - x.gather(-1, safe[:, None]).squeeze(-1)) * valid
    if write_grad:
        grad = torch.exp(x - lse[:, None])
        grad.scatter_add_(-1, safe[:, None], -torch.ones_like(grad[:, :1]))
        logits.copy_(grad * valid[:, None])
    return loss


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, write_grad: bool) -> torch.Tensor:
    """Dispatch: the Triton row kernel for CUDA tensors (when Triton is importable), the torch version otherwise."""
    if logits.is_cuda and triton_available():
        return cross_entropy_rows_triton(logits, labels, ignore_index, write_grad)
    return cross_entropy_rows_torch(logits, labels, ignore_index, write_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of token losses; the input/weight/bias gradients are computed chunk by chunk during forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index):  # noqa: D401 - autograd signature
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        write_grad = need_h or need_w or need_b
        grad_hidden = torch.empty_like(hidden) if need_h else None
        n_chunks = -(-hidden.shape[0] // chunk_size)
        # Several chunks accumulate the weight gradient in fp32; one chunk writes it directly.
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w and n_chunks > 1 else None
        )
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
            logits = F.linear(h, weight, bias)
            total += cross_entropy_rows(logits, y, ignore_index, write_grad).sum()
            if not write_grad:
                continue
            grad_logits = logits  # overwritten in place by the row kernel
            if need_h:
                torch.mm(grad_logits, weight, out=grad_hidden[start : start + chunk_size])
            if need_w:
                partial = grad_logits.t().mm(h)
                grad_weight = partial if grad_weight is None else grad_weight.add_(partial)
            if need_b:
                grad_bias += grad_logits.float().sum(0)
        ctx.save_for_backward(
            *(
                t if t is not None else torch.empty(0, device=hidden.device)
                for t in (grad_hidden, grad_weight, grad_bias)
            )
        )
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        saved = ctx.saved_tensors
        grads = []
        for needed, grad, dtype in zip((need_h, need_w, need_b), saved, ctx.dtypes):
            grads.append((grad * grad_output).to(dtype) if needed else None)
        return (*grads, None, None, None)


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
        chunk_size: tokens per chunk; peak extra memory is one chunk of logits (``chunk_size × vocab``).

    Returns:
        A 0-dim fp32 tensor: the *sum* of per-token losses (0 when every label is ignored). Double backward is not
        supported (the gradients are computed eagerly in forward).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden states {tuple(hidden.shape[:-1])}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_size, ignore_index)
