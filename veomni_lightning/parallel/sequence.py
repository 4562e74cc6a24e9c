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

#: Per-token tensors that are padded and sliced along the sequence dim: key -> (sequence dim, pad value).
#: ``inputs_embeds`` ``[batch, seq, hidden]`` is what multimodal families build on the full sequence before the cut;
#: ``position_ids`` padding restarts at 0 (``None``).
SEQUENCE_KEYS: dict[str, tuple[int, float | None]] = {
    "input_ids": (-1, 0),
    "labels": (-1, -100),
    "position_ids": (-1, None),
    "inputs_embeds": (-2, 0.0),
}


def shard_packed_batch(batch: dict[str, Any], sp_rank: int, sp_size: int) -> dict[str, Any]:
    """Pad a packed micro-batch to a multiple of ``sp_size`` and keep this rank's contiguous slice of it.

    Padding forms one extra segment (positions restarting at 0, labels ignored), appended to ``cu_seqlens``, so it
    never attends to or is attended by real tokens. Only shapes known on the host are used: no device sync.

    Returns a new dict; tensors not in :data:`SEQUENCE_KEYS` pass through unchanged.
    """
    seq_len = batch["labels"].shape[-1]
    pad = (-seq_len) % sp_size
    out = dict(batch)
    if pad:
        for key, (dim, value) in SEQUENCE_KEYS.items():
            if key not in batch:
                continue
            x = batch[key]
            shape = list(x.shape)
            shape[dim] = pad
            if value is None:
                filler = torch.arange(pad, device=x.device, dtype=x.dtype).expand(*shape)
            else:
                filler = x.new_full(shape, value)
            out[key] = torch.cat([x, filler], dim=dim)
        if "cu_seqlens" in batch:
            cu = batch["cu_seqlens"]
            out["cu_seqlens"] = torch.cat([cu, cu.new_full((1,), seq_len + pad)])
        if "max_seqlen" in batch:
            out["max_seqlen"] = max(int(batch["max_seqlen"]), pad)
    if sp_size == 1:
        return out
    local = (seq_len + pad) // sp_size
    for key, (dim, _) in SEQUENCE_KEYS.items():
        if key in out:
            # A view: autograd gives the cut tensor (e.g. inputs_embeds) this rank's gradient contribution, zero
            # outside the slice; the SP ranks' contributions are summed by the gradient reduction.
            out[key] = out[key].narrow(dim, sp_rank * local, local)
    return out
