"""Sequence parallelism inside a Whisper-style audio tower (Qwen2.5-Omni): each SP rank runs its share of the frames.

The tower turns each audio's mel features into frames with a convolutional front end, runs its encoder layers on
all frames of the micro-batch at once (attention within fixed-size chunks, given as ``cu_seqlens``), then pools and
projects. :func:`split_audio_tower` adds hooks, not a new forward:

* before the first layer, the frame sequence is cut to this rank's contiguous slice;
* attention inside the layers is the Ulysses function registered as ``ENCODER_ATTENTION`` (all-to-all to the full
  sequence with local heads, bidirectional varlen attention over the chunks, all-to-all back);
* after the last layer the slices are all-gathered, so pooling and projection see the full sequence on every rank.

The frame count must divide by the SP size: the caller appends a short padding audio (:func:`padding_audio`) whose
features it drops after the tower. Gradients follow the vision tower's rule (``parallel/vision.py``): the gather's
backward sums the partial gradients over the group and keeps this rank's slice; the reduction over dp × sp then
gives the single-process gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from veomni_lightning.parallel.vision import GatherSlices

__all__ = ["frames_after_front_end", "padding_audio", "split_audio_tower"]


def split_audio_tower(layers: list[nn.Module], group: dist.ProcessGroup | None) -> list[Any]:
    """Hook the first of ``layers`` to take this rank's slice of the frames and the last to all-gather the slices.

    No-op without a group of more than one rank. Returns the hook handles (``handle.remove()`` undoes them).
    """
    if group is None or dist.get_world_size(group) == 1:
        return []
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    def before_first(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[0] % world:
            raise ValueError(f"{hidden.shape[0]} audio frames do not split over {world} SP ranks: pad the audio.")
        local = hidden.shape[0] // world
        hidden = hidden.narrow(0, rank * local, local)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def after_last(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (GatherSlices.apply(output[0], group), *output[1:])
        return GatherSlices.apply(output, group)

    return [
        layers[0].register_forward_pre_hook(before_first, with_kwargs=True),
        layers[-1].register_forward_hook(after_last),
    ]


def frames_after_front_end(feature_lengths: list[int], n_window: int) -> int:
    """Encoder frames of audios with ``feature_lengths`` mel frames: chunks of ``2·n_window``, one stride-2 conv."""
    chunk = 2 * n_window
    frames = 0
    for length in feature_lengths:
        full, tail = divmod(length, chunk)
        frames += full * ((chunk - 1) // 2 + 1) + ((tail - 1) // 2 + 1 if tail else 0)
    return frames


def padding_audio(
    feature_lengths: list[int], n_window: int, sp: int, mel_bins: int, device: torch.device
) -> tuple[torch.Tensor, int] | None:
    """A zero audio that makes the encoder frames divide by ``sp`` (None if they already do).

    ``2k − 1`` mel frames give ``k`` encoder frames (one stride-2 conv) and pool to fewer than ``k`` features, all
    dropped after the tower. Returns ``(features [frames, mel_bins], frames)``.
    """
    missing = (-frames_after_front_end(feature_lengths, n_window)) % sp
    if missing == 0:
        return None
    frames = 2 * missing - 1
    return torch.zeros(frames, mel_bins, device=device), frames
