"""Vision-language rows -> packed samples: media loading, the model's processor, assistant-only loss, 3-D positions.

A row is a conversation in transformers' multimodal chat convention::

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/cat.png"},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}

``{"type": "video", "video": "clips/a.mp4"}`` for a video (decoded with PyAV at the processor's frame rate),
``{"type": "audio", "audio": "speech/a.wav"}`` for audio (omni models: decoded with PyAV, mono, resampled to the feature
extractor's rate; with ``use_audio_in_video`` a video's own sound track is used too); relative paths resolve against
the data file's folder. The model's processor renders the chat template, resizes the media and
expands each placeholder into the image's tokens. The loss covers the assistant turns only. The 3-D (temporal,
height, width) rotary positions are computed per sample here, with the model's own ``get_rope_index`` on the
sample's full sequence, so they restart at every packed sample and no forward pass computes them.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .packing import Sample, build_micro_batch
from .sources import DataError, RowLocation, resolve_path

__all__ = ["MultimodalEncoder", "build_multimodal_micro_batch", "MEDIA_KEYS"]

#: Per-sample media tensors concatenated along dim 0 when samples are packed: (inputs, sizes) per kind. Audio
#: features are stored ``[mel frames, mel bins]`` (their valid frames only), so they concatenate like pixels.
MEDIA_KEYS = {
    "image": ("pixel_values", "image_grid_thw"),
    "video": ("pixel_values_videos", "video_grid_thw"),
    "audio": ("input_features", "audio_feature_lengths"),
}
VISION_KINDS = ("image", "video")
ROLES = ("system", "user", "assistant")


class MultimodalEncoder:
    """Encode one multimodal chat row as ``(input_ids, loss_mask, extras)``; row problems raise ``DataError``.

    Args:
        processor: the model's processor (tokenizer + image/video processors + chat template).
        rope_index: the model's ``get_rope_index`` (``input_ids [1, L]`` and the media grids -> ``([3, 1, L], _)``).
        video_fps: frames per second decoded from a video (default: the video processor's ``fps``, else 2).
        use_audio_in_video: also feed each video's sound track to the audio tower, interleaved with its frames in
            time (omni processors).
        videos_kwargs: the processor's video options for every row (e.g. ``{"size": {"shortest_edge": 3136,
            "longest_edge": 6272}}`` to bound the pixels per frame); they override its defaults.
        messages_key: the key holding the conversation.
    """

    def __init__(
        self,
        processor: Any,
        rope_index: Callable[..., tuple[torch.Tensor, Any]],
        *,
        video_fps: float | None = None,
        use_audio_in_video: bool = False,
        videos_kwargs: dict[str, Any] | None = None,
        messages_key: str = "messages",
    ) -> None:
        self.processor = processor
        self.rope_index = rope_index
        self.rope_params = set(inspect.signature(rope_index).parameters)
        video_processor = getattr(processor, "video_processor", None)
        self.video_fps = video_fps or getattr(video_processor, "fps", None) or 2.0
        self.messages_key = messages_key
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.video_token_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "video_token", ""))
        self.merge = processor.image_processor.merge_size
        self.feature_extractor = getattr(processor, "feature_extractor", None)
        self.audio_token = getattr(processor, "audio_token", None)
        if use_audio_in_video and self.feature_extractor is None:
            raise DataError("use_audio_in_video needs a processor with an audio feature extractor (an omni model's).")
        self.use_audio_in_video = use_audio_in_video
        self.videos_kwargs = dict(videos_kwargs or {})

    # ------------------------------------------------------------------------------------------ the row
    def encode(self, row: Any, loc: RowLocation) -> Sample:
        messages, media = self._validate(row, loc)
        loaded = [self._load(kind, path, loc) for kind, path in media]
        full = self._process(messages, loaded, loc)
        ids = full["input_ids"][0]
        self._check_placeholders(ids, full, loc)
        mask = torch.zeros(len(ids), dtype=torch.bool)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._length(messages[:i], loaded, loc, add_generation_prompt=True)
            # The whole conversation is already processed: its last turn needs no second pass.
            end = len(ids) if i + 1 == len(messages) else self._length(messages[: i + 1], loaded, loc)
            mask[start:end] = True
        extras = {key: full[key] for kind in VISION_KINDS for key in MEDIA_KEYS[kind] if full.get(key) is not None}
        if full.get("input_features") is not None:
            lengths = full["feature_attention_mask"].sum(-1)
            valid = full["feature_attention_mask"].bool()
            extras["input_features"] = full["input_features"].transpose(1, 2)[valid]  # [frames, mel bins]
            extras["audio_feature_lengths"] = lengths
        extras["position_ids"] = self._positions(full)
        return ids.tolist(), mask.tolist(), extras

    def _validate(self, row: Any, loc: RowLocation) -> tuple[list[dict], list[tuple[str, str]]]:
        if not isinstance(row, dict) or not isinstance(row.get(self.messages_key), list) or not row[self.messages_key]:
            raise DataError(
                f"{loc}: expected an object with a non-empty {self.messages_key!r} list of chat messages. Fix: "
                f'{{"{self.messages_key}": [{{"role": "user", "content": [...]}}, {{"role": "assistant", ...}}]}}.'
            )
        messages, media = [], []
        for i, message in enumerate(row[self.messages_key]):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ROLES:
                raise DataError(f"{loc}: message {i} has role {role!r}. Fix: one of {', '.join(ROLES)}.")
            content = message.get("content")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list):
                raise DataError(f"{loc}: message {i} content must be a string or a list of typed items.")
            items = []
            for item in content:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "text" and isinstance(item.get("text"), str):
                    if self.audio_token and self.audio_token in item["text"]:
                        raise DataError(f"{loc}: message {i} text holds the audio placeholder {self.audio_token!r}. Fix: "
                                        "do not write it; each audio item places its own.")  # fmt: skip
                    items.append({"type": "text", "text": item["text"]})
                elif kind in MEDIA_KEYS and isinstance(item.get(kind), str):
                    media.append((kind, _resolve(loc, item[kind])))
                    items.append({"type": kind})
                else:
                    raise DataError(
                        f"{loc}: message {i} has an item {item!r}. Fix: items are {{'type': 'text', 'text': ...}}, "
                        "{'type': 'image', 'image': 'path'}, {'type': 'video', 'video': 'path'} or "
                        "{'type': 'audio', 'audio': 'path'}."
                    )
            messages.append({"role": role, "content": items})
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{loc}: the conversation has no assistant message: nothing would be learned from it.")
        if any(kind == "video" for kind, _ in media) and getattr(self.processor, "video_processor", None) is None:
            raise DataError(
                f"{loc}: the row has a video ({next(p for k, p in media if k == 'video')}) but the processor has no "
                "video processor. Fix: drop video rows, or use a model whose processor handles video."
            )
        if any(kind == "audio" for kind, _ in media) and self.feature_extractor is None:
            raise DataError(
                f"{loc}: the row has audio ({next(p for k, p in media if k == 'audio')}) but the processor has no audio "
                "feature extractor. Fix: drop audio rows, or use an omni model (e.g. a Qwen2.5-Omni thinker)."
            )
        return messages, media

    def _load(self, kind: str, path: str, loc: RowLocation) -> Media:
        if not os.path.isfile(path):
            raise DataError(f"{loc}: {kind} file {path} does not exist. Fix: correct the path (relative paths resolve "
                            "against the data file's folder).")  # fmt: skip
        try:
            if kind == "image":
                from PIL import Image

                with Image.open(path) as image:
                    return Media(kind, image.convert("RGB"))
            if kind == "audio":
                return Media(kind, self._load_audio(path))
            from transformers.video_utils import load_video

            frames, metadata = load_video(path, backend="pyav", fps=self.video_fps)
            if len(frames) == 0:
                raise ValueError("no frames decoded")
            # Describe the decoded frames as the video itself, so a processor that samples frames again (Qwen3-VL)
            # indexes within them and time stamps stay right.
            metadata.frames_indices = list(range(len(frames)))
            metadata.fps = len(frames) / metadata.duration if metadata.duration else self.video_fps
            metadata.total_num_frames = len(frames)
            return Media(kind, frames, metadata, self._load_audio(path) if self.use_audio_in_video else None)
        except Exception as error:  # PIL / PyAV errors have many types; any of them means this file is unreadable
            raise DataError(f"{loc}: cannot read {kind} {path}: {error}. Fix: replace or remove the file.") from None

    def _load_audio(self, path: str) -> Any:
        """Mono float32 samples at the feature extractor's rate (PyAV decodes and resamples any audio format)."""
        import av
        import numpy as np

        rate = self.feature_extractor.sampling_rate
        with av.open(path) as container:
            if not container.streams.audio:
                raise ValueError("no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks = [f.to_ndarray() for frame in container.decode(container.streams.audio[0])
                      for f in resampler.resample(frame)]  # fmt: skip
            chunks += [f.to_ndarray() for f in resampler.resample(None)]
        samples = np.concatenate(chunks, axis=1)[0] if chunks else np.zeros(0, np.float32)
        limit = getattr(self.feature_extractor, "n_samples", None)
        if samples.size == 0:
            raise ValueError("no audio samples decoded")
        if limit and samples.size > limit:
            raise ValueError(f"{samples.size / rate:.1f} s is longer than the feature extractor's {limit / rate:.0f} s "
                             "window; cut it into shorter clips")  # fmt: skip
        return samples

    def _process(self, messages: list[dict], loaded: list[Media], loc: RowLocation, **kw: Any) -> Any:
        text = self.processor.apply_chat_template(messages, tokenize=False, **kw)
        images = [m.data for m in loaded if m.kind == "image"]
        videos = [m.data for m in loaded if m.kind == "video"]
        extra: dict[str, Any] = {}
        if videos:
            extra["video_metadata"] = [m.metadata for m in loaded if m.kind == "video"]
            if self.videos_kwargs:
                extra["videos_kwargs"] = self.videos_kwargs
        if self.use_audio_in_video and videos:
            # One audio per slot in row order (standalone audio: None, a video's sound: its index), already decoded.
            slots, video_index = [], iter(range(len(videos)))
            for m in loaded:
                if m.kind in ("audio", "video"):
                    slots.append(None if m.kind == "audio" else next(video_index))
            sound = [m.data if m.kind == "audio" else m.sound for m in loaded if m.kind in ("audio", "video")]
            extra.update(audio=sound, load_audio_from_video=True, audio_from_video_indices=slots)
        elif audio := [m.data for m in loaded if m.kind == "audio"]:
            extra["audio"] = audio
        try:
            return self.processor(text=[text], images=images or None, videos=videos or None, return_tensors="pt",
                                  **extra)  # fmt: skip
        except ValueError as error:  # e.g. placeholder tokens in the text that do not match the media
            raise DataError(f"{loc}: the processor rejected the row: {error}") from None

    def _length(self, messages: list[dict], loaded: list, loc: RowLocation, add_generation_prompt: bool = False) -> int:
        kinds = [item["type"] for m in messages for item in m["content"] if item["type"] != "text"]
        if not messages:
            return 0
        out = self._process(messages, loaded[: len(kinds)], loc, add_generation_prompt=add_generation_prompt)
        return int(out["input_ids"].shape[-1])

    def _check_placeholders(self, ids: torch.Tensor, full: Any, loc: RowLocation) -> None:
        for kind, token in (("image", self.image_token_id), ("video", self.video_token_id)):
            grid = full.get(MEDIA_KEYS[kind][1])
            expected = 0 if grid is None else int(grid.prod(-1).sum()) // self.merge**2
            found = int((ids == token).sum())
            if found != expected:
                raise DataError(
                    f"{loc}: the text holds {found} {kind} tokens but its {kind}s give {expected} features. Fix: do not "
                    f"write the {kind} placeholder in text items; each {kind} item places its own."
                )

    def _positions(self, full: Any) -> torch.Tensor:
        audio_mask = full.get("feature_attention_mask")
        kwargs = {
            "input_ids": full["input_ids"],
            "attention_mask": full.get("attention_mask"),
            "mm_token_type_ids": full.get("mm_token_type_ids"),
            "image_grid_thw": full.get("image_grid_thw"),
            "video_grid_thw": full.get("video_grid_thw"),
            "second_per_grid_ts": full.get("second_per_grid_ts"),
            "second_per_grids": _as_tensor(full.get("video_second_per_grid")),
            "audio_seqlens": None if audio_mask is None else audio_mask.sum(-1),
            "use_audio_in_video": self.use_audio_in_video,
        }
        positions, _ = self.rope_index(**{k: v for k, v in kwargs.items() if k in self.rope_params})
        return positions[:, 0].long()  # [3, L]


class Media(NamedTuple):
    """One decoded media item of a row: a picture, video frames (+ their metadata and sound) or audio samples."""

    kind: str
    data: Any
    metadata: Any = None
    sound: Any = None


def _as_tensor(values: Any) -> torch.Tensor | None:
    return None if values is None else torch.as_tensor(values)


def _resolve(loc: RowLocation, path: str) -> str:
    """A media path: ``package:<pkg>/<file>``, absolute, or relative to the data file's folder."""
    if path.startswith("package:"):
        return resolve_path(path)
    return path if os.path.isabs(path) else os.path.join(os.path.dirname(os.path.abspath(loc.path)), path)


def build_multimodal_micro_batch(samples: list[Sample], micro_batch_tokens: int, pad_id: int) -> dict:
    """:func:`~veomni_lightning.data.packing.build_micro_batch` plus the samples' media and 3-D positions.

    ``position_ids`` becomes ``[3, 1, T]`` (each sample's own rope positions; the padding segment counts from 0 on
    all three axes); ``pixel_values`` / ``image_grid_thw`` (and the video pair) are the samples' concatenated in
    sequence order, present only when some sample has that kind of media (audio: ``input_features [frames, mel]``
    and ``audio_feature_lengths``); ``vision_grids`` lists the same grids (images, then videos) and ``audio_lengths``
    the audios' mel frames as Python ints.
    """
    batch = build_micro_batch(samples, micro_batch_tokens, pad_id)
    rows = []
    for sample in samples:
        ids, extras = sample[0], sample[2] if len(sample) > 2 else {}
        positions = extras.get("position_ids")
        rows.append(positions if positions is not None else torch.arange(len(ids)).expand(3, -1))
    pad = micro_batch_tokens - sum(len(s[0]) for s in samples)
    if pad:
        rows.append(torch.arange(pad).expand(3, -1))
    batch["position_ids"] = torch.cat(rows, dim=1)[:, None, :].contiguous()
    grids: list[list[int]] = []
    for kind, (inputs_key, sizes_key) in MEDIA_KEYS.items():
        parts = [s[2] for s in samples if len(s) > 2 and inputs_key in s[2]]
        if parts:
            batch[inputs_key] = torch.cat([p[inputs_key] for p in parts])
            batch[sizes_key] = torch.cat([p[sizes_key] for p in parts])
            if kind in VISION_KINDS:
                grids += batch[sizes_key].tolist()
            else:
                batch["audio_lengths"] = batch[sizes_key].tolist()
    # The sizes again as host numbers (vision grids: images, then videos; audio: mel frames per audio): moving the
    # batch to the GPU leaves lists alone, so the towers' segment offsets are computed without reading the device.
    batch["vision_grids"] = grids
    return batch
