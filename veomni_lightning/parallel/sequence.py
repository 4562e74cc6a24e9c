"""Sequence-parallel sharding of a packed micro-batch: the one place where a batch is cut for SP.

The data pipeline yields full packed sequences; the LightningModule calls :func:`shard_packed_batch` in its step.
Labels arrive already shifted, so no token of one rank needs its neighbour's next token. ``cu_seqlens`` and
``max_seqlen`` stay those of the *full* (padded) sequence: after the all-to-all every rank attends over the full
sequence with its share of the heads.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["shard_packed_batch", "SEQUENCE_KEYS"]

#: Per-token tensors ``[batch, seq]`` that are padded and sliced along the sequence dim.
SEQUENCE_KEYS = ("input_ids", "labels", "position_ids")
_PAD_VALUES = {"input_ids": 0, "labels": -100, "position_ids": None}


def shard_packed_batch(batch: dict[str, Any], sp_rank: int, sp_size: int) -> dict[str, Any]:
    """Pad a packed micro-batch to a multiple of ``sp_size`` and keep this rank's contiguous slice of it.

    Padding forms one extra segment (positions restarting at 0, labels ignored), appended to ``cu_seqlens``, so it
    never attends to or is attended by real tokens. Only shapes known on the host are used: no device sync.

    Returns a new dict; tensors not in :data:`SEQUENCE_KEYS` pass through unchanged.
    """
    seq_len = batch["input_ids"].shape[-1]
    pad = (-seq_len) % sp_size
    out = dict(batch)
    if pad:
        for key in SEQUENCE_KEYS:
            if key not in batch:
                continue
            x = batch[key]
            if key == "position_ids":
                filler = torch.arange(pad, device=x.device, dtype=x.dtype).expand(*x.shape[:-1], pad)
            else:
                filler = x.new_full((*x.shape[:-1], pad), _PAD_VALUES[key])
            out[key] = torch.cat([x, filler], dim=-1)
        if "cu_seqlens" in batch:
            cu = batch["cu_seqlens"]
            out["cu_seqlens"] = torch.cat([cu, cu.new_full((1,), seq_len + pad)])
        if "max_seqlen" in batch:
            out["max_seqlen"] = max(int(batch["max_seqlen"]), pad)
    if sp_size == 1:
        return out
    local = (seq_len + pad) // sp_size
    for key in SEQUENCE_KEYS:
        if key in out:
            out[key] = out[key][..., sp_rank * local : (sp_rank + 1) * local]
    return out
