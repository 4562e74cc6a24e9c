"""Export the trained model as a Hugging Face folder when training ends."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

__all__ = ["HFExport"]


class HFExport(pl.Callback):
    """At the end of ``fit``, write ``dirpath`` as a folder ``AutoModelForCausalLM.from_pretrained`` loads.

    The module must provide ``export_hf(out_dir, tokenizer=...)`` (``CausalLMModule`` does). The tokenizer is taken
    from the datamodule's ``tokenizer`` attribute when it has one, so the folder is ready for generation.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "export_hf"):
            raise TypeError(f"{type(pl_module).__name__} has no export_hf(out_dir, tokenizer=...) method.")
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        pl_module.export_hf(str(Path(self.dirpath).expanduser()), tokenizer=tokenizer)
        if trainer.is_global_zero:
            print(f"Exported the trained model to {self.dirpath}")
