"""MFU accounting: the input-embedding table is left out of 6·P, the lm_head stays in, tied embeddings count once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from veomni_lightning.modules.metrics import count_parameters, flops_per_token, input_embedding_parameters

REPO = Path(__file__).resolve().parent.parent
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
VOCAB, SEQ = 96, 128


def _model(family: str, tied: bool, **shape):
    config = AutoConfig.for_model(family, vocab_size=VOCAB, tie_word_embeddings=tied, **{**TINY, **shape})
    torch.manual_seed(0)
    return config, AutoModelForCausalLM.from_config(config)


def _attention(config) -> float:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 12.0 * config.num_hidden_layers * config.num_attention_heads * head_dim * SEQ


def test_tied_qwen3_counts_the_shared_matrix_once_as_the_lm_head():
    config, model = _model("qwen3", tied=True, head_dim=8)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert input_embedding_parameters(model) == 0
    n = count_parameters(model)
    assert n == sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name) + VOCAB * 32
    assert flops_per_token(config, n, SEQ, input_embedding_parameters(model)) == 6.0 * n + _attention(config)


def test_untied_llama_leaves_out_the_input_embedding_table_only():
    config, model = _model("llama", tied=False)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    embedding = input_embedding_parameters(model)
    assert embedding == VOCAB * config.hidden_size
    n = count_parameters(model)
    without_embedding = sum(p.numel() for name, p in model.named_parameters() if name != "model.embed_tokens.weight")
    assert n - embedding == without_embedding  # the lm_head (vocab × hidden as well) stays in
    assert flops_per_token(config, n, SEQ, embedding) == 6.0 * without_embedding + _attention(config)
    assert flops_per_token(config, n, SEQ) - flops_per_token(config, n, SEQ, embedding) == 6.0 * embedding


def test_bench_counts_and_recomputed_qwen3_8b_mfu(monkeypatch):
    """The bench reports E from the model it trained, and the committed 8B table is rescored by the new rule."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import text_throughput
    import text_workers

    _, model = _model("llama", tied=False)
    n = count_parameters(model)
    assert text_workers._sizes(model) == {"n_params": n, "embedding_params": VOCAB * 32, "adapter_params": n}
    assert text_throughput.shape_parameters("qwen3-8b") == (8_190_735_360, 151_936 * 4096)
    assert text_throughput.shape_parameters("qwen3-1.7b")[1] == 0  # tied: unchanged by the rule
    result = REPO / "bench" / "results" / "issue3" / "h200x2_8b_8k.json"
    measured = {r["run"]: r["mfu"] for r in json.loads(result.read_text())["rows"]}
    rescored = {r["run"]: r["mfu"] for r in text_throughput.rescored(result)["rows"]}
    assert round(100 * measured["c"], 1) == 57.8 and round(100 * rescored["c"], 1) == 54.4
    for run, old in measured.items():
        assert rescored[run] == pytest.approx(old * 0.9413, rel=1e-4)  # 1 − 6E / (6P + 12·L·H·D·S) at 8k


def test_moe_flops_count_active_experts_only():
    # Qwen3-MoE: 4 experts of which 2 are used per token; each experts module holds 4 × (2·I·H + H·I) weights.
    from transformers import AutoModelForCausalLM

    from veomni_lightning.models.adapters import TransformersAdapter
    from veomni_lightning.models.source import config_from_model_type
    from veomni_lightning.modules.metrics import count_parameters, inactive_expert_parameters

    overrides = dict(
        hidden_size=16,
        moe_intermediate_size=8,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=32,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config_from_model_type("qwen3_moe", overrides=overrides))
    experts = TransformersAdapter().experts(model)
    assert len(experts) == 2
    per_layer = 4 * (2 * 8 * 16 + 16 * 8)
    assert inactive_expert_parameters(experts) == 2 * per_layer // 2
    assert count_parameters(model) - inactive_expert_parameters(experts) < count_parameters(model)


def test_attention_length_of_packed_micro_batches():
    """Packed samples attend within themselves: S = Σ s_i² / T, the padding segment left out."""
    from veomni_lightning.modules.metrics import attention_length

    ids = torch.zeros(1, 16, dtype=torch.long)
    packed = {"input_ids": ids, "cu_seqlens": torch.tensor([0, 4, 10, 16], dtype=torch.int32), "num_tokens": 10}
    assert attention_length(packed) == (4 * 4 + 6 * 6) / 16
    full = {"input_ids": ids, "cu_seqlens": torch.tensor([0, 16], dtype=torch.int32), "num_tokens": 16}
    assert attention_length(full) == 16 == attention_length({"input_ids": ids})


def test_lora_flops_count_frozen_weights_without_their_weight_gradient():
    """LoRA: frozen weights do forward + input-gradient matmuls (4 per parameter per token), adapters 6."""
    from veomni_lightning.models.lora import add_lora

    config, model = _model("llama", tied=False)
    frozen = count_parameters(model)
    add_lora(model, {"r": 4, "target_modules": "all-linear"})
    adapters = count_parameters(model, trainable_only=True)
    assert adapters == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) > 0
    assert count_parameters(model) == frozen + adapters
    embedding = input_embedding_parameters(model)
    got = flops_per_token(config, count_parameters(model), SEQ, embedding, adapter_params=adapters)
    assert got == 4.0 * (frozen - embedding) + 6.0 * adapters + _attention(config)
