"""Greedy packing of encoded samples into fixed-size micro-batches, and building the micro-batch tensors.

A micro-batch is exactly ``micro_batch_tokens`` long. Samples are laid end to end and never split across
micro-batches; the tail is padding that forms its own segment. ``position_ids`` restart at 0 for every segment and
``cu_seqlens`` marks the boundaries, so varlen attention never crosses samples. Labels are shifted here, because
only here are sample boundaries known: a sample's last token never predicts the next sample's first token.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch

IGNORE_INDEX = -100

#: ``(input_ids, loss_mask)``, or ``(input_ids, loss_mask, extras)`` where ``extras`` carries what a multimodal
#: sample brings along (its media tensors, 3-D position ids); packing keeps it with its sample.
Sample = tuple[list[int], list[bool]] | tuple[list[int], list[bool], dict]


class GreedyPacker:
    """Fill micro-batches of ``micro_batch_tokens`` greedily, in arrival order; an overlong sample is truncated or dropped.

    ``add`` returns the micro-batches (lists of samples) completed by adding a sample, ``flush`` the last partial one.
    ``truncated``/``dropped`` count overlong samples and ``empty`` zero-length ones (which are skipped).
    """

    def __init__(self, micro_batch_tokens: int, overlong: Literal["truncate", "drop"] = "truncate") -> None:
        if micro_batch_tokens < 2:
            raise ValueError(f"micro_batch_tokens must be >= 2, got {micro_batch_tokens}")
        self.budget = micro_batch_tokens
        self.overlong = overlong
        self.current: list[Sample] = []
        self.used = 0
        self.truncated = 0
        self.dropped = 0
        self.empty = 0

    def add(self, ids: list[int], mask: list[bool], extras: dict | None = None) -> list[list[Sample]]:
        """Add one sample; returns the micro-batches this closed (zero or one).

        A sample with ``extras`` (media) is never truncated: cutting it would separate image tokens from their image,
        so an overlong one is dropped.
        """
        n = len(ids)
        if n == 0:
            self.empty += 1
            return []
        if n > self.budget:
            if self.overlong == "drop" or extras is not None:
                self.dropped += 1
                return []
            self.truncated += 1
            ids, mask, n = ids[: self.budget], mask[: self.budget], self.budget
        done: list[list[Sample]] = []
        if self.used + n > self.budget:
            done.append(self.current)
            self.current, self.used = [], 0
        self.current.append((ids, mask) if extras is None else (ids, mask, extras))
        self.used += n
        return done

    def flush(self) -> list[list[Sample]]:
        """Return the last partial micro-batch (if any) and reset."""
        out = [self.current] if self.current else []
        self.current, self.used = [], 0
        return out


def build_micro_batch(samples: list[Sample], micro_batch_tokens: int, pad_id: int) -> dict:
    """Build the micro-batch dict of the training contract from packed samples.

    Keys: ``input_ids``/``labels``/``position_ids`` LongTensor [1, T], ``cu_seqlens`` int32 [segments + 1],
    ``max_seqlen`` int, ``num_loss_tokens`` int and ``num_tokens`` int (the real tokens before the padding), where T = ``micro_batch_tokens`` and labels are already shifted
    (``labels[t] = input_ids[t + 1]`` inside a sample where token t+1 is a loss token, else -100).
    """
    T = micro_batch_tokens
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    seqlens: list[int] = []
    for ids, mask, *_ in samples:
        n = len(ids)
        input_ids.extend(ids)
        labels.extend(ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(n - 1))
        labels.append(IGNORE_INDEX)
        positions.extend(range(n))
        seqlens.append(n)
    used = len(input_ids)
    if used > T:
        raise AssertionError(f"packed {used} tokens into a micro-batch of {T}")  # packer bug, not data
    if used < T:
        pad = T - used
        input_ids.extend([pad_id] * pad)
        labels.extend([IGNORE_INDEX] * pad)
        positions.extend(range(pad))
        seqlens.append(pad)
    cu = [0]
    for n in seqlens:
        cu.append(cu[-1] + n)
    num_loss = sum(1 for x in labels if x != IGNORE_INDEX)
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "max_seqlen": max(seqlens),
        "num_loss_tokens": num_loss,
        "num_tokens": used,
    }


def iter_packed(samples: Iterator[Sample], packer: GreedyPacker) -> Iterator[list[Sample]]:
    """Pack a stream of samples; yields each micro-batch's sample list, flushing the tail at the end of the stream."""
    for sample in samples:
        yield from packer.add(*sample)
    yield from packer.flush()
