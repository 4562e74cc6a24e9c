"""A training wrapper around any ``*ForCausalLM``: decoder forward plus chunked cross-entropy on the lm_head.

The wrapper is the FSDP root, so one root forward gathers what the blocks do not own (embeddings, final norm,
lm_head) and the loss is computed from hidden states without ever materialising ``[tokens, vocab]`` logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from veomni_lightning.kernels.cross_entropy import linear_cross_entropy

__all__ = ["CausalLMWithLoss", "check_supported_causal_lm"]

# Config attributes that change logits after the lm_head; the fused loss would silently ignore them.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def check_supported_causal_lm(config: Any) -> None:
    """Raise a clear error for models whose logits are post-processed in a way the fused loss does not reproduce."""
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{config.model_type} transforms its logits ({name}={value}); the fused linear cross-entropy does "
                "not support that yet."
            )


class CausalLMWithLoss(nn.Module):
    """Runs the HF decoder on a (possibly SP-sliced) packed batch and returns the summed token loss.

    Args:
        hf_model: a transformers ``*ForCausalLM`` (its ``base_model`` is the decoder, its output embeddings the head).
        ce_chunk_size: tokens per chunk of the fused cross-entropy.
        decoder: the decoder to run instead of ``hf_model.base_model`` (a VLM's language model).
    """

    def __init__(self, hf_model: nn.Module, ce_chunk_size: int = 4096, decoder: nn.Module | None = None) -> None:
        super().__init__()
        check_supported_causal_lm(getattr(hf_model.config, "text_config", hf_model.config))
        self.hf_model = hf_model
        self.ce_chunk_size = ce_chunk_size
        # Not a registered child (it lives inside hf_model already): a plain attribute, so no parameter is listed twice.
        self.__dict__["decoder"] = decoder

    def forward(
        self,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_router_logits: bool = False,
        **attention_kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Sum (fp32) of the cross-entropy over this rank's non-ignored tokens; ``labels`` are already shifted.

        Give ``input_ids``, or ``inputs_embeds`` built by a multimodal family on the full sequence and cut for SP.
        ``attention_kwargs`` (SP group, ``cu_seq_lens_*``, ``max_length_*``) travel through the HF model's kwargs to
        the registered attention function. With ``output_router_logits`` (MoE models) returns ``(loss, router
        logits)``, one ``[tokens, experts]`` tensor per MoE layer, as the model records them.
        """
        router = {"output_router_logits": True} if output_router_logits else {}
        decoder = self.__dict__["decoder"] if self.__dict__["decoder"] is not None else self.hf_model.base_model
        outputs = decoder(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            use_cache=False,
            **router,
            **attention_kwargs,
        )
        head = self.hf_model.get_output_embeddings()
        loss = linear_cross_entropy(
            outputs.last_hidden_state, head.weight, labels, getattr(head, "bias", None), chunk_size=self.ce_chunk_size
        )
        return (loss, tuple(outputs.router_logits)) if output_router_logits else loss
