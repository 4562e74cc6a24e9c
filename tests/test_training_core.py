"""The training core with a second family: the toy image+text module trains under dp=2 and sp=2 exactly like one
process (fp32, rtol 1e-4) — two named losses, two backbones, a dummy encoder forward on the rank without images, an
encoder parameter group — and the core's own guards (schedule horizon, loss names)."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

GLOBAL_MICRO_BATCHES = 2
STEPS = 3


def _fit_toy(rank: int, world: int, sp: int) -> dict:
    import lightning.pytorch as pl
    from torch.distributed.fsdp import FSDPModule
    from toy_family import ToyDataModule, ToyImageTextModule

    from veomni_lightning.parallel import ParallelConfig
    from veomni_lightning.strategies import VeOmniStrategy

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            keys = ("train/loss", "train/lm", "train/feat", "train/grad_norm")
            self.rows.append({k: float(trainer.callback_metrics[k]) for k in keys})

    recorder = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=VeOmniStrategy(parallel=ParallelConfig(sp_size=sp, param_dtype="fp32")),
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        log_every_n_steps=1,
    )
    module = ToyImageTextModule(learning_rate=1e-2, warmup_steps=1, max_grad_norm=1.0)
    trainer.fit(module, datamodule=ToyDataModule(STEPS, GLOBAL_MICRO_BATCHES))
    dp = world // sp
    return {
        "rows": recorder.rows,
        "encoder_is_fsdp_unit": isinstance(module.model.encoder, FSDPModule),
        "lr_groups": [g["lr"] for g in module.optimizers().optimizer.param_groups],
        "has_images": trainer.strategy.parallel_mesh.dp_rank == 0 or dp == 1,
    }


@pytest.fixture(scope="module")
def single() -> dict:
    return run_distributed(_fit_toy, 1, 1, timeout=180, init_process_group=False)[0]


@pytest.mark.parametrize("world, sp", [(2, 1), (2, 2)], ids=["dp2", "sp2"])
def test_toy_family_parallel_equals_single_process(single, world, sp):
    # timeout: a rank that skipped the encoder's collectives would hang; the run must fail instead of stalling CI.
    results = run_distributed(_fit_toy, world, sp, timeout=180, init_process_group=False)
    assert len(single["rows"]) == STEPS and single["rows"][0]["train/feat"] > 0
    if sp == 1:
        assert [r["has_images"] for r in results] == [True, False]  # rank 1 runs the encoder on dummy input only
    for result in results:
        assert result["encoder_is_fsdp_unit"]
        assert len(result["rows"]) == STEPS
        for got, want in zip(result["rows"], single["rows"]):
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-4), (key, got, want)
    lrs = single["lr_groups"]
    assert lrs[1] == pytest.approx(0.5 * lrs[0])  # the encoder's own parameter group


def test_cosine_schedule_without_a_step_count_is_an_error():
    from toy_family import ToyImageTextModule

    module = ToyImageTextModule()
    module.setup_model(None, None)
    with pytest.raises(ValueError, match="max_steps"):
        module.build_optimizer(total_steps=0)
    constant = ToyImageTextModule(min_lr_ratio=1.0)
    constant.setup_model(None, None)
    constant.build_optimizer(total_steps=0)  # a constant rate after warm-up needs no horizon


def test_loss_names_are_checked():
    from toy_family import ToyImageTextModule, toy_micro_batch

    with pytest.raises(ValueError, match="loss_weights names"):
        ToyImageTextModule(loss_weights={"typo": 1.0})
    module = ToyImageTextModule(loss_weights={"feat": 2.0})
    assert module.loss_weights == {"lm": 1.0, "feat": 2.0}
    module.setup_model(None, None)
    module.loss_counts = lambda mb: {"lm": 1.0}  # a family forgetting one of its losses
    with pytest.raises(KeyError, match="feat"):
        module.global_loss_counts([toy_micro_batch(0)])


def test_single_process_random_init_is_seeded_per_backbone():
    from toy_family import ToyImageTextModule

    a, b = ToyImageTextModule(init_seed=3), ToyImageTextModule(init_seed=3)
    a.setup_model(None, None)
    b.setup_model(None, None)
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)


def _count_all_gathers(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from veomni_lightning.modules import CausalLMModule
    from veomni_lightning.parallel import ParallelConfig, ParallelDims

    mesh = ParallelDims(world_size=world).build_mesh("cpu")
    overrides = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8)  # fmt: skip
    module = CausalLMModule(model="qwen3", pretrained=False, config_overrides=overrides)
    module.setup_model(mesh, ParallelConfig(param_dtype="fp32", reshard_after_forward=True))
    from toy_family import toy_micro_batch

    batch = toy_micro_batch(1)  # no image: plain text ids < 128
    batch["input_ids"] = batch["input_ids"] % 64
    batch["labels"] = torch.where(batch["labels"] >= 0, batch["labels"] % 64, batch["labels"])
    calls = {"n": 0}
    original = dist.all_gather_single

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    dist.all_gather_single = counting
    try:
        module.loss_sums(batch)["loss"].backward()
    finally:
        dist.all_gather_single = original
    return calls


def test_root_is_not_regathered_in_backward():
    """With reshard_after_forward on, a step all-gathers the root once and each block twice, except the last block
    (kept for backward): 1 + 3 forward + 2 backward = 6 for 3 blocks. Resharding the root too would make it 7."""
    for result in run_distributed(_count_all_gathers, 2, timeout=120):
        assert result["n"] == 6
