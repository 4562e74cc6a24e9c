"""Lightning strategies (installed as ``veomni_lightning.strategies``).

Importing this package registers ``"veomni"`` in Lightning's StrategyRegistry, so ``Trainer(strategy="veomni")`` and
``--trainer.strategy veomni`` work.
"""

from lightning.pytorch.strategies import StrategyRegistry

from veomni_lightning.strategies.fabric import VeOmniFabricStrategy
from veomni_lightning.strategies.trainer import VeOmniStrategy

__all__ = ["VeOmniStrategy", "VeOmniFabricStrategy"]

if "veomni" not in StrategyRegistry:
    StrategyRegistry.register(
        "veomni", VeOmniStrategy, description="FSDP2 + Ulysses sequence parallelism (veomni-lightning)"
    )
