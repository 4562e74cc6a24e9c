"""Expert parallelism as a transformers experts implementation: ``config._experts_implementation = "ep"``.

transformers' MoE families (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3, ...) store their experts as fused 3-D
tensors (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) in a module decorated with
``@use_experts_implementation``, whose forward dispatches through ``ExpertsInterface`` by the config's
``_experts_implementation``. Registering :func:`ep_experts_forward` there under ``"ep"`` gives every such family expert
parallelism without touching its modeling code, as ``AttentionInterface`` gave it sequence parallelism.

Under EP the experts module holds its ``E / ep`` local experts (its parameters are DTensors sharded on the expert dim
over the ``ep`` mesh, see :func:`shard_experts`) and knows its group (``module.ep_group``, set by the same function:
state on the module, no globals). A forward:

1. sorts this rank's (token, expert) pairs by expert and counts them per expert;
2. exchanges the counts (one ``all_to_all_single``), reads them on the host (the one host sync per MoE layer that
   variable splits need), and sends each token to the rank owning its expert (``all_to_all_single`` with variable
   splits, autograd-aware);
3. regroups what arrived by local expert and computes the experts (grouped GEMM on CUDA in bf16, an exact loop over
   the local experts elsewhere);
4. sends results back to their owners, restores the original order and sums the top-k outputs with the routing
   weights, on the rank that routed them (so the router's gradient stays local).

No token is dropped (no capacity factor). Without an EP group (``ep=1``) the same grouping runs on all experts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["EXPERTS_IMPLEMENTATION", "ep_experts_forward", "grouped_linear", "register_experts_implementation"]

#: The name under which :func:`ep_experts_forward` is registered in transformers' ``ExpertsInterface``.
EXPERTS_IMPLEMENTATION = "ep"


def _local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's experts of an expert-sharded weight (a DTensor on the ep mesh), or the weight itself."""
    # An isinstance check, not getattr(weight, "to_local"): Dynamo traces the former (compiled blocks) but resolves
    # the getattr of a parameter to None and leaves the DTensor in the graph.
    return weight.to_local() if isinstance(weight, DTensor) else weight


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: list[int] | torch.Tensor) -> torch.Tensor:
    """``y[rows of expert j] = x[rows of expert j] @ weight[j].T`` for rows grouped by expert, ``counts[j]`` each.

    bf16 on CUDA runs one grouped GEMM (``torch._grouped_mm``), reading device-side ``counts`` without a host sync;
    elsewhere an exact loop over the experts.
    """
    if x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        counts = torch.as_tensor(counts, device=x.device)
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=counts.cumsum(0, dtype=torch.int32))
    if isinstance(counts, torch.Tensor):
        counts = counts.tolist()
    pieces, start = [], 0
    for j, n in enumerate(counts):
        pieces.append(x[start : start + n] @ weight[j].transpose(0, 1))
        start += n
    return torch.cat(pieces) if pieces else x.new_zeros(0, weight.shape[-2])


class _VariableAllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable splits; its adjoint is the exchange with the splits swapped."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(
            out, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv, group=ctx.group
        )
        return out, None, None, None


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


def ep_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts of a transformers MoE layer over the EP group ``self.ep_group`` (see the module docstring)."""
    group = getattr(self, "ep_group", None)
    num_experts = self.num_experts  # global count; under EP the weights hold num_experts / ep of them
    num_tokens, top_k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    routed = hidden_states[order // top_k]
    counts = torch.bincount(expert_ids, minlength=num_experts)
    if group is None:  # all experts here: group the rows and compute them (no host sync on the grouped-GEMM path)
        h = grouped_linear(routed, _local(self.gate_up_proj), counts)
        h = grouped_linear(self._apply_gate(h), _local(self.down_proj), counts)
        return _combine(h[_inverse(order)], top_k_weights, num_tokens, hidden_states.dtype)
    ep = dist.get_world_size(group)
    per_rank = num_experts // ep
    # counts_in[s * per_rank + j]: tokens rank s sends to this rank's local expert j.
    counts_in = torch.empty_like(counts)
    dist.all_to_all_single(counts_in, counts, group=group)
    both = torch.cat([counts, counts_in]).tolist()  # the one host sync of the layer
    counts_out, counts_in_host = both[:num_experts], both[num_experts:]
    send = [sum(counts_out[r * per_rank : (r + 1) * per_rank]) for r in range(ep)]
    recv = [sum(counts_in_host[s * per_rank : (s + 1) * per_rank]) for s in range(ep)]
    received = _VariableAllToAll.apply(routed, send, recv, group)

    # What arrived is ordered by source rank, then local expert: regroup by local expert.
    local_ids = torch.arange(per_rank, device=received.device).repeat(ep)
    local_ids = torch.repeat_interleave(local_ids, torch.tensor(counts_in_host, device=received.device))
    regroup = torch.argsort(local_ids, stable=True)
    per_expert = [sum(counts_in_host[s * per_rank + j] for s in range(ep)) for j in range(per_rank)]
    h = grouped_linear(received[regroup], _local(self.gate_up_proj), per_expert)
    h = grouped_linear(self._apply_gate(h), _local(self.down_proj), per_expert)
    returned = _VariableAllToAll.apply(h[_inverse(regroup)], recv, send, group)

    return _combine(returned[_inverse(order)], top_k_weights, num_tokens, hidden_states.dtype)


def _combine(out: torch.Tensor, top_k_weights: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Weight each (token, choice) row by its routing weight and sum a token's top-k rows (rows in flat order)."""
    out = out * top_k_weights.reshape(-1, 1).to(out.dtype)
    return out.view(num_tokens, top_k_weights.shape[-1], -1).sum(dim=1).to(dtype)


def register_experts_implementation() -> None:
    """Register :func:`ep_experts_forward` in transformers' ``ExpertsInterface`` as ``"ep"`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, ep_experts_forward)
