"""The Lightning data module: a deterministic, resumable stream of packed micro-batches split over data-parallel ranks.

Every dp rank reads, tokenizes and packs the *same* stream (same files, seed and epoch order) and keeps only its
own micro-batches: step s of the run covers global micro-batches [s*G, (s+1)*G) with G = dp_size * grad_accum_steps,
and dp rank r takes [s*G + r*A, s*G + (r+1)*A) with A = grad_accum_steps. So one process with grad_accum_steps = dp*A
sees exactly the union of what dp ranks see. Nothing here knows about sequence parallelism: the training module
slices the sequence dimension itself.
"""

from __future__ import annotations

import itertools
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from veomni_lightning.errors import ConfigError

from .packing import GreedyPacker, Sample, build_micro_batch, iter_packed
from .sources import DataError, expand_files, iter_epoch_rows, iter_file_rows
from .tokenize import SampleEncoder, load_tokenizer, pad_token_id

#: Rows of each data file read and tokenized at setup, before the model is built.
FIRST_ROWS_CHECKED = 8

STAT_KEYS = (
    "rows",
    "samples",
    "skipped_bad_rows",
    "truncated",
    "dropped_overlong",
    "empty_samples",
    "micro_batches",
    "tokens",
    "padding_tokens",
    "epochs_completed",
    "dropped_tail_micro_batches",
)


def encode_row(encoder: SampleEncoder, row: Any, loc: Any) -> Sample:
    """Tokenize one row; a row that did not parse, or does not encode, raises its :class:`DataError`."""
    try:
        if isinstance(row, DataError):  # the row could not even be parsed
            raise row
        return encoder.encode(row, loc)
    except DataError as e:
        raise DataError(f"{e} (or set on_bad_row='skip' to skip and count such rows)") from None


class PackedStepDataset(IterableDataset):
    """Iterable yielding, per optimizer step, this dp rank's list of ``grad_accum_steps`` packed micro-batches.

    ``skip_micro_batches`` global micro-batches are consumed (read and packed, but not turned into tensors) before
    the first step is formed, which is how resuming works. ``num_epochs=None`` repeats forever, reshuffling each
    epoch; with a finite stream a last incomplete step is dropped so every rank yields the same number of steps.
    Counters live in a shared-memory tensor so they are visible from the main process even when a DataLoader worker
    produces the stream.
    """

    def __init__(
        self,
        files: list[str],
        encoder: SampleEncoder,
        *,
        micro_batch_tokens: int,
        pad_id: int,
        grad_accum_steps: int = 1,
        dp_rank: int = 0,
        dp_size: int = 1,
        overlong: Literal["truncate", "drop"] = "truncate",
        on_bad_row: Literal["error", "skip"] = "error",
        shuffle: bool = True,
        shuffle_buffer: int = 10000,
        seed: int = 0,
        num_epochs: int | None = None,
        text_key: str = "text",
        skip_micro_batches: int = 0,
        name: str = "train",
        build: Callable[[list[Sample], int, int], dict] = build_micro_batch,
    ) -> None:
        super().__init__()
        self.build = build  # packed samples -> micro-batch dict (multimodal data adds its media)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.files = files
        self.encoder = encoder
        self.micro_batch_tokens = micro_batch_tokens
        self.pad_id = pad_id
        self.grad_accum_steps = grad_accum_steps
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.overlong = overlong
        self.on_bad_row = on_bad_row
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.num_epochs = num_epochs
        self.text_key = text_key
        self.skip_micro_batches = skip_micro_batches
        self.name = name
        # Shared memory: a DataLoader worker writes, the main process reads `stats`.
        self._stats = torch.zeros(len(STAT_KEYS), dtype=torch.long).share_memory_()

    @property
    def stats(self) -> dict[str, int]:
        """Counters of the latest iteration (including any part skipped on resume)."""
        return {k: int(v) for k, v in zip(STAT_KEYS, self._stats.tolist())}

    def _samples(self, counts: dict[str, int]) -> Iterator[Sample]:
        epochs = itertools.count() if self.num_epochs is None else range(self.num_epochs)
        for epoch in epochs:
            for row, loc in iter_epoch_rows(
                self.files,
                epoch=epoch,
                seed=self.seed,
                shuffle=self.shuffle,
                buffer_size=self.shuffle_buffer,
                text_key=self.text_key,
            ):
                counts["rows"] += 1
                try:
                    sample = encode_row(self.encoder, row, loc)
                except DataError:
                    if self.on_bad_row == "error":
                        raise
                    counts["skipped_bad_rows"] += 1
                    continue
                counts["samples"] += 1
                yield sample
            counts["epochs_completed"] += 1
            if epoch == 0:
                self._warn(counts, "after the first pass over the data")

    def _warn(self, counts: dict[str, int], when: str) -> None:
        # One summary per iteration, from dp rank 0 only (all ranks see the same stream, so the same numbers).
        if self._warned or self.dp_rank != 0:
            return
        keys = ("skipped_bad_rows", "truncated", "dropped_overlong", "empty_samples", "dropped_tail_micro_batches")
        bad = {k: counts[k] for k in keys if counts[k]}
        if bad:
            self._warned = True
            warnings.warn(
                f"{self.name} data, {when}: {', '.join(f'{k}={v}' for k, v in bad.items())} "
                f"(of {counts['rows']} rows; see datamodule.stats)",
                stacklevel=2,
            )

    def _publish(self, counts: dict[str, int], packer: GreedyPacker) -> None:
        counts["truncated"], counts["dropped_overlong"], counts["empty_samples"] = (
            packer.truncated,
            packer.dropped,
            packer.empty,
        )
        self._stats.copy_(torch.tensor([counts[k] for k in STAT_KEYS], dtype=torch.long))

    def __iter__(self) -> Iterator[list[dict]]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError("PackedStepDataset supports at most one DataLoader worker (more would duplicate data).")
        self._warned = False
        counts = dict.fromkeys(STAT_KEYS, 0)
        packer = GreedyPacker(self.micro_batch_tokens, self.overlong)
        A, G = self.grad_accum_steps, self.grad_accum_steps * self.dp_size
        lo, hi = self.dp_rank * A, (self.dp_rank + 1) * A
        step: list[dict] = []
        g = 0  # global micro-batch index in the stream
        for bin_ in iter_packed(self._samples(counts), packer):
            used = sum(len(sample[0]) for sample in bin_)
            counts["micro_batches"] += 1
            counts["tokens"] += used
            counts["padding_tokens"] += self.micro_batch_tokens - used
            self._publish(counts, packer)
            rel = g - self.skip_micro_batches
            g += 1
            if rel < 0:
                continue
            pos = rel % G
            if lo <= pos < hi:  # only this rank's micro-batches are turned into tensors
                step.append(self.build(bin_, self.micro_batch_tokens, self.pad_id))
            if pos == G - 1:
                yield step
                step = []
        # A finite stream ends mid-step: drop the remainder so all ranks yield the same number of steps.
        counts["dropped_tail_micro_batches"] = max(0, g - self.skip_micro_batches) % G
        self._publish(counts, packer)
        self._warn(counts, "at the end of the stream")


class TextDataModule(pl.LightningDataModule):
    """Packed pretraining/SFT text data for Lightning (or Fabric) training loops.

    Reads JSON lines / parquet / plain-text files, tokenizes (chat template for ``messages`` rows, with loss only on
    assistant tokens), packs greedily into micro-batches of exactly ``micro_batch_tokens`` tokens, and yields per
    optimizer step a list of ``grad_accum_steps`` micro-batch dicts for this data-parallel rank. See the package
    docstring for the micro-batch contract. The data-parallel rank/size comes from ``set_data_parallel`` (Fabric),
    else from the attached trainer's ``strategy.distributed_sampler_kwargs`` in ``setup``, else (0, 1).

    Resuming: ``state_dict()`` records the consumed optimizer steps (``trainer.global_step`` when a trainer is
    attached, else the ``consumed_steps`` attribute, which a Fabric loop should keep up to date); after
    ``load_state_dict`` the next ``train_dataloader()`` starts exactly at that step.

    Args:
        train_files: one path or a list: ``.jsonl``/``.json`` (JSON Lines), ``.parquet``, ``.txt``/``.cor`` (one
            sample per line); globs, folders and ``package:<pkg>/<path>`` work.
        tokenizer: a tokenizer folder, hub id, ``.gguf`` or ``package:`` path (usually the model's).
        val_files: validation files (same forms); none: no validation.
        tokenizer_gguf_file: GGUF file name inside ``tokenizer`` when it is a folder.
        mode: ``sft`` (rows with ``messages``: chat template, loss on assistant tokens only), ``pretrain`` (rows
            with ``text``, loss on every token) or ``auto`` (by each row's keys).
        text_key: the key holding plain text.
        messages_key: the key holding the chat messages.
        micro_batch_tokens: tokens per packed micro-batch (one row of samples back to back).
        grad_accum_steps: micro-batches per optimizer step on each data-parallel rank.
        overlong: a sample longer than ``micro_batch_tokens``: ``truncate`` it or ``drop`` it.
        on_bad_row: a malformed row: ``error`` (names file, line and fix) or ``skip`` (counted in ``stats``).
        shuffle: shuffle rows through a buffer, differently each epoch.
        shuffle_buffer: rows held by the shuffle buffer.
        seed: seed of the shuffle.
        num_epochs: passes over the data; none: cycle until ``max_steps``.
        add_eos: end each plain-text sample with the tokenizer's EOS token.
        num_workers: 0 (produce the stream in the training process) or 1 (in one background worker).
        allow_global_batch_change: allow resuming with another dp × ``grad_accum_steps`` or
            ``micro_batch_tokens``; refused by default, since the global batch of the run would change.
    """

    def __init__(
        self,
        train_files: list[str] | str,
        tokenizer: str,
        val_files: list[str] | str | None = None,
        tokenizer_gguf_file: str | None = None,
        mode: Literal["auto", "pretrain", "sft"] = "auto",
        text_key: str = "text",
        messages_key: str = "messages",
        micro_batch_tokens: int = 2048,
        grad_accum_steps: int = 1,
        overlong: Literal["truncate", "drop"] = "truncate",
        on_bad_row: Literal["error", "skip"] = "error",
        shuffle: bool = True,
        shuffle_buffer: int = 10000,
        seed: int = 0,
        num_epochs: int | None = None,
        add_eos: bool = True,
        num_workers: int = 0,
        allow_global_batch_change: bool = False,
    ) -> None:
        super().__init__()
        checks = {
            "mode": (mode, ("auto", "pretrain", "sft")),
            "overlong": (overlong, ("truncate", "drop")),
            "on_bad_row": (on_bad_row, ("error", "skip")),
        }
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
        if num_workers not in (0, 1):
            raise ConfigError(
                f"num_workers must be 0 or 1, got {num_workers}: the whole packed stream is produced by one process "
                f"(one background worker with 1), and more workers would each produce the full stream (duplicates)."
            )
        if micro_batch_tokens < 2:
            raise ConfigError(f"micro_batch_tokens must be >= 2, got {micro_batch_tokens}")
        if grad_accum_steps < 1:
            raise ConfigError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        if num_epochs is not None and num_epochs < 1:
            raise ConfigError(f"num_epochs must be None (cycle forever) or >= 1, got {num_epochs}")
        if isinstance(train_files, str):  # one path, or a list of them
            train_files = [train_files]
        if isinstance(val_files, str):
            val_files = [val_files]
        self.train_files = list(train_files)
        self.val_files = list(val_files) if val_files else None
        if not self.val_files:
            # No validation data: Lightning then sees val_dataloader as not defined and skips validation, instead of
            # running an empty loop and warning that its length is zero.
            self.val_dataloader = types.MethodType(pl.LightningDataModule.val_dataloader, self)  # type: ignore[method-assign]
        self.tokenizer_path = tokenizer
        self.tokenizer_gguf_file = tokenizer_gguf_file
        self.mode = mode
        self.text_key = text_key
        self.messages_key = messages_key
        self.micro_batch_tokens = micro_batch_tokens
        self.grad_accum_steps = grad_accum_steps
        self.overlong = overlong
        self.on_bad_row = on_bad_row
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.num_epochs = num_epochs
        self.add_eos = add_eos
        self.num_workers = num_workers
        self.allow_global_batch_change = allow_global_batch_change
        # (micro-batches per step, tokens per micro-batch) of the checkpoint last loaded; checked once dp is known.
        self._resumed_batch: tuple[int | None, int | None] | None = None

        self.dp_rank, self.dp_size = 0, 1
        self._dp_explicit = False
        #: optimizer steps already consumed; Fabric loops update it, Lightning uses trainer.global_step instead.
        self.consumed_steps = 0
        # Stream position of the last load_state_dict: (steps, global micro-batches) at that point. The micro-batch
        # count may be None (a hand-written {"consumed_steps": n}); it is then n * G once the dp size is known.
        self._base_steps: int = 0
        self._base_micro_batches: int | None = 0
        self.tokenizer: Any = None
        self._encoder: SampleEncoder | None = None
        self._train_paths: list[str] | None = None
        self._val_paths: list[str] | None = None
        self._train_ds: PackedStepDataset | None = None
        self._val_ds: PackedStepDataset | None = None

    # ------------------------------------------------------------------------------------------ parallel setup
    def set_data_parallel(self, rank: int, size: int) -> None:
        """Set the data-parallel rank and size explicitly (Fabric loops); takes precedence over the trainer's."""
        if not 0 <= rank < size:
            raise ValueError(f"dp rank must be in [0, size={size}), got {rank}")
        self.dp_rank, self.dp_size = rank, size
        self._dp_explicit = True

    @property
    def global_micro_batches_per_step(self) -> int:
        """G = dp_size * grad_accum_steps: packed micro-batches the whole run consumes per optimizer step."""
        return self.dp_size * self.grad_accum_steps

    def _dp_from_trainer(self) -> None:
        if self._dp_explicit or self.trainer is None:
            return
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        self.dp_size = int(kwargs.get("num_replicas", 1))
        self.dp_rank = int(kwargs.get("rank", 0))

    def setup(self, stage: str | None = None) -> None:
        """Resolve the dp rank/size, check that all files exist, and load the tokenizer (once)."""
        self._dp_from_trainer()
        if self._train_paths is None:
            self._train_paths = expand_files(self.train_files, "train_files")
        if self.val_files and self._val_paths is None:
            self._val_paths = expand_files(self.val_files, "val_files")
        if self._encoder is None:
            self._encoder = self.make_encoder()
            self.check_first_rows()

    def make_encoder(self) -> Any:
        """Load the tokenizer and build the row encoder (multimodal data modules load a processor instead)."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_path, self.tokenizer_gguf_file)
        return SampleEncoder(self.tokenizer, self.mode, self.text_key, self.messages_key, self.add_eos)

    def check_first_rows(self, rows_per_file: int = FIRST_ROWS_CHECKED) -> None:
        """Read and tokenize the first rows of every train/val file, raising their :class:`DataError` now.

        ``setup`` runs this before the model is built, so a malformed file fails in seconds rather than after
        loading the weights (minutes for a large model). With ``on_bad_row="skip"`` bad rows are left to the stream.
        """
        assert self._encoder is not None
        if self.on_bad_row == "skip":
            return
        for path in [*(self._train_paths or []), *(self._val_paths or [])]:
            for row, loc in itertools.islice(iter_file_rows(path, self.text_key), rows_per_file):
                encode_row(self._encoder, row, loc)

    # ------------------------------------------------------------------------------------------ dataloaders
    def _dataset(self, files: list[str], **overrides: Any) -> PackedStepDataset:
        assert self._encoder is not None
        kwargs: dict[str, Any] = dict(
            micro_batch_tokens=self.micro_batch_tokens,
            pad_id=pad_token_id(self.tokenizer),
            grad_accum_steps=self.grad_accum_steps,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            overlong=self.overlong,
            on_bad_row=self.on_bad_row,
            shuffle=self.shuffle,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            num_epochs=self.num_epochs,
            text_key=self.text_key,
        )
        kwargs.update(overrides)
        return PackedStepDataset(files, self._encoder, build=self.build_micro_batch, **kwargs)

    def build_micro_batch(self, samples: list[Sample], micro_batch_tokens: int, pad_id: int) -> dict:
        """Packed samples -> one micro-batch dict (see the package docstring); multimodal data modules add media."""
        return build_micro_batch(samples, micro_batch_tokens, pad_id)

    def _loader(self, ds: PackedStepDataset) -> DataLoader:
        # batch_size=None: the dataset already yields the finished per-step item.
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers)

    def _current_steps(self) -> int:
        if self.trainer is not None:
            return int(self.trainer.global_step)
        return int(self.consumed_steps)

    def train_dataloader(self) -> DataLoader:
        """The training stream, starting at the consumed step (0, or where ``load_state_dict`` / the trainer is)."""
        if self._encoder is None:
            self.setup("fit")
        assert self._train_paths is not None
        self._check_global_batch()
        # Also right when Lightning rebuilds the loader mid-run: continue from the trainer's current step.
        skip = self._stream_position(self._current_steps())
        self._train_ds = self._dataset(self._train_paths, skip_micro_batches=skip)
        return self._loader(self._train_ds)

    def val_dataloader(self) -> DataLoader:
        """Finite, unshuffled validation stream; each item is a list holding one micro-batch (needs ``val_files``)."""
        if self._encoder is None:
            self.setup("validate")
        assert self._val_paths is not None
        self._val_ds = self._dataset(
            self._val_paths, grad_accum_steps=1, shuffle=False, num_epochs=1, skip_micro_batches=0, name="val"
        )
        return self._loader(self._val_ds)

    # ------------------------------------------------------------------------------------------ stats & state
    @property
    def stats(self) -> dict[str, int]:
        """Counters of the latest train iteration: rows, samples, skipped_bad_rows, truncated, dropped_overlong, ...

        They cover the whole global stream (all dp ranks see the same one), including any part skipped on resume.
        """
        return self._train_ds.stats if self._train_ds is not None else dict.fromkeys(STAT_KEYS, 0)

    @property
    def val_stats(self) -> dict[str, int]:
        """Counters of the latest validation iteration (same keys as ``stats``)."""
        return self._val_ds.stats if self._val_ds is not None else dict.fromkeys(STAT_KEYS, 0)

    def _stream_position(self, steps: int) -> int:
        """Global micro-batches consumed after ``steps`` optimizer steps (counting from the last restored point)."""
        G = self.global_micro_batches_per_step
        base = self._base_micro_batches if self._base_micro_batches is not None else self._base_steps * G
        return base + max(0, steps - self._base_steps) * G

    def state_dict(self) -> dict[str, Any]:
        """Resumable position: consumed optimizer steps plus the stream position in global micro-batches."""
        steps = self._current_steps()
        return {
            "consumed_steps": steps,
            "consumed_micro_batches": self._stream_position(steps),
            "global_micro_batches_per_step": self.global_micro_batches_per_step,
            "micro_batch_tokens": self.micro_batch_tokens,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position; the next ``train_dataloader()`` starts at ``consumed_steps``.

        The data-parallel layout may change (e.g. 4 ranks → 1 process): what must not change is the global batch,
        ``dp_size × grad_accum_steps`` micro-batches of ``micro_batch_tokens``, or the run would not continue the same
        loss curve. A change is an error (raised by ``train_dataloader``, once the dp size is known) naming the
        ``grad_accum_steps`` that keeps it; with ``allow_global_batch_change=True`` the stream resumes at the same
        micro-batch (``consumed_micro_batches``), so no data is repeated or skipped.
        """
        steps = int(state_dict["consumed_steps"])
        micro = state_dict.get("consumed_micro_batches")
        if state_dict.get("seed", self.seed) != self.seed:
            warnings.warn(
                f"resuming data with seed={self.seed}, but the checkpoint used seed={state_dict['seed']}: the order "
                f"differs from the interrupted run",
                stacklevel=2,
            )
        self._base_steps = steps
        self._base_micro_batches = int(micro) if micro is not None else None
        self.consumed_steps = steps
        self._resumed_batch = (state_dict.get("global_micro_batches_per_step"), state_dict.get("micro_batch_tokens"))

    def _check_global_batch(self) -> None:
        if self._resumed_batch is None or self.allow_global_batch_change:
            return
        saved_g, saved_tokens = self._resumed_batch
        G = self.global_micro_batches_per_step
        if saved_tokens is not None and saved_tokens != self.micro_batch_tokens:
            raise ConfigError(
                f"Resuming would change the global batch: the checkpoint used micro_batch_tokens={saved_tokens}, this "
                f"run {self.micro_batch_tokens}. Fix: set micro_batch_tokens={saved_tokens}, or "
                "allow_global_batch_change=true to continue with a different batch on purpose."
            )
        if saved_g is not None and saved_g != G:
            if saved_g % self.dp_size == 0:
                fix = f"set grad_accum_steps={saved_g // self.dp_size} (with {self.dp_size} data-parallel ranks)"
            else:
                fix = f"use a data-parallel size dividing {saved_g} and grad_accum_steps = {saved_g} / that size"
            raise ConfigError(
                f"Resuming would change the global batch: the checkpoint was written with {saved_g} micro-batches per "
                f"step (data-parallel size × grad_accum_steps), this run has {self.dp_size} × "
                f"{self.grad_accum_steps} = {G}. Fix: {fix}, or allow_global_batch_change=true to continue with a "
                "different batch on purpose."
            )
