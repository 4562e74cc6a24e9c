"""``DiTDataModule``: text-to-video rows -> one clip per micro-batch (frames, prompt tokens, a per-sample seed).

A row is ``{"prompt": "a cat on a sofa", "video": "clips/cat.mp4"}`` or ``{"prompt": ..., "image": "cat.png"}`` (a
one-frame video); media paths are ``package:<pkg>/<file>``, absolute, or relative to the data file's folder. Videos
are decoded with PyAV at ``fps``; the first ``4k + 1`` frames (what Wan's VAE compresses: one frame, then groups of
four) up to ``num_frames`` are kept. Each clip is resized, keeping its aspect, to at most ``max_pixels`` with sides
that are multiples of ``size_multiple`` (the VAE's 8× times the transformer's 2× patch). Clips keep their own shapes:
one clip per micro-batch (no padding, no cropping to a common bucket), so different resolutions and lengths train in
one run exactly. Each micro-batch carries ``sample_seed``, from which the module draws the sample's timestep and
noise: the same on every rank and layout, and in cached and raw modes.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Literal

import lightning.pytorch as pl
import numpy
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from veomni_lightning.errors import ConfigError

from .sources import DataError, RowLocation, resolve_path

__all__ = ["DiTDataModule", "load_clip"]


def load_clip(path: str, kind: str, *, fps: float, num_frames: int, max_pixels: int, size_multiple: int) -> torch.Tensor:
    """A clip as ``[3, F, H, W]`` float in ``[-1, 1]`` (``F = 4k + 1``); ``ValueError`` says what is wrong."""
    if kind == "image":
        from PIL import Image

        with Image.open(path) as image:
            frames = torch.from_numpy(numpy.array(image.convert("RGB"))).unsqueeze(0)
    else:
        from transformers.video_utils import load_video

        decoded, _ = load_video(path, backend="pyav", fps=fps)
        frames = torch.as_tensor(decoded)
        if frames.ndim != 4 or frames.shape[0] == 0:
            raise ValueError("no frames decoded")
    count = min(frames.shape[0], num_frames)
    keep = (count - 1) // 4 * 4 + 1
    frames = frames[:keep].permute(3, 0, 1, 2).float()  # [3, F, H, W]
    height, width = frames.shape[-2:]
    scale = min(1.0, math.sqrt(max_pixels / (height * width)))
    new_h = max(size_multiple, int(height * scale) // size_multiple * size_multiple)
    new_w = max(size_multiple, int(width * scale) // size_multiple * size_multiple)
    frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    return (frames / 127.5 - 1.0).clamp(-1.0, 1.0)


class _Clips(Dataset):
    """Step ``i`` of this dp rank: its ``grad_accum_steps`` micro-batches of the global step ``i``."""

    def __init__(self, module: DiTDataModule, steps: int) -> None:
        self.module, self.steps = module, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> list[dict[str, Any]]:
        m = self.module
        per_step = m.dp_size * m.grad_accum_steps
        first = step * per_step + m.dp_rank * m.grad_accum_steps
        return [m.micro_batch(index) for index in range(first, first + m.grad_accum_steps)]


class DiTDataModule(pl.LightningDataModule):
    """Text-to-video rows for :class:`~veomni_lightning.modules.DiTModule` (see the module doc for the row format).

    Args:
        train_files: JSON Lines files of ``{"prompt", "video" | "image"}`` rows.
        tokenizer: the text encoder's tokenizer folder (a diffusers Wan folder's ``tokenizer/``).
        grad_accum_steps: clips per optimizer step on each data-parallel rank (one clip per micro-batch).
        num_frames: the most frames kept per clip (``4k + 1`` are kept).
        fps: frames per second decoded from a video.
        max_pixels: the most pixels per frame after resizing.
        size_multiple: frame sides are multiples of this (VAE downsampling × patch size: 16 for Wan).
        text_length: prompt tokens the text encoder sees (Wan: 512); longer prompts are an error unless
            ``truncate_prompts``.
        truncate_prompts: cut longer prompts to ``text_length`` tokens (counted in ``stats["truncated_prompts"]``).
        on_bad_row: ``error`` (names file, line and media path) or ``skip`` (counted in ``stats``).
        seed: the shuffle seed and the base of every sample's seed.
        num_epochs: passes over the rows (the order is reshuffled every epoch).
    """

    def __init__(
        self,
        train_files: list[str] | str,
        tokenizer: str,
        *,
        grad_accum_steps: int = 1,
        num_frames: int = 81,
        fps: float = 16.0,
        max_pixels: int = 480 * 832,
        size_multiple: int = 16,
        text_length: int = 512,
        truncate_prompts: bool = False,
        on_bad_row: Literal["error", "skip"] = "error",
        seed: int = 0,
        num_epochs: int = 1000,
    ) -> None:
        super().__init__()
        for name, value in (("grad_accum_steps", grad_accum_steps), ("num_frames", num_frames),
                            ("max_pixels", max_pixels), ("text_length", text_length)):  # fmt: skip
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        self.train_files = [train_files] if isinstance(train_files, str) else list(train_files)
        self.tokenizer_path = tokenizer
        self.grad_accum_steps = grad_accum_steps
        self.clip_options = dict(fps=fps, num_frames=num_frames, max_pixels=max_pixels, size_multiple=size_multiple)
        self.text_length, self.truncate_prompts = text_length, truncate_prompts
        self.on_bad_row, self.seed, self.num_epochs = on_bad_row, seed, num_epochs
        self.dp_rank, self.dp_size = 0, 1
        self.rows: list[tuple[RowLocation, str, str, str]] = []  # (where, prompt, kind, media path)
        self.tokenizer: Any = None
        self.stats = {"skipped_rows": 0, "truncated_prompts": 0}

    def setup(self, stage: str | None = None) -> None:
        """Read and check the rows (media files must exist), load the tokenizer, find the dp rank and size."""
        from transformers import AutoTokenizer

        if self.trainer is not None:
            kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
            self.dp_size, self.dp_rank = int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_path(self.tokenizer_path))
        if not self.rows:
            self.rows = [row for path in self.train_files for row in self._read(resolve_path(path))]
            if not self.rows:
                raise DataError(f"{self.train_files}: no usable rows.")

    def _read(self, path: str) -> list[tuple[RowLocation, str, str, str]]:
        rows = []
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                where = RowLocation(path, line)
                try:
                    rows.append(self._row(json.loads(text), where))
                except (DataError, json.JSONDecodeError) as error:
                    if self.on_bad_row == "error":
                        raise DataError(str(error) if isinstance(error, DataError) else f"{where}: {error}") from None
                    self.stats["skipped_rows"] += 1
        return rows

    def _row(self, row: Any, where: RowLocation) -> tuple[RowLocation, str, str, str]:
        kinds = [k for k in ("video", "image") if isinstance(row, dict) and isinstance(row.get(k), str)]
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or len(kinds) != 1:
            raise DataError(f'{where}: expected {{"prompt": "...", "video": "clip.mp4"}} (or "image"), got {row!r}.')
        media = row[kinds[0]]
        if not media.startswith("package:") and not os.path.isabs(media):
            media = os.path.join(os.path.dirname(os.path.abspath(where.path)), media)
        media = resolve_path(media)
        if not os.path.isfile(media):
            raise DataError(f"{where}: {kinds[0]} file {media} does not exist. Fix: correct the path (relative paths "
                            "resolve against the data file's folder).")  # fmt: skip
        return where, row["prompt"], kinds[0], media

    # ------------------------------------------------------------------------------------------ micro-batches
    def order(self, epoch: int) -> list[int]:
        """The rows' order in ``epoch`` (a seeded shuffle)."""
        return torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def micro_batch(self, index: int) -> dict[str, Any]:
        """The ``index``-th clip of the run: ``pixels [1, 3, F, H, W]``, prompt ``input_ids`` / ``attention_mask``
        ``[1, text_length]``, ``sample_seed``; the row is named in any error."""
        epoch, position = divmod(index, len(self.rows))
        where, prompt, kind, media = self.rows[self.order(epoch)[position]]
        try:
            pixels = load_clip(media, kind, **self.clip_options)
        except Exception as error:  # PyAV / PIL raise many types: any means this file cannot be used
            raise DataError(f"{where}: cannot read {kind} {media}: {error}. Fix: replace or remove the file.") from None
        return {"pixels": pixels.unsqueeze(0), **self.tokenize(prompt, where), "sample_seed": self.seed * 1_000_003 + index}

    def tokenize(self, prompt: str, where: RowLocation | str = "prompt") -> dict[str, torch.Tensor]:
        """Prompt tokens padded to ``text_length`` (an over-long prompt is an error unless ``truncate_prompts``)."""
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if len(ids) > self.text_length:
            if not self.truncate_prompts:
                raise DataError(f"{where}: the prompt has {len(ids)} tokens, more than text_length={self.text_length}. "
                                "Fix: shorten it, or set truncate_prompts: true to cut it.")  # fmt: skip
            self.stats["truncated_prompts"] += 1
        out = self.tokenizer(prompt, max_length=self.text_length, padding="max_length", truncation=True,
                             add_special_tokens=True, return_tensors="pt")  # fmt: skip
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def train_dataloader(self) -> DataLoader:
        """Steps of this dp rank's clips (one list of ``grad_accum_steps`` micro-batches per optimizer step)."""
        if not self.rows:
            self.setup("fit")
        steps = self.num_epochs * len(self.rows) // (self.dp_size * self.grad_accum_steps)
        return DataLoader(_Clips(self, steps), batch_size=None, shuffle=False)
