"""Shared runs of the multimodal equivalence tests: a fixed plan of packed micro-batches trained by a family module
under a given layout (Lightning Trainer; gloo and fp32 by default, NCCL and bf16 on GPUs for
``bench/nccl_equivalence.py``), recording per-step losses and grad norms."""

from __future__ import annotations

import torch


def fit_plan(rank: int, world: int, steps: list, global_micro_batches: int, module_cls: str, model: str, sp: int,
             ac: bool = False, ep: int = 1, accelerator: str = "cpu", param_dtype: str = "fp32") -> dict:  # fmt: skip
    """Train ``module_cls`` (a ``veomni_lightning.modules`` name) on ``steps``; dp rank r takes its share of each step.

    ``accelerator="cuda"`` puts rank r on GPU r (Lightning then picks NCCL); ``param_dtype`` as in ``ParallelConfig``
    (``"bf16"``: bf16 compute, fp32 master weights and reduction).
    """
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

    if accelerator == "cuda":
        # Before the Trainer exists: NCCL and every allocation of this rank must land on its own GPU, not GPU 0.
        torch.cuda.set_device(rank)
    recorder = MetricsRecorder()
    strategy = VeOmniStrategy(
        parallel=ParallelConfig(sp_size=sp, ep_size=ep, param_dtype=param_dtype, activation_checkpointing=ac)
    )
    trainer = pl.Trainer(accelerator=accelerator, devices=world, strategy=strategy, max_steps=len(steps), logger=False,
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


def fit_from_cli(config: str, run_dir, *options: str) -> list[float]:
    """``veomni-lightning fit --config <config>`` for 3 steps over 2 processes with sp=2 (plus ``options``); returns
    the logged per-step losses (from ``<run_dir>/version_0/metrics.csv``)."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cli = Path(sys.executable).parent / "veomni-lightning"
    args = [str(cli), "fit", "--config", config, "--trainer.max_steps", "3", "--trainer.devices", "2",
            "--trainer.strategy.parallel.sp_size", "2", "--trainer.default_root_dir", str(run_dir), *options]  # fmt: skip
    proc = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=280, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    with (Path(run_dir) / "version_0" / "metrics.csv").open() as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def assert_split_equals_whole(results: list[dict]) -> None:
    """A module split over SP ranks equals the whole: each rank's ``split`` = ``(outputs, input grad, param grads)``
    against rank 0's ``reference``; outputs equal on every rank, gradients summed over the ranks equal."""
    ref_outputs, ref_input_grad, ref_grads = results[0]["reference"]
    as_list = lambda x: x if isinstance(x, list) else [x]  # noqa: E731
    for rank_result in results:
        outputs = as_list(rank_result["split"][0])
        assert len(outputs) == len(as_list(ref_outputs))
        for got, want in zip(outputs, as_list(ref_outputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(r["split"][1] for r in results), ref_input_grad, rtol=1e-4, atol=1e-6)
    assert ref_grads and set(ref_grads) == set(results[0]["split"][2])
    for name, want in ref_grads.items():
        torch.testing.assert_close(sum(r["split"][2][name] for r in results), want, rtol=1e-4, atol=1e-6, msg=name)
