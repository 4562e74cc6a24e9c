"""LightningModules: the training core (``base.TrainingModule``) and the family modules built on it."""

from veomni_lightning.modules.base import Backbone, StepResult, TrainingModule
from veomni_lightning.modules.causal_lm import CausalLMModule
from veomni_lightning.modules.dit import DiTModule
from veomni_lightning.modules.omni import OmniModule
from veomni_lightning.modules.vlm import VLMModule

__all__ = ["Backbone", "CausalLMModule", "DiTModule", "OmniModule", "StepResult", "TrainingModule", "VLMModule"]
