"""A training wrapper around transformers' Qwen-VL style image-text-to-text models, and their small adapter.

``VisionLanguageWithLoss`` is the FSDP root. One forward per micro-batch: the vision tower runs **once** on the
micro-batch's images and video frames together (a rank with none runs it on a tiny dummy input: every rank calls
every FSDP-sharded block the same number of times, so no collective is left waiting), its features are scattered
into the token embeddings of the full sequence, the sequence is cut for this SP rank (the one visible place), and
the language model + chunked cross-entropy run on the slice.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from veomni_lightning.models.causal_lm import CausalLMWithLoss
from veomni_lightning.parallel.attention import packed_attention_kwargs
from veomni_lightning.parallel.audio import split_audio_tower
from veomni_lightning.parallel.sequence import shard_packed_batch
from veomni_lightning.parallel.vision import padding_image, split_vision_tower

__all__ = ["VisionLanguageAdapter", "VisionLanguageWithLoss"]


@dataclass(frozen=True)
class VisionLanguageAdapter:
    """Where a Qwen-VL style model keeps its parts (Qwen2-VL, Qwen2.5-VL, Qwen3-VL and the Qwen-Omni thinkers share
    these names).

    ``inner``: the module holding ``visual`` (the tower: ``merger`` projects to the LM width), ``audio_tower`` (omni),
    the decoder and ``get_rope_index``: the model under the LM head (``model.model``), or the model itself where the
    towers sit beside the LM head (the Qwen2.5-Omni thinker before transformers 5.23, whose decoder is ``model``).
    The config's ``image_token_id`` / ``video_token_id`` / ``audio_token_id`` are the placeholders the features
    replace.
    """

    tower: str = "visual"
    projector: str = "merger"
    decoder: str = "language_model"
    audio: str = "audio_tower"

    def inner(self, hf_model: nn.Module) -> nn.Module:
        """The module holding the towers, the decoder and ``get_rope_index``."""
        inner = getattr(hf_model, "model", None)
        return inner if inner is not None and hasattr(inner, self.tower) else hf_model

    def language_model(self, hf_model: nn.Module) -> nn.Module:
        """The decoder (the layers under the LM head)."""
        decoder = getattr(self.inner(hf_model), self.decoder, None)
        return decoder if decoder is not None else hf_model.model

    def vision_tower(self, hf_model: nn.Module) -> nn.Module:
        """The vision encoder (patch embedding, blocks, merger)."""
        return getattr(self.inner(hf_model), self.tower)

    def audio_tower(self, hf_model: nn.Module) -> nn.Module | None:
        """The audio encoder of an omni model (None for a vision-language model)."""
        return getattr(self.inner(hf_model), self.audio, None)

    def encoders(self, hf_model: nn.Module) -> list[nn.Module]:
        """The media encoders: the vision tower, and the audio tower when there is one."""
        audio = self.audio_tower(hf_model)
        return [self.vision_tower(hf_model), *([] if audio is None else [audio])]

    def split_for_sequence_parallel(self, hf_model: nn.Module, group: Any) -> list[Any]:
        """Run the towers' blocks on each SP rank's slice of the patches / audio frames (``parallel/vision.py``,
        ``parallel/audio.py``)."""
        tower = self.vision_tower(hf_model)
        handles = split_vision_tower(list(tower.blocks), self.projector_modules(hf_model), group)
        if (audio := self.audio_tower(hf_model)) is not None:
            handles += split_audio_tower(list(audio.layers), group)
        return handles

    def projector_modules(self, hf_model: nn.Module) -> list[nn.Module]:
        """The modules mapping vision features to the LM width: the merger, and Qwen3-VL's deepstack mergers."""
        tower = self.vision_tower(hf_model)
        return [getattr(tower, self.projector), *getattr(tower, "deepstack_merger_list", [])]

    def precomputed_vision_kwargs(
        self, hf_model: nn.Module, grids: list[list[int]], device: torch.device
    ) -> dict[str, Any]:
        """The tower's per-batch index tensors computed on the host from ``grids`` (Python ints), so its forward
        does not read the device: packed segment offsets and their longest length, the rotary position ids, for a
        tower with a learned position table resampled per image (Qwen3-VL) the resampling indices and weights, and,
        for a windowed tower (Qwen2.5-VL), the window order and offsets. transformers' vision encoders take them as
        keyword arguments (``transformers.vision_utils``); empty when this transformers has no such support."""
        try:
            from transformers import vision_utils
            from transformers.vision_utils import get_vision_window_index
        except ImportError:  # older transformers: the tower computes them itself
            return {}
        tower = self.vision_tower(hf_model)
        # Plain Python and per-image cached tables rather than torch CPU ops over the batch: on the device these would
        # read it back (`grid.tolist()`, `repeat_interleave`, `arange(sum)`), and torch's CPU ops run through its
        # intra-op thread pool, which costs milliseconds per op on some hosts (tens per micro-batch, measured on H100).
        lengths = [h * w for t, h, w in grids for _ in range(t)]
        out: dict[str, Any] = {
            "cu_seqlens": torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32),
            "max_seqlen": max(lengths),
        }
        if hasattr(vision_utils, "get_vision_position_ids"):
            interpolate = hasattr(vision_utils, "get_vision_interpolation_indices_and_weights")
            table = (getattr(tower, "num_grid_per_side", None), getattr(tower, "interpolation_mode", None),
                     getattr(tower, "interpolation_align_corners", None)) if interpolate else (None, None, None)  # fmt: skip
            parts = [_image_vision_tables(tuple(g), tower.spatial_merge_size, *table) for g in grids]
            names = ["position_ids"] + (["interp_indices", "interp_weights"] if table[0] is not None else [])
            out.update({name: torch.from_numpy(np.concatenate([p[i] for p in parts])) for i, name in enumerate(names)})
        if hasattr(tower, "window_size") and hasattr(tower, "fullatt_block_indexes"):
            grid = torch.tensor(grids, dtype=torch.long)
            index, cu_window = get_vision_window_index(grid, tower.spatial_merge_size, tower.window_size,
                                                       tower.patch_size)  # fmt: skip
            out.update(window_index=index, cu_window_seqlens=cu_window,
                       max_window_seqlen=int((cu_window[1:] - cu_window[:-1]).max()))  # fmt: skip
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in out.items()}

    def dummy_vision_input(self, hf_model: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """One tiny image from the config: ``merge × merge`` patches of one temporal patch (what ranks without media
        feed the tower). Its dtype is decided when it is fed: that of a live tower parameter at call time."""
        vision = hf_model.config.vision_config
        merge = vision.spatial_merge_size
        dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        grid = torch.tensor([[1, merge, merge]], device=device)
        return torch.zeros(merge * merge, dim, device=device), grid

    def dummy_audio_input(self, hf_model: nn.Module, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """A tiny silent audio (4 mel frames: 2 encoder frames, 1 feature) for ranks without audio; ``[frames, mel]``
        like the data pipeline's features, dtype decided when fed."""
        mel = hf_model.config.audio_config.num_mel_bins
        return torch.zeros(4, mel, device=device), [4]

    def precomputed_audio_kwargs(
        self, hf_model: nn.Module, features: torch.Tensor, lengths: list[int], device: torch.device
    ) -> dict[str, Any]:
        """The audio tower's chunking and index tensors from the host ``lengths`` (mel frames per audio), so its
        forward does not read the device: padded chunks, chunk lengths, segment offsets and their longest length,
        valid-frame and pooling indices. Uses the functions the tower's own module defines for it (transformers'
        precomputed-kwargs convention); empty when that module has none (the tower then computes them itself)."""
        tower = self.audio_tower(hf_model)
        functions = sys.modules[type(tower).__module__]
        expected = {"chunk_and_pad_features": ["input_features", "feature_lens", "n_window", "kwargs"],
                    "get_audio_cu_seqlens": ["chunk_lengths", "kwargs"], "get_valid_indices": ["chunk_lengths", "kwargs"],
                    "get_pool_indices": ["feature_lens", "kwargs"]}  # fmt: skip
        for name, params in expected.items():  # Qwen2.5-Omni's; another tower's functions take other arguments
            if list(inspect.signature(getattr(functions, name, _no_function)).parameters) != params:
                return {}
        host_lengths = torch.tensor(lengths, dtype=torch.long)
        # Chunk boundaries are host numbers; only the split of the (device) features happens on the device.
        padded, chunk_lengths = functions.chunk_and_pad_features(features.T, host_lengths, tower.n_window)
        cu = functions.get_audio_cu_seqlens(chunk_lengths)
        out = {
            "padded_feature": padded,
            "chunk_lengths": chunk_lengths,
            "cu_seqlens": cu,
            "max_seqlen": int((cu[1:] - cu[:-1]).max()),
            "valid_indices": functions.get_valid_indices(chunk_lengths),
            "pool_indices": functions.get_pool_indices(host_lengths),
        }
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in out.items()}


def _no_function() -> None:
    """Stands in for a function a tower's module does not define."""


class VisionLanguageWithLoss(nn.Module):
    """Vision tower + feature scatter + SP cut + decoder + fused cross-entropy; returns this rank's summed loss.

    Args:
        hf_model: a transformers ``*ForConditionalGeneration`` VLM (Qwen2-VL / Qwen2.5-VL / Qwen3-VL layout).
        adapter: where its parts are.
        ce_chunk_size: tokens per chunk of the fused cross-entropy.
    """

    def __init__(self, hf_model: nn.Module, adapter: VisionLanguageAdapter, ce_chunk_size: int = 4096) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.adapter = adapter
        decoder = adapter.language_model(hf_model)
        self.lm = CausalLMWithLoss(hf_model, ce_chunk_size=ce_chunk_size, decoder=decoder)

    def vision_features(
        self, micro_batch: dict[str, Any], device: torch.device, sp_size: int, sp_group: Any
    ) -> tuple[torch.Tensor, Any, bool]:
        """The tower's merged features for all images then all videos of the micro-batch (dummy when none).

        Under SP the tower's blocks run on this rank's slice of the patches (``parallel/vision.py``); a padding image
        makes the patches divide evenly, and its features are dropped here.
        """
        pixels, grids = [], []
        for pixels_key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if micro_batch.get(pixels_key) is not None:
                pixels.append(micro_batch[pixels_key])
                grids.append(micro_batch[grid_key])
        real = bool(pixels)
        if not real:
            pixel, grid = self.adapter.dummy_vision_input(self.hf_model, device)
            pixels, grids = [pixel], [grid]
        merge = self.hf_model.config.vision_config.spatial_merge_size
        patches = sum(p.shape[0] for p in pixels)
        keep = patches // merge**2
        host_grids = micro_batch.get("vision_grids") if real else [[1, merge, merge]]
        if sp_size > 1 and (pad := padding_image(patches, merge, sp_size, pixels[0].shape[-1], device)) is not None:
            pixels.append(pad[0])
            grids.append(pad[1])
            host_grids = None if host_grids is None else [*host_grids, pad[2]]
        precomputed = {}
        if host_grids is not None:
            precomputed = self.adapter.precomputed_vision_kwargs(self.hf_model, host_grids, device)
        tower = self.adapter.vision_tower(self.hf_model)
        # The live dtype, read now: under FSDP2 mixed precision the stored parameters are fp32 and the compute bf16.
        dtype = next(tower.parameters()).dtype
        out = tower(torch.cat(pixels).to(dtype), grid_thw=torch.cat(grids), sp_group=sp_group, **precomputed)
        deepstack = getattr(out, "deepstack_features", None)
        return out.pooler_output[:keep], [d[:keep] for d in deepstack] if deepstack else None, real

    def audio_features(
        self, micro_batch: dict[str, Any], device: torch.device, sp_size: int, sp_group: Any
    ) -> tuple[torch.Tensor | None, bool]:
        """The audio tower's features for the micro-batch's audios in order (a silent dummy when none; None without
        an audio tower). Under SP the tower's layers run on this rank's slice of the frames (``parallel/audio.py``)."""
        tower = self.adapter.audio_tower(self.hf_model)
        if tower is None:
            return None, False
        real = micro_batch.get("input_features") is not None
        if real:
            features = micro_batch["input_features"]
            lengths = micro_batch.get("audio_lengths") or micro_batch["audio_feature_lengths"].tolist()
        else:
            features, lengths = self.adapter.dummy_audio_input(self.hf_model, device)
        precomputed = self.adapter.precomputed_audio_kwargs(self.hf_model, features, lengths, device)
        # The live dtype of the front end, read now (FSDP2 mixed precision: stored fp32, computed in bf16).
        dtype = next(tower.get_input_embeddings().parameters()).dtype
        feature_lens = torch.tensor(lengths, device=device)
        if precomputed:
            precomputed["padded_feature"] = precomputed["padded_feature"].to(dtype)
        out = tower(features.T.to(dtype), feature_lens=feature_lens, sp_group=sp_group, **precomputed)
        return out.last_hidden_state, real

    def forward(self, micro_batch: dict[str, Any], sp_rank: int, sp_size: int, sp_group: Any) -> torch.Tensor:
        """This rank's summed token loss for one packed micro-batch (SP: its slice of the sequence)."""
        config = self.hf_model.config
        ids = micro_batch["input_ids"]
        embeds = self.hf_model.get_input_embeddings()(ids)
        features, deepstack, real = self.vision_features(micro_batch, embeds.device, sp_size, sp_group)
        extra: dict[str, Any] = {}
        if real:
            visual = (ids == config.image_token_id) | (ids == config.video_token_id)
            # Images come first in ``features``, then videos; scatter each kind into its own placeholders in order.
            n_image = _image_features_count(micro_batch, ids, config)
            embeds = embeds.masked_scatter(
                (ids == config.image_token_id)[..., None], features[:n_image].to(embeds.dtype)
            )
            embeds = embeds.masked_scatter(
                (ids == config.video_token_id)[..., None], features[n_image:].to(embeds.dtype)
            )
            if deepstack:
                order = _visual_order(ids, config, n_image)
                extra["visual_pos_masks"] = visual
                extra["deepstack_visual_embeds"] = [d[order] for d in deepstack]
        else:
            embeds = embeds + 0.0 * features.sum()  # the dummy's gradient path: same collectives, zero contribution
            if deepstack:
                embeds = embeds + 0.0 * sum(d.sum() for d in deepstack)
        audio, audio_real = self.audio_features(micro_batch, embeds.device, sp_size, sp_group)
        if audio_real:
            embeds = embeds.masked_scatter((ids == config.audio_token_id)[..., None], audio.to(embeds.dtype))
        elif audio is not None:
            embeds = embeds + 0.0 * audio.sum()
        local = shard_packed_batch({**micro_batch, "inputs_embeds": embeds}, sp_rank, sp_size)
        if "visual_pos_masks" in extra:
            extra = _local_deepstack(extra, ids.shape[-1], sp_rank, sp_size)
        attention = packed_attention_kwargs(local["cu_seqlens"], local["max_seqlen"], sp_group)
        return self.lm(local["labels"], local["position_ids"], inputs_embeds=local["inputs_embeds"], **extra,
                       **attention)  # fmt: skip


def _image_features_count(micro_batch: dict[str, Any], ids: torch.Tensor, config: Any) -> int:
    """Merged image features in the micro-batch: from the host grids when the data pipeline gave them (no sync)."""
    if micro_batch.get("pixel_values") is None:
        return 0
    grids = micro_batch.get("vision_grids")
    if grids is None:
        return int((ids == config.image_token_id).sum())
    images = micro_batch["image_grid_thw"].shape[0]
    merge = config.vision_config.spatial_merge_size
    return sum(t * h * w for t, h, w in grids[:images]) // merge**2


def _visual_order(ids: torch.Tensor, config: Any, n_image: int) -> torch.Tensor:
    """Rows of ``[image features; video features]`` in sequence order of their placeholders."""
    flat = ids.reshape(-1)
    is_image = flat == config.image_token_id
    visual = is_image | (flat == config.video_token_id)
    kinds = is_image[visual]  # per visual position: image (True) or video
    rank_in_kind = torch.where(kinds, torch.cumsum(kinds, 0) - 1, torch.cumsum(~kinds, 0) - 1 + n_image)
    return rank_in_kind


def _local_deepstack(extra: dict[str, Any], seq_len: int, sp_rank: int, sp_size: int) -> dict[str, Any]:
    """Qwen3-VL's deepstack inputs for this SP rank's slice: its visual positions and their feature rows."""
    if sp_size == 1:
        return extra  # the whole sequence: nothing to cut (and no device read for the counts below)
    mask = extra["visual_pos_masks"]
    pad = (-seq_len) % sp_size
    if pad:
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=-1)
    local = mask.shape[-1] // sp_size
    before = int(mask[..., : sp_rank * local].sum())
    mine = mask[..., sp_rank * local : (sp_rank + 1) * local]
    count = int(mine.sum())
    return {
        "visual_pos_masks": mine,
        "deepstack_visual_embeds": [d[before : before + count] for d in extra["deepstack_visual_embeds"]],
    }


@functools.lru_cache(maxsize=4096)
def _image_vision_tables(
    grid: tuple[int, int, int], merge: int, side: int | None, mode: str | None, align_corners: bool | None
) -> tuple[np.ndarray, ...]:
    """One image's rotary position ids and, for a learned ``side × side`` position table, its resampling indices and
    weights (``transformers.vision_utils``), as read-only arrays. They depend on the grid alone, not on where the
    image sits in the batch, so a batch's tables are these concatenated, and each grid is computed once."""
    from transformers import vision_utils

    one = torch.tensor([grid], dtype=torch.long)
    tables = [vision_utils.get_vision_position_ids(one, merge)]
    if side is not None:
        tables += vision_utils.get_vision_interpolation_indices_and_weights(
            one, num_grid_per_side=side, mode=mode, align_corners=align_corners, spatial_merge_size=merge
        )
    arrays = tuple(t.numpy() for t in tables)
    for a in arrays:
        a.setflags(write=False)
    return arrays
