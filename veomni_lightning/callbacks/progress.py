"""Training progress in optimizer steps, readable on a terminal and in a log file alike."""

from __future__ import annotations

import datetime
import sys
import time
from typing import IO, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar

__all__ = ["StepProgress", "format_progress_line"]

WIDTH = 80


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=max(0, round(seconds))))


def _count(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def format_progress_line(
    step: int, total: int | None, metrics: dict[str, Any], elapsed: float, eta: float | None
) -> str:
    """``step 12/1000  loss 2.3456  lr 5.00e-05  12.3k tok/s/dev  0:01:02 ETA 1:40:00`` (fits 80 columns)."""
    parts = [f"step {step}/{total}" if total else f"step {step}"]
    if "train/loss" in metrics:
        parts.append(f"loss {float(metrics['train/loss']):.4f}")
    if "train/lr" in metrics:
        parts.append(f"lr {float(metrics['train/lr']):.2e}")
    if "train/tokens_per_s_per_device" in metrics:
        parts.append(f"{_count(float(metrics['train/tokens_per_s_per_device']))} tok/s/dev")
    parts.append(_duration(elapsed) + (f" ETA {_duration(eta)}" if eta is not None else ""))
    return "  ".join(parts)[:WIDTH]


class StepProgress(ProgressBar):
    """Progress in optimizer steps: ``step 12/1000``, loss, lr, tokens/s per device, elapsed time and ETA.

    On a terminal one line is rewritten in place after every step. When the output is not a terminal (``nohup``,
    SLURM, CI) one plain line is printed per logging step (``trainer.log_every_n_steps``) and after the last step,
    so a log file shows the run's progress. Printed by global rank 0 only. ``plain`` forces either mode.
    """

    def __init__(self, *, plain: bool | None = None, stream: IO[str] | None = None) -> None:
        super().__init__()
        self._plain = plain
        self._stream = stream
        self._enabled = True
        self._start = 0.0
        self._first_step = 0
        self._dirty = False

    # ------------------------------------------------------------------ ProgressBar interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    # ------------------------------------------------------------------ output
    @property
    def stream(self) -> IO[str]:
        return self._stream or sys.stdout

    @property
    def plain(self) -> bool:
        if self._plain is not None:
            return self._plain
        return not (hasattr(self.stream, "isatty") and self.stream.isatty())

    def _write(self, line: str, *, final: bool) -> None:
        if self.plain:
            self.stream.write(line + "\n")
        else:
            self.stream.write("\r" + line.ljust(WIDTH) + ("\n" if final else ""))
            self._dirty = not final
        self.stream.flush()

    def _end_line(self) -> None:
        if self._dirty:
            self.stream.write("\n")
            self._dirty = False

    def _total(self, trainer: pl.Trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        total = trainer.estimated_stepping_batches
        return int(total) if total != float("inf") else None

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()
        self._first_step = trainer.global_step
        if self.is_enabled:
            params = sum(p.numel() for p in pl_module.parameters())
            trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            total = self._total(trainer)
            # The logger's folder, not trainer.log_dir: that one broadcasts, a collective rank 0 cannot run alone.
            log_dir = getattr(trainer.logger, "log_dir", None)
            where = f" → {log_dir}" if log_dir else ""
            self.stream.write(
                f"Training {type(pl_module).__name__}: {_count(params)} parameters ({_count(trainable)} trainable), "
                f"{trainer.world_size} process(es), {total or 'unbounded'} steps{where}\n"
            )
            self.stream.flush()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.is_enabled:
            return
        step, total = trainer.global_step, self._total(trainer)
        # TrainingModule logs at steps where (global_step before the step) % log_every_n_steps == 0.
        logged = (step - 1) % max(1, trainer.log_every_n_steps) == 0
        last = total is not None and step >= total
        if self.plain and not (logged or last):
            return
        elapsed = time.monotonic() - self._start
        done = step - self._first_step
        eta = (total - step) * elapsed / done if total and done > 0 else None
        self._write(format_progress_line(step, total, trainer.progress_bar_metrics, elapsed, eta), final=last)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.is_enabled or trainer.sanity_checking:
            return
        values = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if values:
            self._end_line()
            shown = "  ".join(f"{k} {float(v):.4f}" for k, v in sorted(values.items()))
            self._write(f"validation at step {trainer.global_step}: {shown}"[:WIDTH], final=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_enabled:
            self._end_line()
            steps = trainer.global_step - self._first_step
            self.stream.write(f"Done: {steps} steps in {_duration(time.monotonic() - self._start)}\n")
            self.stream.flush()
