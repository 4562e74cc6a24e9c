"""Lightning callbacks shipped with veomni-lightning."""

from veomni_lightning.callbacks.hf_export import HFExport
from veomni_lightning.callbacks.progress import StepProgress

__all__ = ["HFExport", "StepProgress"]
