"""The ``veomni-lightning`` command: LightningCLI with the library's strategies registered.

``veomni-lightning fit --config configs/text/smollm2_135m_sft_cpu.yaml`` trains; ``--print_config`` shows the
resolved configuration. Model and data are given by ``class_path`` in the yaml (any LightningModule /
LightningDataModule), so VLM, Omni and DiT recipes use the same entry point.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI

import veomni_lightning.strategies  # noqa: F401  (registers the "veomni" strategy)


def build_cli(args: list[str] | None = None) -> LightningCLI:
    """Parse ``args`` (default ``sys.argv``) and run the subcommand; returns the CLI (tests inspect it)."""
    return LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main() -> None:
    """Console-script entry point ``veomni-lightning``."""
    build_cli()


if __name__ == "__main__":
    main()
