"""Activation checkpointing policies: ``full`` recomputes a block's whole forward in backward, ``selective`` keeps the
matmul and attention outputs and recomputes only the elementwise work. Same gradients either way; the backward of the
selective policy runs no forward matmul again."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from veomni_lightning.models import TransformersAdapter, config_from_model_type
from veomni_lightning.parallel import ParallelConfig
from veomni_lightning.parallel.checkpointing import selective_checkpoint_context

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, vocab_size=100)  # fmt: skip


class CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _backward(policy: str | None) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_from_model_type("qwen3", SHAPE), attn_implementation="sdpa")
    if policy is not None:
        adapter = TransformersAdapter()
        context = selective_checkpoint_context if policy == "selective" else None
        adapter.enable_checkpointing(model, adapter.blocks(model), context_fn=context)
    model.train()
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    with CountMatmuls() as counter:
        loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], counter.count


def test_selective_checkpointing_keeps_gradients_and_recomputes_no_matmul():
    loss, grads, plain = _backward(None)
    for policy in ("full", "selective"):
        got_loss, got_grads, _ = _backward(policy)
        torch.testing.assert_close(got_loss, loss, rtol=0, atol=0)
        for got, want in zip(got_grads, grads):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    full, selective = _backward("full")[2], _backward("selective")[2]
    assert selective == plain < full, (plain, selective, full)


def test_checkpoint_policy_is_validated():
    assert ParallelConfig(activation_checkpointing=True, checkpoint_policy="selective").checkpoint_policy == "selective"
    with pytest.raises(ValueError, match="checkpoint_policy must be 'full' or 'selective'"):
        ParallelConfig(checkpoint_policy="some")


def test_activation_memory_budget_needs_compiled_blocks_and_sets_the_partitioner(monkeypatch):
    import torch._functorch.config as functorch_config

    from veomni_lightning.parallel.fsdp import apply_compile

    with pytest.raises(ValueError, match="set compile_blocks=true"):
        ParallelConfig(activation_memory_budget=0.5)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        ParallelConfig(compile_blocks=True, activation_memory_budget=1.5)
    monkeypatch.setattr(functorch_config, "activation_memory_budget", 1.0)
    block = torch.nn.Linear(4, 4)
    apply_compile([block], ParallelConfig(compile_blocks=True, activation_memory_budget=0.3).activation_memory_budget)
    assert functorch_config.activation_memory_budget == 0.3
