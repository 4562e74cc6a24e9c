"""The global-batch MoE balancing loss: transformers' definition, computed over every rank's tokens at once.

One process: the value equals the mean over layers of transformers' own ``load_balancing_loss_func`` (Qwen3-MoE and
Mixtral router logits, padding masked like its ``attention_mask``). Four processes as dp=2 × sp=2: each rank holds a
quarter of the tokens (two micro-batches, each cut in two sequence slices); the shares summed over the ranks equal the
single-process loss over the union of the tokens, and so do the gradients (summed over the ranks, as FSDP does).
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

from veomni_lightning.parallel.router_balance import global_balance_loss

LAYERS, TOKENS, HIDDEN, EXPERTS, TOP_K = 3, 24, 8, 6, 2  # TOKENS per micro-batch; two micro-batches (dp=2)
FAMILIES = {
    "qwen3_moe": dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}


def _hf_reference(router_logits, top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    experts = router_logits[0].shape[-1]
    per_layer = [load_balancing_loss_func((x,), experts, top_k, mask) for x in router_logits]
    return torch.stack(per_layer).mean()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_single_process_value_is_transformers_loss_per_layer(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        family, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, **FAMILIES[family],
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 100, (1, 40))
    router_logits = model.base_model(input_ids=ids, output_router_logits=True).router_logits
    assert len(router_logits) == 2 and router_logits[0].shape == (40, 4)

    share, counts = global_balance_loss(router_logits, 2, None, None)
    torch.testing.assert_close(share, _hf_reference(router_logits, 2), rtol=1e-5, atol=0)
    assert counts.shape == (2, 4) and counts.sum(dim=1).tolist() == [80.0, 80.0]  # 40 tokens × top-2

    real = torch.arange(40) < 31  # the tail is padding: routed, but not counted
    share, counts = global_balance_loss(router_logits, 2, real, None)
    torch.testing.assert_close(share, _hf_reference(router_logits, 2, real[None].long()), rtol=1e-5, atol=0)
    assert counts.sum(dim=1).tolist() == [62.0, 62.0]


def _union_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of the two micro-batches' tokens ``[2, TOKENS, HIDDEN]``, their real-token mask and a router."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, TOKENS, HIDDEN, generator=g)
    real = torch.ones(2, TOKENS, dtype=torch.bool)
    real[1, -5:] = False  # micro-batch 1 ends in padding
    router = torch.randn(LAYERS, HIDDEN, EXPERTS, generator=g)
    return features, real, router


def _logits(router: torch.Tensor, features: torch.Tensor) -> list[torch.Tensor]:
    return [features @ router[layer] for layer in range(LAYERS)]


def _shares_over_dp2_sp2(rank: int, world: int) -> dict:
    from veomni_lightning.parallel import ParallelDims

    mesh = ParallelDims(world_size=world, sp=2).build_mesh("cpu")
    features, real, router = _union_inputs()
    router.requires_grad_(True)
    half = TOKENS // 2
    mine = slice(mesh.sp_rank * half, (mesh.sp_rank + 1) * half)  # this SP rank's slice of its micro-batch
    share, counts = global_balance_loss(
        _logits(router, features[mesh.dp_rank, mine]), TOP_K, real[mesh.dp_rank, mine], mesh.loss_group
    )
    share.backward()
    return {"share": share.detach(), "grad": router.grad, "counts": counts}


@pytest.mark.timeout(120)
def test_shares_under_dp2_sp2_sum_to_the_single_process_loss_of_the_union():
    results = run_distributed(_shares_over_dp2_sp2, 4, timeout=90)
    features, real, router = _union_inputs()
    router.requires_grad_(True)
    union = features.reshape(-1, HIDDEN)
    expected = _hf_reference(_logits(router, union), TOP_K, real.reshape(1, -1).long())
    expected.backward()
    reference, _ = global_balance_loss(_logits(router.detach(), union), TOP_K, real.reshape(-1), None)

    total = sum(r["share"] for r in results)
    torch.testing.assert_close(total, expected.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(total, reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(sum(r["grad"] for r in results), router.grad, rtol=1e-4, atol=1e-7)
    for r in results:  # every rank sees the global tokens per expert
        torch.testing.assert_close(r["counts"], results[0]["counts"])
    assert results[0]["counts"].sum().item() == LAYERS * TOP_K * int(real.sum())
    # Each rank balancing its own slice would give another value: the global statistics matter here.
    local_only = sum(
        global_balance_loss(_logits(router.detach(), features[d, s]), TOP_K, real[d, s], None)[0] / 4
        for d in range(2)
        for s in (slice(0, TOKENS // 2), slice(TOKENS // 2, TOKENS))
    )
    assert abs(local_only - total) > 1e-3
