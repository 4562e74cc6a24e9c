"""Throughput and model-FLOPs-utilisation (MFU) accounting.

MFU formula (the one quoted in the README and the benchmark tables)::

    flops_per_token = 6 · (P − E) + 12 · L · H · D · S
    MFU             = flops_per_token · tokens_per_second_per_gpu / peak_flops_per_gpu

with P the parameter count, E the input-embedding table (a lookup, no matmul: it costs no FLOPs) — except when the
embeddings are tied to the lm_head, where the one shared matrix is counted once, as the lm_head, and E = 0 —, L
layers, H attention heads, D head dim, S the attention length per token: for a micro-batch of packed samples of
lengths s_i in T tokens, ``S = Σ s_i² / T`` (each sample attends within itself; the padding segment is left out;
one unpacked sequence gives S = T), and the peak the GPU's dense bf16 throughput (989 TFLOP/s for H100/H200 SXM). The attention term counts full
(non-causal) attention, as the PaLM/Megatron convention does. MoE families count active experts only: P leaves out
the ``1 − k/E`` share of every expert weight that a token does not use (k experts per token of E; the router and
any shared experts stay in P); families with encoders add their encoder FLOPs and state the formula.

LoRA (frozen base, trained adapters of A parameters): a frozen weight does its forward and input-gradient matmuls
but no weight gradient, so ``flops_per_token = 4 · (P − A − E) + 6 · A + 12 · L · H · D · S``.
"""

from __future__ import annotations

import time

import torch
from torch import nn

__all__ = [
    "count_parameters",
    "inactive_expert_parameters",
    "input_embedding_parameters",
    "flops_per_token",
    "weight_flops",
    "attention_length",
    "device_peak_tflops",
    "ThroughputMeter",
    "expert_load_metrics",
]

_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Global number of parameters (sharded DTensors count their full size; shared tensors count once); with
    ``trainable_only`` those with ``requires_grad``."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen and (p.requires_grad or not trainable_only):
            seen.add(id(p))
            total += p.numel()
    return total


def inactive_expert_parameters(experts: list[nn.Module]) -> int:
    """Expert parameters a token does not use: ``(1 − k/E)`` of each experts module's per-expert weights.

    ``experts`` are the MoE experts modules (``num_experts`` = E; ``config.num_experts_per_tok`` = k); sharded
    DTensors count their full size.
    """
    inactive = 0.0
    for module in experts:
        num_experts = int(module.num_experts)
        top_k = int(module.config.num_experts_per_tok)
        per_expert = sum(p.numel() for p in module.parameters(recurse=False) if p.ndim and p.shape[0] == num_experts)
        inactive += per_expert * (1 - top_k / num_experts)
    return int(round(inactive))


def input_embedding_parameters(model: nn.Module) -> int:
    """Size of the input-embedding table that MFU leaves out: 0 when it is tied to the output projection.

    ``model`` is a transformers model (``get_input_embeddings`` / ``get_output_embeddings``); a sharded DTensor
    counts its full size.
    """
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embed is None:
        return 0
    if head is not None and head.weight is embed.weight:
        return 0
    return embed.weight.numel()


def flops_per_token(
    config, num_params: int, seq_len: int, embedding_params: int = 0, adapter_params: int | None = None
) -> float:
    """Training FLOPs per token by the formula in this module's docstring.

    ``num_params`` counts every parameter once; ``embedding_params`` is the untied input-embedding table
    (:func:`input_embedding_parameters`), which is subtracted. ``adapter_params`` (LoRA: the trained adapters, all
    other weights frozen) switches to the LoRA formula.
    """
    text = getattr(config, "text_config", config)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    attention = 12.0 * text.num_hidden_layers * heads * head_dim * seq_len
    if adapter_params is None:
        return 6.0 * (num_params - embedding_params) + attention
    return 4.0 * (num_params - adapter_params - embedding_params) + 6.0 * adapter_params + attention


def weight_flops(module: nn.Module, lora: bool = False) -> float:
    """Training FLOPs per input row (token, patch, frame) of ``module``'s weights: ``6·P``, or with LoRA (the
    adapters the only trained parameters) ``4·(P − A) + 6·A``, as in this module's docstring."""
    total = count_parameters(module)
    if not lora:
        return 6.0 * total
    adapters = count_parameters(module, trainable_only=True)
    return 4.0 * (total - adapters) + 6.0 * adapters


def attention_length(micro_batch: dict) -> float:
    """``S = Σ s_i² / T`` of a packed micro-batch (see the module doc): from its ``cu_seqlens`` (one device read the
    first time MFU is computed) and ``num_tokens``; ``T`` when the micro-batch carries no segments."""
    total = micro_batch["input_ids"].shape[-1]
    cu = micro_batch.get("cu_seqlens")
    if cu is None:
        return float(total)
    lengths = [int(b - a) for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:])]
    real = int(micro_batch.get("num_tokens", total))
    if real < total and lengths and sum(lengths[:-1]) == real:
        lengths = lengths[:-1]  # the trailing padding segment does no useful work
    return sum(n * n for n in lengths) / total


def device_peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known GPU, else None (then MFU is not logged)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def expert_load_metrics(tokens_per_expert: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """Per MoE layer: tokens per expert per step (min, max) and max ÷ mean (1 = perfectly balanced).

    ``tokens_per_expert``: ``[layers, experts]`` routed-token counts summed over ``steps`` steps (global counts, the
    same on every rank). Metric names: ``moe/layer_{i}/tokens_min``, ``.../tokens_max``, ``.../max_over_mean``, and
    ``moe/max_over_mean``, the worst layer's.
    """
    per_step = tokens_per_expert.float() / max(steps, 1)
    ratio = per_step.max(dim=1).values / per_step.mean(dim=1).clamp_min(1e-9)
    metrics = {"moe/max_over_mean": ratio.max()}
    for i, (counts, r) in enumerate(zip(per_step, ratio)):
        metrics[f"moe/layer_{i}/tokens_min"] = counts.min()
        metrics[f"moe/layer_{i}/tokens_max"] = counts.max()
        metrics[f"moe/layer_{i}/max_over_mean"] = r
    return metrics


class ThroughputMeter:
    """Tokens per second over a window of steps, synchronising the device only when a value is read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._tokens = 0
        self._start: float | None = None

    def add(self, tokens: int) -> None:
        """Record the tokens of a step that just finished; the first call only starts the clock (warm-up)."""
        if self._start is None:
            self._sync()
            self._start = time.perf_counter()
            return
        self._tokens += tokens

    def read(self) -> float | None:
        """Tokens/s since the last read (None before the first full window); starts a new window."""
        if self._start is None or self._tokens == 0:
            return None
        self._sync()
        now = time.perf_counter()
        rate = self._tokens / max(now - self._start, 1e-9)
        self._tokens, self._start = 0, now
        return rate

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
