"""Sequence parallelism inside a Whisper-style audio tower (Qwen2.5-Omni): each SP rank runs its share of the frames.

The tower turns each audio's mel features into frames with a convolutional front end, runs its encoder layers on
all frames of the micro-batch at once (attention within fixed-size chunks, given as ``cu_seqlens``), then pools and
projects. :func:`split_audio_tower` adds hooks, not a new forward:

* before the first layer, the frame sequence is padded to a multiple of the SP size (the padding is an attention
  segment of its own) and cut to this rank's contiguous slice;
* attention inside the layers is the Ulysses function registered as ``ENCODER_ATTENTION`` (all-to-all to the full
  sequence with local heads, bidirectional varlen attention over the chunks, all-to-all back);
* after the last layer the slices are all-gathered and the padding dropped, so pooling and projection see the full
  sequence on every rank.

Gradients follow the vision tower's rule (``parallel/vision.py``): the gather's
backward sums the partial gradients over the group and keeps this rank's slice; the reduction over dp × sp then
gives the single-process gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from veomni_lightning.parallel.vision import GatherSlices

__all__ = ["frames_after_front_end", "split_audio_tower"]


def split_audio_tower(layers: list[nn.Module], group: dist.ProcessGroup | None) -> list[Any]:
    """Hook ``layers`` to run on this rank's slice of the audio frames; the last one all-gathers the slices.

    Before the first layer the frames are padded with zeros to a multiple of the group size (the padding is its own
    attention segment: a ``cu_seqlens`` entry is appended for every layer) and cut to this rank's slice; after the
    last layer the slices are gathered and the padding dropped. Every layer also receives ``sp_group`` (some towers'
    layer loops pass no keyword arguments on). No-op without a group of more than one rank. Returns the handles.
    """
    if group is None or dist.get_world_size(group) == 1:
        return []
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    first, last = layers[0], layers[-1]
    state = {"frames": 0, "pad": 0}  # of the forward in flight (recomputation repeats the first layer's hook)

    def before_each(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = list(args), dict(kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        if module is first:
            frames = hidden.shape[0]
            state.update(frames=frames, pad=(-frames) % world)
            hidden = F.pad(hidden, (0, 0, 0, state["pad"]))
            local = hidden.shape[0] // world
            hidden = hidden.narrow(0, rank * local, local)
        if args:
            args[0] = hidden
        else:
            kwargs["hidden_states"] = hidden
        if state["pad"]:
            where = (args, 1) if len(args) > 1 else (kwargs, "cu_seqlens")
            cu = where[0][where[1]]
            where[0][where[1]] = torch.cat([cu, cu[-1:] + state["pad"]])
            if isinstance(kwargs.get("max_seqlen"), int):
                kwargs["max_seqlen"] = max(kwargs["max_seqlen"], state["pad"])
        kwargs["sp_group"] = group
        return tuple(args), kwargs

    def after_last(module: nn.Module, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = GatherSlices.apply(hidden, group)[: state["frames"]]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [layer.register_forward_pre_hook(before_each, with_kwargs=True) for layer in layers]
    return [*handles, last.register_forward_hook(after_last)]


def frames_after_front_end(feature_lengths: list[int], n_window: int) -> int:
    """Encoder frames of audios with ``feature_lengths`` mel frames for a Whisper-style front end (Qwen2.5-Omni):
    chunks of ``2·n_window`` mel frames, one stride-2 convolution (for the MFU count)."""
    chunk = 2 * n_window
    frames = 0
    for length in feature_lengths:
        full, tail = divmod(length, chunk)
        frames += full * ((chunk - 1) // 2 + 1) + ((tail - 1) // 2 + 1 if tail else 0)
    return frames
