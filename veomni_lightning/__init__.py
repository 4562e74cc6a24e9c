"""veomni-lightning: Lightning training recipes for HF models with FSDP2 + Ulysses sequence parallelism.

Public entry points are imported lazily so ``import veomni_lightning`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["CausalLMModule", "TextDataModule", "VeOmniStrategy", "VeOmniFabricStrategy"]

_LAZY = {
    "CausalLMModule": "veomni_lightning.modules.causal_lm",
    "TextDataModule": "veomni_lightning.data",
    "VeOmniStrategy": "veomni_lightning.strategies",
    "VeOmniFabricStrategy": "veomni_lightning.strategies",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'veomni_lightning' has no attribute {name!r}")
