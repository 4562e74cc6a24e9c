"""Lightning callbacks shipped with veomni-lightning."""

from veomni_lightning.callbacks.hf_export import HFExport

__all__ = ["HFExport"]
