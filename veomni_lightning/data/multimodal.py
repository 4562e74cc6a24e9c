"""Vision-language rows -> packed samples: media loading, the model's processor, assistant-only loss, 3-D positions.

A row is a conversation in transformers' multimodal chat convention::

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/cat.png"},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}

``{"type": "video", "video": "clips/a.mp4"}`` for a video (decoded with PyAV at the processor's frame rate); relative
paths resolve against the data file's folder. The model's processor renders the chat template, resizes the media and
expands each placeholder into the image's tokens. The loss covers the assistant turns only. The 3-D (temporal,
height, width) rotary positions are computed per sample here, with the model's own ``get_rope_index`` on the
sample's full sequence, so they restart at every packed sample and no forward pass computes them.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import torch

from .packing import Sample, build_micro_batch
from .sources import DataError, RowLocation, resolve_path

__all__ = ["MultimodalEncoder", "build_multimodal_micro_batch", "MEDIA_KEYS"]

#: Per-sample media tensors concatenated along dim 0 when samples are packed: (pixels, grid) per kind.
MEDIA_KEYS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}
ROLES = ("system", "user", "assistant")


class MultimodalEncoder:
    """Encode one multimodal chat row as ``(input_ids, loss_mask, extras)``; row problems raise ``DataError``.

    Args:
        processor: the model's processor (tokenizer + image/video processors + chat template).
        rope_index: the model's ``get_rope_index`` (``input_ids [1, L]`` and the media grids -> ``([3, 1, L], _)``).
        video_fps: frames per second decoded from a video (default: the video processor's ``fps``, else 2).
        messages_key: the key holding the conversation.
    """

    def __init__(
        self,
        processor: Any,
        rope_index: Callable[..., tuple[torch.Tensor, Any]],
        *,
        video_fps: float | None = None,
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
        extras = {key: full[key] for pair in MEDIA_KEYS.values() for key in pair if full.get(key) is not None}
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
                    items.append({"type": "text", "text": item["text"]})
                elif kind in ("image", "video") and isinstance(item.get(kind), str):
                    media.append((kind, _resolve(loc, item[kind])))
                    items.append({"type": kind})
                else:
                    raise DataError(
                        f"{loc}: message {i} has an item {item!r}. Fix: items are {{'type': 'text', 'text': ...}}, "
                        "{'type': 'image', 'image': 'path'} or {'type': 'video', 'video': 'path'}."
                    )
            messages.append({"role": role, "content": items})
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{loc}: the conversation has no assistant message: nothing would be learned from it.")
        if any(kind == "video" for kind, _ in media) and getattr(self.processor, "video_processor", None) is None:
            raise DataError(
                f"{loc}: the row has a video ({next(p for k, p in media if k == 'video')}) but the processor has no "
                "video processor. Fix: drop video rows, or use a model whose processor handles video."
            )
        return messages, media

    def _load(self, kind: str, path: str, loc: RowLocation) -> tuple[str, Any, Any]:
        if not os.path.isfile(path):
            raise DataError(f"{loc}: {kind} file {path} does not exist. Fix: correct the path (relative paths resolve "
                            "against the data file's folder).")  # fmt: skip
        try:
            if kind == "image":
                from PIL import Image

                with Image.open(path) as image:
                    return kind, image.convert("RGB"), None
            from transformers.video_utils import load_video

            frames, metadata = load_video(path, backend="pyav", fps=self.video_fps)
            if len(frames) == 0:
                raise ValueError("no frames decoded")
            # Describe the decoded frames as the video itself, so a processor that samples frames again (Qwen3-VL)
            # indexes within them and time stamps stay right.
            metadata.frames_indices = list(range(len(frames)))
            metadata.fps = len(frames) / metadata.duration if metadata.duration else self.video_fps
            metadata.total_num_frames = len(frames)
            return kind, frames, metadata
        except Exception as error:  # PIL / PyAV errors have many types; any of them means this file is unreadable
            raise DataError(f"{loc}: cannot read {kind} {path}: {error}. Fix: replace or remove the file.") from None

    def _process(self, messages: list[dict], loaded: list[tuple[str, Any, Any]], loc: RowLocation, **kw: Any) -> Any:
        text = self.processor.apply_chat_template(messages, tokenize=False, **kw)
        images = [data for kind, data, _ in loaded if kind == "image"]
        videos = [data for kind, data, _ in loaded if kind == "video"]
        extra = {"video_metadata": [meta for kind, _, meta in loaded if kind == "video"]} if videos else {}
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
        kwargs = {
            "input_ids": full["input_ids"],
            "mm_token_type_ids": full.get("mm_token_type_ids"),
            "image_grid_thw": full.get("image_grid_thw"),
            "video_grid_thw": full.get("video_grid_thw"),
            "second_per_grid_ts": full.get("second_per_grid_ts"),
        }
        positions, _ = self.rope_index(**{k: v for k, v in kwargs.items() if k in self.rope_params})
        return positions[:, 0].long()  # [3, L]


def _resolve(loc: RowLocation, path: str) -> str:
    """A media path: ``package:<pkg>/<file>``, absolute, or relative to the data file's folder."""
    if path.startswith("package:"):
        return resolve_path(path)
    return path if os.path.isabs(path) else os.path.join(os.path.dirname(os.path.abspath(loc.path)), path)


def build_multimodal_micro_batch(samples: list[Sample], micro_batch_tokens: int, pad_id: int) -> dict:
    """:func:`~veomni_lightning.data.packing.build_micro_batch` plus the samples' media and 3-D positions.

    ``position_ids`` becomes ``[3, 1, T]`` (each sample's own rope positions; the padding segment counts from 0 on
    all three axes); ``pixel_values`` / ``image_grid_thw`` (and the video pair) are the samples' concatenated in
    sequence order, present only when some sample has that kind of media; ``vision_grids`` lists the same grids
    (images, then videos) as Python ints.
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
    for pixels_key, grid_key in MEDIA_KEYS.values():
        parts = [s[2] for s in samples if len(s) > 2 and pixels_key in s[2]]
        if parts:
            batch[pixels_key] = torch.cat([p[pixels_key] for p in parts])
            batch[grid_key] = torch.cat([p[grid_key] for p in parts])
            grids += batch[grid_key].tolist()
    # The grids again as host numbers (images, then videos): moving the batch to the GPU leaves lists alone, so the
    # vision tower's segment offsets and window order are computed without reading the device.
    batch["vision_grids"] = grids
    return batch
