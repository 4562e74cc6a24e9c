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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from veomni_lightning.errors import ConfigError

from .latent_cache import LatentCache
from .sources import DataError, RowLocation, resolve_path

__all__ = ["DiTDataModule", "load_clip"]


def load_clip(
    path: str, kind: str, *, fps: float, num_frames: int, max_pixels: int, size_multiple: int
) -> torch.Tensor:
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


def _is_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~", "package:")) and not Path(spec).exists()


class _Clips(IterableDataset):
    """This dp rank's steps in order, each its ``grad_accum_steps`` micro-batches of the global step.

    Iterable, so Lightning adds no distributed sampler (the dp split is done here); loader workers take every
    ``W``-th step and the loader interleaves them back in order.
    """

    def __init__(self, module: DiTDataModule, steps: int, start: int) -> None:
        self.module, self.steps, self.start = module, steps, start

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        m = self.module
        per_step = m.dp_size * m.grad_accum_steps
        for step in range(self.start + worker, self.steps, workers):
            first = step * per_step + m.dp_rank * m.grad_accum_steps
            yield [m.micro_batch(index) for index in range(first, first + m.grad_accum_steps)]


class DiTDataModule(pl.LightningDataModule):
    """Text-to-video rows for :class:`~veomni_lightning.modules.DiTModule` (see the module doc for the row format).

    Args:
        train_files: JSON Lines files of ``{"prompt", "video" | "image"}`` rows.
        tokenizer: the text encoder's tokenizer: its folder, or a diffusers Wan folder or hub id (its ``tokenizer/``).
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
        latent_cache: a folder for cached latents and text embeddings: at the start of ``fit`` the module's frozen
            condition model fills what is missing (resumable), and training then reads it instead of decoding.
        rows_per_shard: rows per cache shard.
        num_workers: data loader worker processes (decoding clips).
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
        latent_cache: str | None = None,
        rows_per_shard: int = 64,
        num_workers: int = 0,
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
        self.latent_cache, self.rows_per_shard, self.num_workers = latent_cache, rows_per_shard, num_workers
        self.cache: LatentCache | None = None  # attached by DiTModule once the cache is filled

    def setup(self, stage: str | None = None) -> None:
        """Read and check the rows (media files must exist), load the tokenizer, find the dp rank and size."""
        from transformers import AutoTokenizer

        if self.trainer is not None:
            kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
            self.dp_size, self.dp_rank = int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))
        if self.tokenizer is None:
            path = Path(resolve_path(self.tokenizer_path)) if not _is_hub_id(self.tokenizer_path) else None
            if path is None:  # a hub diffusers folder: its tokenizer/ subfolder
                self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, subfolder="tokenizer")
            else:  # the tokenizer folder, or a diffusers folder holding one
                self.tokenizer = AutoTokenizer.from_pretrained(
                    path / "tokenizer" if (path / "tokenizer").is_dir() else path
                )
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
        """The ``index``-th clip of the run with its ``sample_seed``: from the latent cache (``latents``,
        ``text_embeds``) when one is attached, else the row decoded (:meth:`raw_row`)."""
        epoch, position = divmod(index, len(self.rows))
        row = self.order(epoch)[position]
        seed = {"sample_seed": self.seed * 1_000_003 + index}
        if self.cache is not None:
            latents, text = self.cache.read(row)
            return {"latents": latents.unsqueeze(0), "text_embeds": text.unsqueeze(0), **seed}
        return {**self.raw_row(row), **seed}

    def raw_row(self, row: int) -> dict[str, torch.Tensor]:
        """Row ``row`` decoded: ``pixels [1, 3, F, H, W]`` and prompt ``input_ids`` / ``attention_mask``
        ``[1, text_length]``; the row is named in any error."""
        where, prompt, kind, media = self.rows[row]
        try:
            pixels = load_clip(media, kind, **self.clip_options)
        except Exception as error:  # PyAV / PIL raise many types: any means this file cannot be used
            raise DataError(f"{where}: cannot read {kind} {media}: {error}. Fix: replace or remove the file.") from None
        return {"pixels": pixels.unsqueeze(0), **self.tokenize(prompt, where)}

    def cache_fingerprint(self) -> dict[str, Any]:
        """What cached latents and text embeddings depend on (besides the condition model): rows and clip options."""
        rows = [(str(where), prompt, kind, media) for where, prompt, kind, media in self.rows]
        return {"rows": rows, "clip": self.clip_options, "text_length": self.text_length,
                "truncate_prompts": self.truncate_prompts, "tokenizer": str(self.tokenizer_path)}  # fmt: skip

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
        """Steps of this dp rank's clips (one list of ``grad_accum_steps`` micro-batches per optimizer step), from
        the trainer's current step (a resumed run continues the sequence)."""
        if not self.rows:
            self.setup("fit")
        steps = self.num_epochs * len(self.rows) // (self.dp_size * self.grad_accum_steps)
        start = int(self.trainer.global_step) if self.trainer is not None else 0
        return DataLoader(_Clips(self, steps, start), batch_size=None, num_workers=self.num_workers,
                          persistent_workers=False)  # fmt: skip
