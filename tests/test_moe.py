"""Mixture-of-experts end to end: expert parallelism trains exactly like one process on the same global batch.

A tiny random-init Qwen3-MoE (4 experts, top-2, every layer sparse) and a tiny Mixtral are trained 3 steps with the
real Trainer, VeOmniStrategy, CausalLMModule and TextDataModule under ep=2 (dp=2), ep=4, ep=2 × sp=2 and ep=2 with
dp_replicate=2 (HSDP), activation checkpointing off and on. The global batch is 4 packed micro-batches everywhere.
Per-step losses and (pre-clip) grad norms equal the single-process EP=1 run within rtol 1e-4 (fp32). Random init is
layout-independent, so every run starts from the same weights.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed
from e2e_helpers import fit_tiny

GLOBAL_MICRO_BATCHES = 4
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}
# (name, world, ep, sp, dp_replicate)
LAYOUTS_2 = [("ep2", 2, 2, 1, 1)]
LAYOUTS_4 = [("ep4", 4, 4, 1, 1), ("ep2_sp2", 4, 2, 2, 1), ("ep2_hsdp2", 4, 2, 1, 2)]
# Runs with the balancing loss weighted in, all at dp=2: world -> [(name, ep, sp)].
AUX_COEF = 1.0  # large, so that 3 steps show its effect on training
AUX_LAYOUTS = {2: [("dp2_ep1", 1, 1), ("dp2_ep2", 2, 1)], 4: [("dp2_ep2_sp2", 2, 2)]}


def _module_options(family: str, vocab: int, aux: float | None = None) -> dict:
    overrides = {**SHAPE, **FAMILIES[family], "vocab_size": vocab, "tie_word_embeddings": True}
    return {"pretrained": False, "config_overrides": overrides, "router_aux_loss_coef": aux}


def _fit(
    assets: dict,
    family: str,
    world: int,
    ep: int = 1,
    sp: int = 1,
    dp_replicate: int = 1,
    ac: bool = False,
    export_to: str | None = None,
    aux: float | None = None,
    **resume: object,
):
    accum = GLOBAL_MICRO_BATCHES * sp // world  # dp = world / sp ranks share the global batch
    trainer, module, losses, norms = fit_tiny(
        family,
        assets["tokenizer"],
        assets["data"],
        devices=world,
        sp=sp,
        dp_replicate=dp_replicate,
        ep_size=ep,
        grad_accum=accum,
        activation_checkpointing=ac,
        module_options=_module_options(family, int(assets["vocab"]), aux),
        **resume,
    )
    if export_to is not None:
        module.export_hf(export_to)  # collective: every rank gathers its shards
    history = next(c.history for c in trainer.callbacks if hasattr(c, "history"))
    moe = {name: [step[name] for step in history] for name in history[0] if name.startswith(("train/aux", "moe/"))}
    return {"losses": losses, "grad_norms": norms, **moe}


def _reference(rank: int, world: int, assets: dict) -> dict:
    return {family: _fit(assets, family, 1) for family in FAMILIES}


def _layouts(rank: int, world: int, assets: dict, layouts: list) -> dict:
    results = {}
    for name, _, ep, sp, dp_replicate in layouts:
        for family in FAMILIES:
            for ac in (False, True):
                if (family != "qwen3_moe" or name != "ep2") and ac:
                    continue  # checkpointing is proven once; the layouts and the second family without it
                results[f"{name}/{family}/ac={ac}"] = _fit(assets, family, world, ep, sp, dp_replicate, ac)
    # The balancing loss in the objective: its global micro-batch is the same under every ep and sp at dp=2.
    for name, ep, sp in AUX_LAYOUTS[world]:
        results[f"aux/{name}"] = _fit(assets, "qwen3_moe", world, ep, sp, aux=AUX_COEF)
    return results


@pytest.fixture(scope="module")
def assets(tiny_assets) -> dict:
    from transformers import AutoTokenizer

    return {**tiny_assets, "vocab": len(AutoTokenizer.from_pretrained(tiny_assets["tokenizer"]))}


@pytest.fixture(scope="module")
def reference(assets) -> dict:
    return run_distributed(_reference, 1, assets, init_process_group=False)[0]


@pytest.fixture(scope="module")
def world2(assets) -> list:
    return run_distributed(_layouts, 2, assets, LAYOUTS_2, init_process_group=False, timeout=240)


@pytest.fixture(scope="module")
def world4(assets) -> list:
    return run_distributed(_layouts, 4, assets, LAYOUTS_4, init_process_group=False, timeout=400)


def _assert_equal(got: dict, ref: dict, label: str) -> None:
    assert len(got["losses"]) == len(ref["losses"]) == 3, label
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=0, msg=label)
    torch.testing.assert_close(
        torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=0, msg=label
    )


def test_single_process_moe_trains(reference):
    for family, run in reference.items():
        assert run["losses"][-1] < run["losses"][0], (family, run)


@pytest.mark.timeout(600)
def test_ep2_equals_single_process(world2, reference):
    for rank_results in world2:
        for label, got in rank_results.items():
            if not label.startswith("aux/"):
                _assert_equal(got, reference[label.split("/")[1]], label)
    assert {"ep2/qwen3_moe/ac=True", "ep2/mixtral/ac=False"} <= set(world2[0])


@pytest.mark.timeout(900)
def test_ep4_ep_times_sp_and_hsdp_equal_single_process(world4, reference):
    for rank_results in world4:
        for label, got in rank_results.items():
            if not label.startswith("aux/"):
                _assert_equal(got, reference[label.split("/")[1]], label)
    assert len(world4[0]) == 7


def _aux_runs(world_results: list) -> dict:
    runs = {label: got for label, got in world_results[0].items() if label.startswith("aux/")}
    for rank_results in world_results[1:]:  # logged values are global: the same on every rank
        for label, got in runs.items():
            assert rank_results[label] == got, label
    return runs


@pytest.mark.timeout(900)
def test_balancing_loss_and_expert_load_are_the_same_at_every_ep_and_sp(world2, world4, reference):
    runs = {**_aux_runs(world2), **_aux_runs(world4)}
    base = runs.pop("aux/dp2_ep1")
    assert len(base["train/aux"]) == 3 and all(v > 0 for v in base["train/aux"])
    for label, got in runs.items():
        _assert_equal(got, base, label)
        for name in ("train/aux", "moe/max_over_mean", "moe/layer_1/tokens_max", "moe/layer_0/tokens_min"):
            torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(base[name]), rtol=1e-4, atol=0)
    # Weighted in, the balancing loss changes training (the runs above are not the unweighted reference) ...
    assert abs(base["losses"][-1] - reference["qwen3_moe"]["losses"][-1]) > 1e-4
    # Load: 4 experts × top-2 over 2 layers; tokens per expert per step, max ÷ mean >= 1 (1 = balanced).
    assert all(v >= 1.0 for v in base["moe/max_over_mean"])
    assert base["moe/layer_0/tokens_min"][0] <= base["moe/layer_0/tokens_max"][0]


def _bad_layout(rank: int, world: int, assets: dict, family: str, ep: int) -> str:
    from veomni_lightning.errors import ConfigError

    try:
        if family == "qwen3":
            fit_tiny(assets["qwen3"], assets["tokenizer"], assets["data"], devices=world, grad_accum=1, ep_size=ep)
        else:
            options = _module_options(family, int(assets["vocab"]))
            options["config_overrides"]["num_experts"] = 3
            fit_tiny(
                family,
                assets["tokenizer"],
                assets["data"],
                devices=world,
                grad_accum=1,
                ep_size=ep,
                module_options=options,
            )
    except ConfigError as error:
        return str(error)
    return ""


@pytest.mark.parametrize(
    "family, expected",
    [
        ("qwen3", "ep_size=2, but the model has no mixture-of-experts layers"),
        ("qwen3_moe", "ep_size=2 does not divide the model's number of experts (3)"),
    ],
    ids=["dense_model", "experts_not_divisible"],
)
@pytest.mark.timeout(240)
def test_impossible_expert_layouts_are_refused(assets, family, expected):
    for message in run_distributed(_bad_layout, 2, assets, family, 2, init_process_group=False, timeout=180):
        assert expected in message, message


def _segment(rank: int, world: int, assets: dict, ep: int, stop: int, ckpt_dir: str, resume: str | None) -> dict:
    return _fit(assets, "qwen3_moe", world, ep, stop_after=stop, save_every=1, ckpt_dir=ckpt_dir, ckpt_path=resume)


@pytest.mark.timeout(600)
def test_resume_at_another_expert_layout_continues_the_loss_curve(reference, assets, tmp_path):
    # ep=2 on 2 ranks for step 1, one process for step 2, ep=4 on 4 ranks for step 3: the uninterrupted curve.
    ckpts, resume, losses, norms = tmp_path / "ckpt", None, [], []
    for step, (world, ep) in enumerate([(2, 2), (1, 1), (4, 4)], start=1):
        out = run_distributed(
            _segment, world, assets, ep, step, str(ckpts), resume, init_process_group=False, timeout=240
        )[0]
        losses, norms = losses + out["losses"], norms + out["grad_norms"]
        resume = str(ckpts / f"epoch=0-step={step}.ckpt")
    assert losses == pytest.approx(reference["qwen3_moe"]["losses"], rel=1e-4)
    assert norms == pytest.approx(reference["qwen3_moe"]["grad_norms"], rel=1e-4)


def _export(rank: int, world: int, assets: dict, ep: int, out: str) -> dict:
    return _fit(assets, "qwen3_moe", world, ep, export_to=out)


@pytest.mark.timeout(600)
def test_export_from_expert_parallel_training_loads_in_plain_transformers(assets, tmp_path):
    from transformers import AutoModelForCausalLM

    run_distributed(_export, 1, assets, 1, str(tmp_path / "single"), init_process_group=False, timeout=240)
    run_distributed(_export, 2, assets, 2, str(tmp_path / "ep2"), init_process_group=False, timeout=240)
    ids = torch.randint(0, int(assets["vocab"]), (1, 24), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name in ("single", "ep2"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32)
        assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 4
        with torch.no_grad():
            logits[name] = model(input_ids=ids).logits
    torch.testing.assert_close(logits["ep2"], logits["single"], rtol=1e-4, atol=1e-4)
