"""Triton row kernel for cross-entropy: loss per row, and the logits overwritten in place with their gradient.

One program per row: an online max / sum-of-exponentials pass over the vocabulary gives the log-sum-exp, then a
second pass writes ``softmax - onehot`` over the logits. Memory traffic is two reads and one write of the chunk's
logits in their own dtype (bf16 in training), against the ~6 fp32 passes of ``log_softmax`` + ``nll_loss`` + their
backward. Triton is optional: without it (or on CPU) the torch reference in :mod:`.cross_entropy` is used, and the
tests run this kernel on CPU through ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["cross_entropy_rows_triton", "triton_available"]


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (it ships with CUDA builds of torch; CPU installs may lack it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def cross_entropy_rows_kernel(
        logits_ptr,
        row_stride,
        labels_ptr,
        loss_ptr,
        ignore_index,
        N_COLS: tl.constexpr,  # the vocabulary: one compilation per model (also what Triton's interpreter needs)
        WRITE_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, N_COLS, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < N_COLS, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        safe_label = tl.where(valid, label, 0)
        target = tl.load(base + safe_label).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
        if WRITE_GRAD:
            scale = tl.where(valid, 1.0, 0.0)
            for start in range(0, N_COLS, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < N_COLS
                x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
                grad = tl.exp(x - lse) - tl.where(cols == safe_label, 1.0, 0.0)
                tl.store(base + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)

    return cross_entropy_rows_kernel


def cross_entropy_rows_triton(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, write_grad: bool
) -> torch.Tensor:
    """Triton version of :func:`~veomni_lightning.kernels.cross_entropy.cross_entropy_rows_torch` (same contract)."""
    if logits.ndim != 2 or logits.stride(-1) != 1:
        raise ValueError("cross_entropy_rows_triton expects a row-major 2-D logits tensor.")
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss
    import triton

    block = min(triton.next_power_of_2(n_cols), 32768 if logits.is_cuda else 1024)
    num_warps = 32 if block >= 32768 else (16 if block >= 8192 else 8)
    _kernel()[(n_rows,)](
        logits, logits.stride(0), labels.contiguous(), loss, ignore_index,
        N_COLS=n_cols, WRITE_GRAD=write_grad, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return loss
