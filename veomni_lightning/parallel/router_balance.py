"""The MoE load-balancing (router auxiliary) loss over the *global* micro-batch, and the expert-load statistics.

transformers' MoE models define the Switch-style balancing loss (``load_balancing_loss_func``): for a layer with
``E`` experts routing ``T`` tokens to their top-``k``,

    aux = E · Σ_e f_e · P_e,    f_e = c_e / T (tokens routed to expert e, over all k choices),   P_e = S_e / T,

with ``S_e`` the sum over tokens of the router's softmax probability for ``e``. Computed per rank, each rank
balances its own slice; Qwen's MoE work ("global-batch" balancing) computes ``f`` over every token processed at once.
Here ``c_e`` and ``T`` are summed over the ``loss`` view (dp × sp: all ranks of one accumulation step's
micro-batches), so the value is that of one process running the union of those micro-batches, whatever the layout.

``c`` comes from a top-k and carries no gradient, so ``aux = E/T² · Σ_e c_e · S_e`` is linear in the per-token
probabilities: each rank returns its share ``E/T² · Σ_e c_e · s_e`` (``s``: its own tokens' probability sums).
The shares sum to ``aux``, and the gradient reduction (a sum over dp × sp) gives ``aux``'s gradient. Layers are
averaged (transformers concatenates the layers' logits instead, which mixes layers' counts; per layer is the Switch
definition and the same at one layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from veomni_lightning.parallel.reductions import all_reduce_sum

__all__ = ["global_balance_loss", "router_statistics"]


def router_statistics(
    router_logits: Sequence[torch.Tensor], top_k: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer and expert: tokens routed (``[L, E]``, no gradient) and summed router probabilities (``[L, E]``).

    ``router_logits``: one ``[tokens, E]`` tensor per MoE layer (the model's ``output_router_logits``); ``valid``:
    a ``[tokens]`` bool mask of real tokens (padding is routed but not counted), ``None`` for all.
    """
    logits = torch.stack([x.reshape(-1, x.shape[-1]) for x in router_logits])  # [L, T, E]
    layers, tokens, experts = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    weight = torch.ones(tokens, device=probs.device) if valid is None else valid.reshape(-1).to(probs.dtype)
    chosen = probs.detach().topk(top_k, dim=-1).indices.reshape(layers, -1)  # [L, T·k]
    counts = torch.zeros(layers, experts, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(1, chosen, weight.repeat_interleave(top_k).expand(layers, -1))
    prob_sums = (probs * weight[None, :, None]).sum(dim=1)
    return counts, prob_sums


def global_balance_loss(
    router_logits: Sequence[torch.Tensor],
    top_k: int,
    valid: torch.Tensor | None,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global-batch balancing loss, and the global tokens per expert ``[L, E]``.

    One all-reduce over ``group`` (the ``loss`` view) of the counts and the token total; the shares of all ranks of
    ``group`` sum to the loss of the union of their tokens (see the module docstring).
    """
    counts, prob_sums = router_statistics(router_logits, top_k, valid)
    layers, experts = counts.shape
    tokens = counts.sum(dim=1, keepdim=True)[:1] / top_k  # every real token is routed k times
    stats = torch.cat([counts.flatten(), tokens.flatten()]).double()
    all_reduce_sum(stats, group)
    global_counts = stats[:-1].view(layers, experts).float()
    total = stats[-1].clamp_min(1.0).float()
    share = experts / (layers * total**2) * (global_counts * prob_sums).sum()
    return share, global_counts
