"""LightningModules: text (dense, MoE) now; VLM, Omni and DiT follow the same pattern."""

from veomni_lightning.modules.causal_lm import CausalLMModule

__all__ = ["CausalLMModule"]
