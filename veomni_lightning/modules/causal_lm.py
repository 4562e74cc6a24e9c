"""``CausalLMModule``: train any transformers decoder (``AutoModelForCausalLM``) with FSDP2 + Ulysses SP.

A short family module on :class:`~veomni_lightning.modules.base.TrainingModule`: it builds the decoder inside
``CausalLMWithLoss`` (fused linear cross-entropy on the lm_head), cuts each packed micro-batch for its SP rank, and
returns one named loss, ``loss``: the summed token cross-entropy, averaged over the loss tokens of the global batch.
A mixture-of-experts model gets a second one, ``aux``: the router's load-balancing loss over the global micro-batch
(``veomni_lightning.parallel.router_balance``), and logs the load of its experts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from veomni_lightning.errors import ConfigError
from veomni_lightning.models import (
    TransformersAdapter,
    build_model_on_meta,
    model_config_and_weights,
)
from veomni_lightning.models.adapters import find_experts
from veomni_lightning.models.causal_lm import CausalLMWithLoss, check_supported_causal_lm
from veomni_lightning.modules.base import Backbone, StepResult, TrainingModule
from veomni_lightning.modules.metrics import (
    attention_length,
    count_parameters,
    expert_load_metrics,
    flops_per_token,
    inactive_expert_parameters,
    input_embedding_parameters,
)
from veomni_lightning.parallel.attention import packed_attention_kwargs
from veomni_lightning.parallel.router_balance import global_balance_loss
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
        router_aux_loss_coef: MoE models only: the weight of ``aux``, the load-balancing loss computed over the global
            micro-batch (all dp × sp ranks' micro-batches of one accumulation step). ``None``: the model config's
            ``router_aux_loss_coef`` when its ``output_router_logits`` is true, else 0 (transformers' behaviour: the
            loss is then only logged).
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
        router_aux_loss_coef: float | None = None,
        **training: Any,
    ) -> None:
        super().__init__(**training)
        self._router_top_k = 0  # experts per token of a MoE model; 0 for a dense one
        self._expert_load: torch.Tensor | None = None  # [layers, experts] tokens routed since the last logging step
        self._expert_load_steps = 0

    def build_model(self) -> tuple[nn.Module, list[Backbone]]:
        hp = self.hparams
        config, weights = model_config_and_weights(
            hp.model, pretrained=hp.pretrained, overrides=hp.config_overrides, gguf_file=hp.gguf_file
        )
        check_supported_causal_lm(config)
        text = getattr(config, "text_config", config)
        heads = text.num_attention_heads
        self.parallel_mesh.dims.validate_attention(heads, getattr(text, "num_key_value_heads", None) or heads)
        hf_model = build_model_on_meta(config, attn_implementation=hp.attn_implementation, dtype=torch.float32)
        root = CausalLMWithLoss(hf_model, ce_chunk_size=hp.ce_chunk_size)
        if find_experts(hf_model):
            self._declare_balance_loss(text)
        return root, [Backbone(hf_model, TransformersAdapter(), weights)]

    def _declare_balance_loss(self, config: Any) -> None:
        top_k = getattr(config, "num_experts_per_tok", None)
        if not top_k:
            raise ConfigError(
                f"{config.model_type} has experts but no num_experts_per_tok in its config: the balancing loss needs "
                "the number of experts each token is routed to."
            )
        coef = self.hparams.router_aux_loss_coef
        if coef is None:
            coef = (
                getattr(config, "router_aux_loss_coef", 0.0) if getattr(config, "output_router_logits", False) else 0.0
            )
        self._router_top_k = int(top_k)
        self.add_loss("aux", float(coef))

    def loss_counts(self, micro_batch: dict[str, Any]) -> dict[str, float]:
        counts = {"loss": micro_batch["num_loss_tokens"]}
        if self._router_top_k:
            # ``aux`` is the mean over the step's global micro-batches: each dp rank counts its share of one.
            counts["aux"] = 1.0 / self.parallel_mesh.dp_size
        return counts

    def loss_sums(self, micro_batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Summed token loss of this rank's share of one packed micro-batch (the SP cut happens here, visibly)."""
        mesh = self.parallel_mesh
        local = shard_packed_batch(micro_batch, mesh.sp_rank, mesh.sp_size)
        attention_kwargs = packed_attention_kwargs(local["cu_seqlens"], local["max_seqlen"], mesh.sp_group)
        inputs = dict(input_ids=local["input_ids"], labels=local["labels"], position_ids=local["position_ids"])
        if not self._router_top_k:
            return {"loss": self.model(**inputs, **attention_kwargs)}
        loss, router_logits = self.model(**inputs, output_router_logits=True, **attention_kwargs)
        aux, tokens_per_expert = global_balance_loss(
            router_logits, self._router_top_k, _real_tokens(local, micro_batch, mesh.sp_rank), mesh.loss_group
        )
        if self.training:
            load = tokens_per_expert.detach()
            self._expert_load = load if self._expert_load is None else self._expert_load + load
        return {"loss": loss, "aux": aux}

    def run_step(self, step_batch: list[dict[str, Any]], **loop: Any) -> StepResult:
        result = super().run_step(step_batch, **loop)
        self._expert_load_steps += 1
        return result

    def step_metrics(self, result: StepResult) -> dict[str, Any]:
        """The core's metrics, and for MoE models the expert load since the last logging step."""
        metrics = super().step_metrics(result)
        if self._expert_load is not None:
            metrics.update(expert_load_metrics(self._expert_load, self._expert_load_steps))
            self._expert_load, self._expert_load_steps = None, 0
        return metrics

    def flops_per_token(self, micro_batch: dict[str, Any]) -> float:
        hf_model = self.model.hf_model
        return flops_per_token(
            hf_model.config,
            count_parameters(hf_model) - inactive_expert_parameters(self.experts),
            attention_length(micro_batch),
            embedding_params=input_embedding_parameters(hf_model),
            adapter_params=count_parameters(hf_model, trainable_only=True)
            if self.hparams.get("lora") is not None
            else None,
        )

    def export_hf(self, out_dir: str, tokenizer: Any | None = None) -> Any:
        """Write a folder plain ``AutoModelForCausalLM.from_pretrained`` loads (collective: call on every rank)."""
        return super().export_hf(out_dir, tokenizer=tokenizer)


def _real_tokens(local: dict[str, Any], micro_batch: dict[str, Any], sp_rank: int) -> torch.Tensor | None:
    """Mask of this SP rank's positions that hold real tokens (not the packing or SP padding); None: all real."""
    real = micro_batch.get("num_tokens")
    if real is None:
        return None
    length = local["input_ids"].shape[-1]
    positions = torch.arange(length, device=local["input_ids"].device) + sp_rank * length
    return positions < int(real)
