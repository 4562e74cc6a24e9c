"""Export the trained model as a Hugging Face folder when training ends."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

from veomni_lightning.errors import ConfigError

__all__ = ["HFExport"]


class HFExport(pl.Callback):
    """At the end of ``fit``, write a folder ``from_pretrained`` loads (``AutoModelForCausalLM`` for text models).

    Args:
        dirpath: where to write it; default ``<run folder>/hf``, the run folder being the logger's versioned
            ``log_dir`` (``trainer.log_dir``), so every run exports next to its own metrics and checkpoints.
        overwrite: replace an existing non-empty ``dirpath``. Without it, a run whose export folder already holds
            files is refused at setup, before training, so a finished run's export is never replaced by accident.

    The module must provide ``export_hf(out_dir, tokenizer=...)`` (every ``TrainingModule`` does). The datamodule's
    ``processor`` (multimodal) or ``tokenizer`` is saved beside the weights when it has one, so the folder is ready
    for generation.
    """

    def __init__(self, dirpath: str | None = None, *, overwrite: bool = False) -> None:
        self.dirpath = dirpath
        self.overwrite = overwrite
        self._resolved: Path | None = None

    def export_dir(self, trainer: pl.Trainer) -> Path:
        """The folder this run exports to (a collective the first time: ``trainer.log_dir`` broadcasts rank 0's)."""
        if self._resolved is None:
            base = self.dirpath if self.dirpath is not None else str(Path(trainer.log_dir or ".") / "hf")
            self._resolved = Path(base).expanduser()
        return self._resolved

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(pl_module, "export_hf"):
            raise ConfigError(
                f"HFExport needs the module to have export_hf(out_dir, tokenizer=...); {type(pl_module).__name__} "
                "has none. Fix: remove HFExport from the callbacks, or use a veomni_lightning module."
            )
        out = self.export_dir(trainer)
        # Rank 0 looks (the folder may be on its disk only); every rank raises the same error.
        occupied = trainer.is_global_zero and out.exists() and any(out.iterdir())
        if trainer.strategy.broadcast(occupied) and not self.overwrite:
            raise ConfigError(
                f"the export folder {out} already holds a previous export. Fix: a new --trainer.default_root_dir (or "
                "HFExport dirpath), or set HFExport's overwrite: true to replace it."
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = trainer.datamodule
        # A multimodal data module's processor (tokenizer + image/audio processors) is what a folder needs to be used.
        processor = getattr(data, "processor", None) or getattr(data, "tokenizer", None)
        out = self.export_dir(trainer)
        pl_module.export_hf(str(out), tokenizer=processor)
        if trainer.is_global_zero:
            print(f"Exported the trained model to {out}")
