"""``VLMDataModule``: packed vision-language chat data for Lightning / Fabric loops (see ``data/multimodal.py``)."""

from __future__ import annotations

from typing import Any, Literal

import torch

from veomni_lightning.errors import ConfigError

from .datamodule import TextDataModule
from .multimodal import MultimodalEncoder, build_multimodal_micro_batch
from .packing import Sample

__all__ = ["OmniDataModule", "VLMDataModule", "load_processor", "rope_index_of"]


def _processor_folder(folder: str) -> str:
    """A local folder for ``folder`` (a path, ``package:`` path or hub id: config and processor files, no weights)."""
    from veomni_lightning.models.source import resolve_model_source

    try:
        return resolve_model_source(folder, weights=False).folder
    except FileNotFoundError as error:
        raise ConfigError(f"processor {folder!r}: {error} Fix: a model folder or a hub id.") from None


def load_processor(folder: str) -> Any:
    """The model folder's processor (tokenizer + image/video processors + chat template); no remote code."""
    from transformers import AutoProcessor

    path = _processor_folder(folder)
    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"cannot load a processor from {folder!r} ({error}). Fix: point processor at the model folder (it holds "
            "preprocessor_config.json, the tokenizer files and the chat template)."
        ) from None


def rope_index_of(folder: str) -> Any:
    """The model's own ``get_rope_index``, on a parameter-free (meta) instance built from the folder's config."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(_processor_folder(folder))
    config = getattr(config, "thinker_config", config)  # a full omni folder: the thinker computes the positions
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    inner = model.model if hasattr(getattr(model, "model", None), "get_rope_index") else model
    if not hasattr(inner, "get_rope_index"):
        raise ConfigError(
            f"{type(model).__name__} has no get_rope_index: the VLM data pipeline needs the model's 3-D positions."
        )
    return inner.get_rope_index


class VLMDataModule(TextDataModule):
    """Packed multimodal chat data: rows with image / video items, the model's processor, loss on assistant turns.

    Each micro-batch holds whole samples (an over-long sample is dropped, never cut away from its media) with their
    ``pixel_values`` / ``image_grid_thw`` (and the video pair) and ``[3, 1, T]`` position ids that restart per sample.

    Args:
        train_files: JSON Lines files of chat rows (see ``veomni_lightning.data.multimodal``); media paths resolve
            against each file's folder.
        processor: the model folder holding the processor files and ``config.json``.
        val_files: validation files (same form).
        micro_batch_tokens: tokens per packed micro-batch.
        grad_accum_steps: micro-batches per optimizer step on each data-parallel rank.
        video_fps: frames per second decoded from videos (default: the video processor's ``fps``).
        use_audio_in_video: omni models: feed each video's sound track to the audio tower too, interleaved with
            its frames in time (the model's own position ids for that layout).
        videos_kwargs: the processor's video options (e.g. ``{size: {shortest_edge: 3136, longest_edge: 6272}}``:
            the pixels per frame); they override the processor's defaults.
        on_bad_row: ``error`` (names file, line and media path) or ``skip`` (counted in ``stats``).
        shuffle: shuffle rows through a buffer.
        shuffle_buffer: rows held by the shuffle buffer.
        seed: seed of the shuffle.
        num_epochs: passes over the data; none: cycle until ``max_steps``.
        allow_global_batch_change: allow resuming with another global batch.
    """

    def __init__(
        self,
        train_files: list[str] | str,
        processor: str,
        val_files: list[str] | str | None = None,
        micro_batch_tokens: int = 4096,
        grad_accum_steps: int = 1,
        video_fps: float | None = None,
        use_audio_in_video: bool = False,
        videos_kwargs: dict[str, Any] | None = None,
        on_bad_row: Literal["error", "skip"] = "error",
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        num_epochs: int | None = None,
        allow_global_batch_change: bool = False,
    ) -> None:
        super().__init__(
            train_files=train_files,
            tokenizer=processor,
            val_files=val_files,
            mode="sft",
            micro_batch_tokens=micro_batch_tokens,
            grad_accum_steps=grad_accum_steps,
            overlong="drop",
            on_bad_row=on_bad_row,
            shuffle=shuffle,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            num_epochs=num_epochs,
            allow_global_batch_change=allow_global_batch_change,
        )
        self.processor_path = processor
        self.video_fps = video_fps
        self.use_audio_in_video = use_audio_in_video
        self.videos_kwargs = videos_kwargs
        self.processor: Any = None

    def make_encoder(self) -> MultimodalEncoder:
        self.processor = load_processor(self.processor_path)
        self.tokenizer = self.processor.tokenizer
        return MultimodalEncoder(self.processor, rope_index_of(self.processor_path), video_fps=self.video_fps,
                                 use_audio_in_video=self.use_audio_in_video, videos_kwargs=self.videos_kwargs)  # fmt: skip

    def build_micro_batch(self, samples: list[Sample], micro_batch_tokens: int, pad_id: int) -> dict:
        return build_multimodal_micro_batch(samples, micro_batch_tokens, pad_id)


class OmniDataModule(VLMDataModule):
    """:class:`VLMDataModule` for omni models (a Qwen2.5-Omni thinker): rows may also hold audio items.

    ``{"type": "audio", "audio": "speech/a.wav"}`` (any format PyAV reads; mono, resampled to the feature extractor's
    rate, at most its window, 30 s for Whisper-style extractors); ``use_audio_in_video`` adds videos' sound tracks.
    The arguments are :class:`VLMDataModule`'s.
    """
