"""``CausalLMModule``: train any transformers decoder (``AutoModelForCausalLM``) with FSDP2 + Ulysses SP.

A short family module on :class:`~veomni_lightning.modules.base.TrainingModule`: it builds the decoder inside
``CausalLMWithLoss`` (fused linear cross-entropy on the lm_head), cuts each packed micro-batch for its SP rank, and
returns one named loss, ``loss``: the summed token cross-entropy, averaged over the loss tokens of the global batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from veomni_lightning.models import (
    TransformersAdapter,
    build_model_on_meta,
    config_from_model_type,
    is_model_type,
    load_config,
    resolve_model_source,
)
from veomni_lightning.models.causal_lm import CausalLMWithLoss, check_supported_causal_lm
from veomni_lightning.modules.base import Backbone, TrainingModule
from veomni_lightning.modules.metrics import (
    count_parameters,
    flops_per_token,
    inactive_expert_parameters,
    input_embedding_parameters,
)
from veomni_lightning.parallel.attention import packed_attention_kwargs
from veomni_lightning.parallel.sequence import shard_packed_batch

__all__ = ["CausalLMModule"]


class CausalLMModule(TrainingModule):
    """Causal-LM pre-training / SFT for any HF decoder, random init from a config or pretrained weights.

    Args:
        model: local HF folder, ``package:<pkg>/<file.gguf>``, a ``.gguf`` path, a hub id (needs network), or, with
            ``pretrained=False``, a transformers model type such as ``qwen3`` (shape from ``config_overrides``).
        gguf_file: GGUF file name inside ``model`` when ``model`` is a folder.
        pretrained: load the weights (True) or random-init from the config (False).
        config_overrides: config fields to change before building (e.g. a tiny ``num_hidden_layers``).
        attn_implementation: an attention registered in transformers; ``ulysses`` (packed varlen + SP) by default.
        ce_chunk_size: tokens per chunk in the fused cross-entropy (peak extra memory: one chunk × vocab logits).
        **training: the training core's settings (learning_rate, warmup_steps, max_grad_norm, ...; see
            :class:`~veomni_lightning.modules.base.TrainingModule`).
    """

    def __init__(
        self,
        model: str,
        *,
        gguf_file: str | None = None,
        pretrained: bool = True,
        config_overrides: dict[str, Any] | None = None,
        attn_implementation: str = "ulysses",
        ce_chunk_size: int = 4096,
        **training: Any,
    ) -> None:
        super().__init__(**training)

    def build_model(self) -> tuple[nn.Module, list[Backbone]]:
        hp = self.hparams
        weights = None
        if not hp.pretrained and is_model_type(hp.model):
            config = config_from_model_type(hp.model, overrides=hp.config_overrides)
        else:
            source = resolve_model_source(hp.model, gguf_file=hp.gguf_file)
            config = load_config(source, overrides=hp.config_overrides)
            if hp.pretrained:
                if not source.has_weights:
                    raise ValueError(
                        f"{hp.model!r} has a config but no safetensors weights. Point model at a folder with weights, "
                        "or set pretrained=false to train from a random init."
                    )
                weights = source.folder
        check_supported_causal_lm(config)
        text = getattr(config, "text_config", config)
        heads = text.num_attention_heads
        self.parallel_mesh.dims.validate_attention(heads, getattr(text, "num_key_value_heads", None) or heads)
        hf_model = build_model_on_meta(config, attn_implementation=hp.attn_implementation, dtype=torch.float32)
        root = CausalLMWithLoss(hf_model, ce_chunk_size=hp.ce_chunk_size)
        return root, [Backbone(hf_model, TransformersAdapter(), weights)]

    def loss_counts(self, micro_batch: dict[str, Any]) -> dict[str, float]:
        return {"loss": micro_batch["num_loss_tokens"]}

    def loss_sums(self, micro_batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Summed token loss of this rank's share of one packed micro-batch (the SP cut happens here, visibly)."""
        mesh = self.parallel_mesh
        local = shard_packed_batch(micro_batch, mesh.sp_rank, mesh.sp_size)
        attention_kwargs = packed_attention_kwargs(local["cu_seqlens"], local["max_seqlen"], mesh.sp_group)
        loss = self.model(
            input_ids=local["input_ids"], labels=local["labels"], position_ids=local["position_ids"], **attention_kwargs
        )
        return {"loss": loss}

    def flops_per_token(self, micro_batch: dict[str, Any]) -> float:
        hf_model = self.model.hf_model
        return flops_per_token(
            hf_model.config,
            count_parameters(hf_model) - inactive_expert_parameters(self.experts),
            micro_batch["input_ids"].shape[-1],
            embedding_params=input_embedding_parameters(hf_model),
        )

    def export_hf(self, out_dir: str, tokenizer: Any | None = None) -> Any:
        """Write a folder plain ``AutoModelForCausalLM.from_pretrained`` loads (collective: call on every rank)."""
        return super().export_hf(out_dir, tokenizer=tokenizer)
