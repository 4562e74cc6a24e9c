"""``OmniModule``: train the thinker of an omni model (Qwen2.5-Omni: text + image + video + audio) with FSDP2 + SP.

The :class:`~veomni_lightning.modules.vlm.VLMModule` machinery with the audio tower added through the same adapter
(``models/vision_language.py``): every rank runs the audio tower every step (a silent dummy when its micro-batch has
no audio), its features are scattered into the audio placeholders before the SP cut, and under SP its layers run on
each rank's slice of the frames (``parallel/audio.py``). The talker and token2wav (speech generation) are not
trained: a full omni folder trains its thinker, and the export is a thinker folder that transformers loads.
Data: :class:`~veomni_lightning.data.OmniDataModule`.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from veomni_lightning.errors import ConfigError
from veomni_lightning.modules.base import Backbone
from veomni_lightning.modules.metrics import weight_flops
from veomni_lightning.modules.vlm import VLMModule
from veomni_lightning.parallel.audio import frames_after_front_end

__all__ = ["OmniModule"]

log = logging.getLogger(__name__)

#: Parts of an omni model that generate speech; not trained here.
SPEECH_PARTS = ("talker", "token2wav")


class OmniModule(VLMModule):
    """Omni thinker SFT (Qwen2.5-Omni): the vision-language options plus the audio tower's.

    Args:
        model: a thinker folder, or a full omni folder (its thinker is trained; talker and token2wav are left out).
        freeze_audio: keep the audio tower fixed (no gradient, not in the optimizer).
        audio_lr: learning rate of the audio tower (default: ``learning_rate``).
        **options: :class:`~veomni_lightning.modules.vlm.VLMModule`'s (``pretrained``, ``freeze_vision``,
            ``vision_lr``, ...) and the training core's settings.
    """

    def __init__(
        self, model: str, *, freeze_audio: bool = False, audio_lr: float | None = None, **options: Any
    ) -> None:
        super().__init__(model, **options)
        if audio_lr is not None and not audio_lr > 0:
            raise ConfigError(f"audio_lr must be a positive number, got {audio_lr!r}.")
        self._full_omni_checkpoint = False  # set by select_config

    def select_config(self, config: Any) -> Any:
        """The thinker's config: a full omni config gives its ``thinker_config``; a talker or token2wav is refused."""
        if any(part in config.model_type for part in SPEECH_PARTS):
            raise ConfigError(
                f"{self.hparams.model!r} is a {config.model_type} model: the speech-generation parts ({', '.join(SPEECH_PARTS)}) "
                "are not trained here. Fix: point model at the full omni folder or its thinker; the thinker is trained."
            )
        thinker = getattr(config, "thinker_config", None)
        self._full_omni_checkpoint = thinker is not None
        if thinker is not None:
            log.info(
                "%s is a full omni model: training its thinker (talker and token2wav are left out).", config.model_type
            )
            config = thinker
        if not hasattr(config, "audio_config"):
            raise ConfigError(
                f"{self.hparams.model!r} is a {config.model_type} model without an audio tower: use VLMModule."
            )
        return super().select_config(config)

    def build_model(self) -> tuple[nn.Module, list[Backbone]]:
        root, backbones = super().build_model()
        if self._full_omni_checkpoint:
            # The folder's weights hold the speech parts beside the thinker's ("thinker." keys, which transformers'
            # conversion mapping renames): the loader skips the model's declared unexpected keys.
            root.hf_model._keys_to_ignore_on_load_unexpected = [rf"^{part}\." for part in SPEECH_PARTS]
        return root, backbones

    def _freeze(self, hf_model: nn.Module) -> None:
        super()._freeze(hf_model)
        if self.hparams.freeze_audio:
            self.adapter.audio_tower(hf_model).requires_grad_(False)

    def tower_learning_rates(self, hf_model: nn.Module) -> list[tuple[nn.Module, float | None]]:
        """The vision tower at ``vision_lr`` and the audio tower at ``audio_lr``."""
        return [*super().tower_learning_rates(hf_model), (self.adapter.audio_tower(hf_model), self.hparams.audio_lr)]

    def encoder_flops(self, micro_batch: dict[str, Any]) -> float:
        """The audio tower's training FLOPs: ``6·P_audio·F`` with ``F`` encoder frames (after the conv front end;
        its attention FLOPs are left out; LoRA: frozen weights count 4)."""
        lengths = micro_batch.get("audio_lengths")
        if not lengths:
            return 0.0
        tower = self.adapter.audio_tower(self.model.hf_model)
        lora = self.hparams.get("lora") is not None
        return weight_flops(tower, lora) * frames_after_front_end(lengths, tower.n_window)
