"""``VLMModule``: train transformers image-text-to-text models (Qwen2.5-VL, Qwen3-VL) with FSDP2 + Ulysses SP.

A family module on :class:`~veomni_lightning.modules.base.TrainingModule`. The model is built from its folder's config
with ``AutoModelForImageTextToText`` (random init, or the folder's weights streamed in); the FSDP blocks are the
decoder layers and the vision blocks (transformers' ``_no_split_modules``). One named loss, ``loss``: token
cross-entropy over the assistant tokens of the global batch. Data: :class:`~veomni_lightning.data.VLMDataModule`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from veomni_lightning.errors import ConfigError
from veomni_lightning.models import TransformersAdapter, build_model_on_meta, model_config_and_weights
from veomni_lightning.models.vision_language import VisionLanguageAdapter, VisionLanguageWithLoss
from veomni_lightning.modules.base import Backbone, TrainingModule
from veomni_lightning.modules.metrics import (
    attention_length,
    count_parameters,
    flops_per_token,
    input_embedding_parameters,
    weight_flops,
)
from veomni_lightning.parallel.attention import ENCODER_ATTENTION
from veomni_lightning.parallel.reductions import split_groups

__all__ = ["VLMModule"]


class VLMModule(TrainingModule):
    """Vision-language SFT for Qwen-VL style models (image + video), from a random init or pretrained weights.

    Args:
        model: the model folder (``config.json``, weights unless ``pretrained=False``, the processor files).
        pretrained: load the folder's weights (True) or random-init from its config (False).
        config_overrides: config fields to change before building.
        attn_implementation: the language model's attention (``ulysses``: packed varlen + SP); the vision tower
            uses the bidirectional Ulysses function (packed over its images, its patches split over the SP ranks).
        ce_chunk_size: tokens per chunk in the fused cross-entropy.
        freeze_vision: keep the vision tower's blocks and patch embedding fixed (no gradient, not in the optimizer).
        freeze_projector: keep the projector (the merger into the LM width) fixed.
        vision_lr: learning rate of the trainable vision tower and projector (default: ``learning_rate``).
        **training: the training core's settings (see :class:`~veomni_lightning.modules.base.TrainingModule`).
    """

    def __init__(
        self,
        model: str,
        *,
        pretrained: bool = True,
        config_overrides: dict[str, Any] | None = None,
        attn_implementation: str = "ulysses",
        ce_chunk_size: int = 4096,
        freeze_vision: bool = False,
        freeze_projector: bool = False,
        vision_lr: float | None = None,
        **training: Any,
    ) -> None:
        super().__init__(**training)
        if vision_lr is not None and not vision_lr > 0:
            raise ConfigError(f"vision_lr must be a positive number, got {vision_lr!r}.")
        self.adapter = VisionLanguageAdapter()

    def build_model(self) -> tuple[nn.Module, list[Backbone]]:
        from transformers import AutoModelForImageTextToText

        hp = self.hparams
        config, weights = model_config_and_weights(hp.model, pretrained=hp.pretrained, overrides=hp.config_overrides)
        config = self.select_config(config)
        text = config.text_config
        self.parallel_mesh.dims.validate_attention(text.num_attention_heads, text.num_key_value_heads)
        encoder_configs = [key for key in ("vision_config", "audio_config") if hasattr(config, key)]
        sp = self.parallel_mesh.sp_size
        for key in encoder_configs:
            heads = _attention_heads(getattr(config, key))
            if sp > 1 and heads % sp:
                raise ConfigError(
                    f"sp_size={sp} does not divide the {key.removesuffix('_config')} tower's {heads} attention heads. "
                    "Fix: an sp_size dividing it."
                )
        attention = {"text_config": hp.attn_implementation, **dict.fromkeys(encoder_configs, "sdpa")}
        hf_model = build_model_on_meta(
            config, attn_implementation=attention, dtype=torch.float32, auto_class=AutoModelForImageTextToText
        )
        # Set after building: transformers vets names containing "flash" against flash-attn kernels at build time,
        # and its Qwen-VL vision and Qwen-Omni audio attention pass the packed cu_seqlens only to such names (see
        # ENCODER_ATTENTION).
        for tower in self.adapter.encoders(hf_model):
            tower.config._attn_implementation = ENCODER_ATTENTION
        self._freeze(hf_model)
        # Always hooked: besides the SP split, the hook keeps the rotary dtype stable under checkpointing.
        self.adapter.split_for_sequence_parallel(hf_model, self.parallel_mesh.sp_group)
        root = VisionLanguageWithLoss(hf_model, self.adapter, ce_chunk_size=hp.ce_chunk_size)
        return root, [Backbone(hf_model, TransformersAdapter(), weights)]

    def select_config(self, config: Any) -> Any:
        """The config of the model to train, checked: a vision-language one (it has a ``vision_config``)."""
        if not hasattr(config, "vision_config"):
            raise ConfigError(
                f"{self.hparams.model!r} is a {config.model_type} model, not a vision-language one: use CausalLMModule."
            )
        return config

    def _freeze(self, hf_model: nn.Module) -> None:
        tower = self.adapter.vision_tower(hf_model)
        projector = {id(p) for m in self.adapter.projector_modules(hf_model) for p in m.parameters()}
        for p in tower.parameters():
            is_projector = id(p) in projector
            if (is_projector and self.hparams.freeze_projector) or (not is_projector and self.hparams.freeze_vision):
                p.requires_grad_(False)

    def tower_learning_rates(self, hf_model: nn.Module) -> list[tuple[nn.Module, float | None]]:
        """The encoders that may train at their own learning rate (None: ``learning_rate``): the vision tower."""
        return [(self.adapter.vision_tower(hf_model), self.hparams.vision_lr)]

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters only; each encoder (and its projector) at its own learning rate when given."""
        groups = super().param_groups()
        lr_of = {id(p): lr for tower, lr in self.tower_learning_rates(self.model.hf_model) if lr is not None
                 for p in tower.parameters()}  # fmt: skip
        if not lr_of:
            return groups
        split = split_groups(groups, key=lambda p: lr_of.get(id(p)))
        return [{**g, "lr": lr_of[id(g["params"][0])]} if id(g["params"][0]) in lr_of else g for g in split]

    def loss_counts(self, micro_batch: dict[str, Any]) -> dict[str, float]:
        return {"loss": micro_batch["num_loss_tokens"]}

    def loss_sums(self, micro_batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        mesh = self.parallel_mesh
        return {"loss": self.model(micro_batch, mesh.sp_rank, mesh.sp_size, mesh.sp_group)}

    def flops_per_token(self, micro_batch: dict[str, Any]) -> float:
        """Training FLOPs per token of the language model plus the vision tower's share.

        ``6·(P_lm − E) + 12·L·H·D·S`` (the text formula, ``modules/metrics.py``) ``+ 6·P_vision·N / T`` with ``N``
        vision patches and ``T`` tokens of the micro-batch (the tower's attention FLOPs are left out); with LoRA the
        frozen weights count 4 instead of 6 (no weight gradient). Measured on
        the first micro-batch, so the logged MFU is approximate when the share of pictures varies.
        """
        hf_model = self.model.hf_model
        decoder = self.adapter.language_model(hf_model)
        tokens = micro_batch["input_ids"].shape[-1]
        lora = self.hparams.get("lora") is not None  # frozen weights skip their weight gradient (modules/metrics.py)
        trained = count_parameters(decoder, trainable_only=True) + count_parameters(
            hf_model.lm_head, trainable_only=True
        )
        language = flops_per_token(
            hf_model.config.text_config,
            count_parameters(decoder) + count_parameters(hf_model.lm_head),
            attention_length(micro_batch),
            embedding_params=input_embedding_parameters(hf_model),
            adapter_params=trained if lora else None,
        )
        patches = sum(micro_batch[k].shape[0] for k in ("pixel_values", "pixel_values_videos") if k in micro_batch)
        return (
            language
            + weight_flops(self.adapter.vision_tower(hf_model), lora) * patches / tokens
            + (self.encoder_flops(micro_batch) / tokens)
        )

    def encoder_flops(self, micro_batch: dict[str, Any]) -> float:
        """Training FLOPs of further encoders on the micro-batch (none for a vision-language model)."""
        return 0.0

    def export_hf(self, out_dir: str, processor: Any | None = None, tokenizer: Any | None = None) -> Any:
        """Write a folder ``AutoModelForImageTextToText.from_pretrained`` loads, with the processor (or tokenizer)
        saved beside it (collective: every rank calls it)."""
        return super().export_hf(out_dir, tokenizer=processor if processor is not None else tokenizer)


def _attention_heads(config: Any) -> int:
    """An encoder config's attention heads (vision configs call them ``num_heads``, Whisper-style audio configs
    ``encoder_attention_heads``)."""
    for name in ("num_heads", "encoder_attention_heads", "num_attention_heads"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ConfigError(f"{type(config).__name__} names no attention head count: not a supported encoder config.")
