"""Selective activation checkpointing: keep what is expensive to recompute, recompute the rest.

Full checkpointing reruns a block's whole forward in backward (about a third more compute). With a selective policy
(torch's ``create_selective_checkpoint_contexts``) the outputs of the matrix multiplications and of attention are
saved during the forward, and only the cheap, memory-hungry elementwise work (norms, activations, RoPE, residual
adds, casts) is recomputed: most of the memory saving for a fraction of the extra FLOPs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

__all__ = ["SAVED_OPS", "selective_checkpoint_context"]

_aten = torch.ops.aten
#: Ops whose outputs the selective policy saves: the matmuls and the attention kernels.
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._flash_attention_forward.default,
    _aten._efficient_attention_forward.default,
}


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint_context() -> Any:
    """The ``context_fn`` for ``torch.utils.checkpoint.checkpoint`` that applies the selective policy."""
    return create_selective_checkpoint_contexts(_policy)
