"""Shared runs of the multimodal equivalence tests: a fixed plan of packed micro-batches trained by a family module
under a given layout (Lightning Trainer, gloo, fp32), recording per-step losses and grad norms."""

from __future__ import annotations

import torch


def fit_plan(rank: int, world: int, steps: list, global_micro_batches: int, module_cls: str, model: str, sp: int,
             ac: bool = False, ep: int = 1) -> dict:  # fmt: skip
    """Train ``module_cls`` (a ``veomni_lightning.modules`` name) on ``steps``; dp rank r takes its share of each step."""
    import lightning.pytorch as pl
    from e2e_helpers import MetricsRecorder
    from torch.utils.data import DataLoader
    from toy_family import _Steps

    from veomni_lightning import modules
    from veomni_lightning.parallel import ParallelConfig
    from veomni_lightning.strategies import VeOmniStrategy

    class Plan(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            kwargs = self.trainer.strategy.distributed_sampler_kwargs or {}
            dp, r = kwargs.get("num_replicas", 1), kwargs.get("rank", 0)
            share = global_micro_batches // dp
            return DataLoader(_Steps([step[r * share : (r + 1) * share] for step in steps]), batch_size=None)

    recorder = MetricsRecorder()
    strategy = VeOmniStrategy(
        parallel=ParallelConfig(sp_size=sp, ep_size=ep, param_dtype="fp32", activation_checkpointing=ac)
    )
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=len(steps), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[recorder], log_every_n_steps=1, num_sanity_val_steps=0)  # fmt: skip
    module = getattr(modules, module_cls)(model, pretrained=False, learning_rate=1e-3, warmup_steps=1)
    trainer.fit(module, datamodule=Plan())
    return {"losses": recorder.losses, "grad_norms": recorder.grad_norms}


def assert_runs_equal(got: dict, ref: dict, steps: int, label: str) -> None:
    """Per-step losses and grad norms equal within rtol 1e-4 (fp32)."""
    assert len(got["losses"]) == len(ref["losses"]) == steps, label
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=0, msg=label)
    torch.testing.assert_close(
        torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=0, msg=label
    )
