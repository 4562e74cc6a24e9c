"""Ulysses sequence-parallel attention for any Hugging Face decoder, through transformers' attention registry.

Importing this module registers ``attn_implementation`` names that every HF decoder built on
``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Qwen3, Mistral, ...) can use without per-model code:

==================  =====================================================================================
name                inner kernel
==================  =====================================================================================
``ulysses``         the best available: SDPA ``is_causal`` (cuDNN on Hopper) when each row is one sequence;
                    for packed rows flash-attn varlen, else torch ``varlen_attn`` (CUDA, fp16/bf16), else
                    exact SDPA with a block-diagonal causal mask
``ulysses_flash``   ``flash_attn.flash_attn_varlen_func`` (error if not installed / not on CUDA)
``ulysses_varlen``  ``torch.nn.attention.varlen.varlen_attn`` (error if unavailable / not on CUDA)
``ulysses_sdpa``    ``torch.nn.functional.scaled_dot_product_attention`` with an explicit boolean mask
==================  =====================================================================================

Each rank runs the model on its contiguous slice of the (packed) sequence. The SP process group and the packing
metadata reach attention as model kwargs (see :func:`packed_attention_kwargs`), which HF forwards unchanged from
``model(...)`` to the attention function: ``sp_group``, ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32, offsets over the
FULL padded sequence, batch size 1; the last entry must equal the full length, i.e. padding is its own segment)
and ``max_length_q``/``max_length_k``. Without ``cu_seq_lens`` every batch row is one causal sequence.
HF builds no attention mask for these names (see :func:`register_attention_functions`); segment boundaries come
only from ``cu_seq_lens``, and an explicit ``attention_mask`` is rejected rather than silently ignored.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .ulysses import heads_to_seq, seq_to_heads

__all__ = [
    "ENCODER_ATTENTION",
    "ULYSSES_ATTENTION_NAMES",
    "packed_attention_kwargs",
    "register_attention_functions",
    "ulysses_attention",
]

ULYSSES_ATTENTION_NAMES: dict[str, str] = {
    "ulysses": "auto",
    "ulysses_sdpa": "sdpa",
    "ulysses_varlen": "varlen",
    "ulysses_flash": "flash",
}
#: The name vision towers use: the same function, bidirectional within each image. transformers' Qwen-VL vision
#: attention hands the packed ``cu_seqlens`` to implementations whose name contains "flash" (others get one call per
#: image after a host sync), hence the name.
ENCODER_ATTENTION = "ulysses_encoder_flashlike"
_HALF = (torch.float16, torch.bfloat16)


def packed_attention_kwargs(
    cu_seqlens: torch.Tensor | None, max_seqlen: int | None, sp_group: dist.ProcessGroup | None
) -> dict[str, Any]:
    """Build the kwargs to pass to ``model(...)`` for a packed (and possibly sequence-parallel) batch.

    ``cu_seqlens`` are the int32 segment offsets over the full, unsliced sequence (``[0, ..., total_len]``), and
    ``max_seqlen`` the longest segment as a Python int (``None``: the full length is used as the bound). Pass
    ``position_ids`` restarting at 0 per segment and ``use_cache=False`` alongside. Put ``cu_seqlens`` on the
    model's device already: the attention kernels would otherwise copy it there in every layer.
    """
    kwargs: dict[str, Any] = {"sp_group": sp_group}
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32)
        kwargs.update(
            cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen
        )
    return kwargs


# --------------------------------------------------------------------------------------------------- inner kernels
# All kernels take q/k/v as [B, S, H, D] over the full sequence (local heads) and return [B, S, Hq, D].


@functools.cache
def _flash_varlen_func() -> Callable | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:  # installed but built for another torch / CUDA
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen() -> tuple[Callable, frozenset[str]] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _flat_cu_seqlens(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Segment offsets for the flattened ``[B*S]`` tokens; without packing each batch row is one segment."""
    if cu_seqlens is not None:
        return cu_seqlens.to(device=q.device, dtype=torch.int32)
    b, s = q.shape[:2]
    return torch.arange(0, (b + 1) * s, s, device=q.device, dtype=torch.int32)


def _flash_kernel(q, k, v, cu_seqlens, max_len, scaling, dropout, sliding_window, causal=True) -> torch.Tensor:
    fn = _flash_varlen_func()
    b, s = q.shape[:2]
    cu = _flat_cu_seqlens(q, cu_seqlens)
    # flash-attn's window counts keys to the left of the query; HF's sliding_window includes the query itself.
    window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
    out = fn(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, max_len, max_len,
        dropout_p=dropout, softmax_scale=scaling, causal=causal, window_size=window,
    )  # fmt: skip
    return out.unflatten(0, (b, s))


def _varlen_kernel(q, k, v, cu_seqlens, max_len, scaling, dropout, sliding_window, causal=True) -> torch.Tensor:
    fn, params = _torch_varlen()
    if dropout:
        raise ValueError("torch varlen_attn does not support attention dropout; use ulysses_flash or ulysses_sdpa.")
    b, s = q.shape[:2]
    cu = _flat_cu_seqlens(q, cu_seqlens)
    kwargs: dict[str, Any] = {"scale": scaling}
    # torch 2.10 had `is_causal`; 2.11+ expresses causality as window_size=(-1, 0), (W-1, 0) for a sliding window.
    if "window_size" in params:
        kwargs["window_size"] = (sliding_window - 1, 0) if sliding_window is not None else (-1, 0 if causal else -1)
    else:
        if sliding_window is not None:
            raise ValueError("this torch's varlen_attn has no window_size; sliding-window layers need ulysses_sdpa.")
        kwargs["is_causal"] = causal
    if k.shape[2] != q.shape[2]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[2] // k.shape[2]
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    out = fn(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, max_len, max_len, **kwargs)
    return out.unflatten(0, (b, s))


def _packed_causal_mask(
    cu_seqlens: torch.Tensor | None, s: int, device: torch.device, sliding_window: int | None, causal: bool = True
):
    """[S, S] boolean mask (True = attend): causal (unless not), within one segment, within the sliding window."""
    pos = torch.arange(s, device=device)
    mask = pos[None, :] <= pos[:, None] if causal else torch.ones(s, s, dtype=torch.bool, device=device)
    if cu_seqlens is not None:
        # Segment id of every token, vectorised (no host sync): the number of segment ends at or before it.
        seg = torch.searchsorted(cu_seqlens[1:].to(device=device, dtype=torch.int64), pos, right=True)
        mask = mask & (seg[None, :] == seg[:, None])
    if sliding_window is not None:
        mask = mask & (pos[None, :] > pos[:, None] - sliding_window)
    return mask


def _sdpa_kernel(q, k, v, cu_seqlens, max_len, scaling, dropout, sliding_window, causal=True) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [B, H, S, D]
    if k.shape[1] != q.shape[1]:
        # Repeat rather than enable_gqa: SDPA's GQA path is not supported with an explicit mask on every backend.
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if (cu_seqlens is None or cu_seqlens.numel() == 2) and sliding_window is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=causal)
    else:
        mask = _packed_causal_mask(cu_seqlens, q.shape[2], q.device, sliding_window, causal)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2)


def _select_kernel(kernel: str, q: torch.Tensor, single_segment: bool = False) -> Callable:
    """The inner kernel for ``kernel``; ``auto`` sends rows that are one causal sequence each to SDPA.

    One segment per row needs no varlen kernel: SDPA with ``is_causal`` dispatches to cuDNN's fused attention on
    Hopper, measured 2× faster than the FlashAttention-2 kernels behind torch's ``varlen_attn`` (bench/results).
    """
    if kernel == "flash":
        if _flash_varlen_func() is None or not q.is_cuda:
            raise RuntimeError("ulysses_flash needs flash-attn installed and CUDA tensors; use 'ulysses' to fall back.")
        return _flash_kernel
    if kernel == "varlen":
        if _torch_varlen() is None or not q.is_cuda:
            raise RuntimeError(
                "ulysses_varlen needs torch.nn.attention.varlen (torch>=2.10) and CUDA tensors; use 'ulysses' to fall back."
            )
        return _varlen_kernel
    if kernel == "sdpa":
        return _sdpa_kernel
    if q.is_cuda and q.dtype in _HALF and not single_segment:
        if _flash_varlen_func() is not None:
            return _flash_kernel
        if _torch_varlen() is not None:
            return _varlen_kernel
    return _sdpa_kernel


# ------------------------------------------------------------------------------------------------- the HF function


# A graph break under torch.compile: the varlen kernels take host ints and the all-to-alls are eager collectives, so
# compiled blocks (compile_blocks) fuse what surrounds attention and call this eagerly.
@torch.compiler.disable
def ulysses_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    kernel: str = "auto",
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    sp_group: dist.ProcessGroup | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Packed attention over a sequence split across ``sp_group``, in HF's attention-function contract.

    Causal unless the module (or the ``is_causal`` kwarg) says otherwise: encoders (vision towers) attend both ways
    within each segment.

    ``query`` is ``[B, Hq, S_local, D]`` and ``key``/``value`` ``[B, Hkv, S_local, D]``, already rotated, each rank
    holding its contiguous slice of the sequence. Returns ``([B, S_local, Hq, D], None)``. With sp > 1 the heads
    are exchanged for the sequence (all-to-all), attention runs on the full sequence with ``Hq / sp`` local heads,
    and the result is exchanged back. When ``Hkv`` does not divide by sp, key/value heads are repeated up to
    ``lcm(Hkv, sp)`` (interleaved, so every query head keeps its GQA partner); when ``Hq`` does not, heads are padded
    with zero heads (see :func:`_pad_heads`).
    """
    if attention_mask is not None:
        raise ValueError(
            "Ulysses attention does not take an attention_mask (2D padding or 4D): pack the batch and pass the "
            "segment offsets as cu_seq_lens_q/k (see packed_attention_kwargs), with attention_mask=None."
        )
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    # Packed self-attention: q and k offsets are the same; cu_seq_lens_k only stands in when q's are absent.
    cu_seqlens = cu_seq_lens_q if cu_seq_lens_q is not None else cu_seq_lens_k
    if cu_seqlens is not None and query.shape[0] != 1:
        raise ValueError(f"packed batches (cu_seq_lens_q given) must have batch size 1, got {query.shape[0]}.")

    sp = 1 if sp_group is None else dist.get_world_size(sp_group)
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    if sp > 1:
        if num_heads % sp:
            query, key, value = _pad_heads(query, key, value, sp)
        elif num_kv_heads % sp:
            # Repeat each kv head so the count becomes lcm(Hkv, sp): divisible by sp, and still a divisor of Hq.
            rep = math.lcm(num_kv_heads, sp) // num_kv_heads
            key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)

    if sliding_window is not None and sliding_window >= query.shape[2] * sp:
        sliding_window = None  # the window covers every sequence (e.g. Mistral's 4096): plain causal is cheaper

    # [B, H, S_local, D] -> [B, S_local, H, D] -> (all-to-all) [B, S_full, H/sp, D]
    q, k, v = (seq_to_heads(t.transpose(1, 2), sp_group, seq_dim=1, head_dim=2) for t in (query, key, value))
    max_len = max_length_q if max_length_q is not None else (max_length_k if max_length_k is not None else q.shape[1])
    # Only shapes decide (no device sync): one segment covering each row is a plain causal sequence.
    single_segment = sliding_window is None and (cu_seqlens is None or cu_seqlens.numel() == 2)
    fn = _select_kernel(kernel, q, single_segment)
    out = fn(q, k, v, cu_seqlens, max_len, scaling, dropout, sliding_window, causal)
    # [B, S_full, Hq/sp, D] -> [B, S_local, Hq, D], the layout HF's attention modules expect back.
    out = heads_to_seq(out, sp_group, seq_dim=1, head_dim=2)
    return (out[:, :, :num_heads] if out.shape[2] != num_heads else out), None


def _pad_heads(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sp: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Make ``Hq`` divisible by sp (e.g. SmolLM2's 9 heads at sp=2): one kv head per query head, zero heads appended.

    A zero query against zero keys/values yields a zero output (uniform weights over zero values) and no gradient
    to real heads; the padded heads are sliced off after the exchange back. The cost is ``ceil(Hq/sp)·sp / Hq`` of the
    attention work and un-grouped kv in the all-to-all, so a divisible sp stays the faster choice.
    """
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    if num_kv_heads != num_heads:
        key, value = (t.repeat_interleave(num_heads // num_kv_heads, dim=1) for t in (key, value))
    pad = (-num_heads) % sp
    return tuple(F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (query, key, value))


def _no_dense_mask(*args: Any, **kwargs: Any) -> None:
    """Mask builder for the Ulysses implementations: segment boundaries travel as cu_seq_lens, never as a mask."""
    return None


def register_attention_functions() -> None:
    """Register the ``ulysses*`` attention implementations and their (empty) mask builders with transformers.

    Idempotent; called on import of this module. The attention functions go into the class-wide registry. The mask
    builders go into the shared ``ALL_MASK_ATTENTION_FUNCTIONS`` instance (``__setitem__``) rather than its
    class-wide mapping on purpose: ``masking_utils`` returns no mask straight away for implementations missing from
    the class-wide mapping, whereas a class-wide entry would first run its packed-sequence detection on
    ``position_ids``, whose ``.all()`` forces a host-device sync on every forward. Code that looks the builder up by
    name still finds one that returns ``None``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name, kernel in {**ULYSSES_ATTENTION_NAMES, ENCODER_ATTENTION: "auto"}.items():
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, functools.partial(ulysses_attention, kernel=kernel))
        if name not in ALL_MASK_ATTENTION_FUNCTIONS:
            ALL_MASK_ATTENTION_FUNCTIONS[name] = _no_dense_mask


register_attention_functions()
