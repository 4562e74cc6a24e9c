"""LoRA through PEFT on the training core (tiny Qwen3 with real weights, real text, CPU, gloo, fp32).

* dp=2, sp=2 and dp=2 × sp=2 with LoRA equal single-process LoRA (losses and grad norms, rtol 1e-4); only the
  adapters change, and the first step's model is exactly the base model (B starts at zero).
* The adapter export loads with ``peft.PeftModel.from_pretrained(base, folder)`` and gives the module's logits; the
  merged export loads with plain ``from_pretrained`` and gives them too.
* Bad options: a rank ≤ 0, target modules that match nothing, an unknown option — clear errors.
* The frozen base is stored in the compute dtype (bf16), the adapters in fp32, and only they reach the optimizer.
* Checkpoints hold the adapters and their optimizer state only, and resuming from one continues the loss curve.
* An existing PEFT adapter folder loads (``adapter: <folder>``) and gives the logits it was saved with; options that
  contradict it, or an adapter for another model, are clear errors.
"""

from __future__ import annotations

import json

import pytest
import torch
from dist_utils import run_distributed
from e2e_helpers import fit_tiny

LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}


def _runs(rank: int, world: int, assets: dict, layouts: list) -> dict:
    out = {}
    for name, sp in layouts:
        dp = world // sp
        _, module, losses, norms = fit_tiny(assets["qwen3"], assets["tokenizer"], assets["data"], devices=world, sp=sp,
                                            grad_accum=4 // dp, module_options={"lora": LORA})  # fmt: skip
        changed = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in module.model.named_parameters()
                          if p.requires_grad})  # fmt: skip
        out[name] = {"losses": losses, "grad_norms": norms, "trainable_kinds": changed}
    return out


@pytest.fixture(scope="module")
def single(tiny_assets) -> dict:
    return run_distributed(_runs, 1, tiny_assets, [("single", 1)], init_process_group=False, timeout=240)[0]["single"]


@pytest.mark.timeout(600)
def test_lora_under_dp2_sp2_and_dp2_times_sp2_equals_single_process(tiny_assets, single):
    results = run_distributed(_runs, 2, tiny_assets, [("dp2", 1), ("sp2", 2)], init_process_group=False, timeout=400)
    results += run_distributed(_runs, 4, tiny_assets, [("dp2_sp2", 2)], init_process_group=False, timeout=400)
    for rank_results in results:
        for label, got in rank_results.items():
            torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(single["losses"]), rtol=1e-4, atol=0,
                                       msg=label)  # fmt: skip
            torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(single["grad_norms"]), rtol=1e-4,
                                       atol=0, msg=label)  # fmt: skip
    assert single["losses"][-1] < single["losses"][0], single["losses"]


def _built(assets: dict, parallel=None, **options):
    from veomni_lightning.modules import CausalLMModule

    module = CausalLMModule(assets["qwen3"], **options)
    module.setup_model(None, parallel)
    return module


def _trained_b(module) -> None:
    """Move every B away from zero, as training would, so the adapter changes the model."""
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))


def test_only_adapters_train_and_training_starts_from_the_base_model(tiny_assets):
    from transformers import AutoModelForCausalLM

    module = _built(tiny_assets, lora=LORA)
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)  # all-linear leaves the output layer alone
    optimizer, _ = module.build_optimizer(10)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in module.model.parameters() if p.requires_grad
    }
    base = AutoModelForCausalLM.from_pretrained(tiny_assets["qwen3"], dtype=torch.float32).eval()
    ids = torch.randint(5, 200, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(module.model.hf_model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-6,
                                   atol=1e-6)  # fmt: skip


def test_adapter_and_merged_exports_give_the_module_logits(tiny_assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    module = _built(tiny_assets, lora=LORA)
    _trained_b(module)
    ids = torch.randint(5, 200, (1, 16))
    with torch.no_grad():
        want = module.model.hf_model(input_ids=ids).logits
    module.export_lora(str(tmp_path / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(tiny_assets["qwen3"], dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter does change the model
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()  # wraps base in place
    module.export_hf(str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "lora, expected",
    [
        ({"r": 0}, r"lora r must be a positive integer"),
        (
            {"r": 4, "target_modules": ["no_such_proj"]},
            r"lora target_modules .*no_such_proj.* not found in the base model",
        ),
        ({"r": 4, "rank": 8}, r"lora options \['rank'\] are unknown"),
    ],
)
def test_bad_lora_options_are_clear_errors(tiny_assets, lora, expected):
    from veomni_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match=expected):
        _built(tiny_assets, lora=lora)


@pytest.mark.timeout(300)
def test_cli_lora_option_trains_adapters_only(tmp_path):
    """``--model.init_args.lora '{...}'`` on the shipped tiny config: the run reports the adapters as the only
    trainable parameters and the loss falls."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cli = Path(sys.executable).parent / "veomni-lightning"
    args = [str(cli), "fit", "--config", "configs/text/tiny_qwen3_cpu.yaml", "--trainer.max_steps", "4",
            "--model.init_args.lora", "{r: 8, alpha: 16, target_modules: all-linear}",
            "--trainer.default_root_dir", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=280, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "(16.4k trainable)" in proc.stdout + proc.stderr
    with (tmp_path / "run" / "version_0" / "metrics.csv").open() as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 4 and losses[-1] < losses[0], losses


def test_frozen_base_is_stored_in_the_compute_dtype_and_adapters_in_fp32(tiny_assets):
    from veomni_lightning.parallel import ParallelConfig

    module = _built(tiny_assets, ParallelConfig(param_dtype="bf16"), lora=LORA)
    params = dict(module.model.named_parameters())
    assert {p.dtype for n, p in params.items() if p.requires_grad} == {torch.float32}
    assert {p.dtype for n, p in params.items() if not p.requires_grad} == {torch.bfloat16}
    hf = module.model.hf_model
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # the tied table stays one parameter
    optimizer, _ = module.build_optimizer(10)
    ids = torch.randint(5, 200, (1, 16))
    hf(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    states = [optimizer.state[p] for g in optimizer.param_groups for p in g["params"]]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in params.values() if p.requires_grad
    )


def _resume_worker(rank: int, world: int, assets: dict, ckpt_dir: str) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    common = dict(devices=world, grad_accum=2, steps=4, module_options={"lora": LORA})
    _, _, full, _ = fit_tiny(assets["qwen3"], assets["tokenizer"], assets["data"], save_every=2, ckpt_dir=ckpt_dir,
                             **common)  # fmt: skip
    ckpt = f"{ckpt_dir}/epoch=0-step=2.ckpt"
    saved = sorted(FileSystemReader(ckpt).read_metadata().state_dict_metadata)
    _, _, resumed, _ = fit_tiny(assets["qwen3"], assets["tokenizer"], assets["data"], ckpt_path=ckpt, **common)
    return {"full": full, "resumed": resumed, "saved": saved}


@pytest.mark.timeout(300)
def test_adapter_only_checkpoint_resumes_the_same_loss_curve(tiny_assets, tmp_path):
    results = run_distributed(_resume_worker, 2, tiny_assets, str(tmp_path / "ckpt"), init_process_group=False,
                              timeout=240)  # fmt: skip
    for r in results:
        assert len(r["full"]) == 4 and len(r["resumed"]) == 2
        torch.testing.assert_close(torch.tensor(r["resumed"]), torch.tensor(r["full"][2:]), rtol=1e-5, atol=0)
    weights = [k for k in results[0]["saved"] if k.startswith("state_dict.")]
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), weights[:5]
    assert any(k.startswith("optimizer_0.state.") and ".lora_" in k for k in results[0]["saved"])
    assert not any("embed_tokens" in k or "base_layer" in k for k in results[0]["saved"])


def test_existing_peft_adapter_loads_and_continues_training(tiny_assets, tmp_path):
    from veomni_lightning.errors import ConfigError

    trained = _built(tiny_assets, lora=LORA)
    _trained_b(trained)
    trained.export_lora(str(tmp_path / "adapter"))
    ids = torch.randint(5, 200, (1, 16))
    loaded = _built(tiny_assets, lora={"adapter": str(tmp_path / "adapter")})
    assert loaded.lora_configs[0].r == LORA["r"] and loaded.lora_configs[0].lora_alpha == LORA["alpha"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.hf_model(input_ids=ids).logits,
                                   trained.model.hf_model(input_ids=ids).logits, rtol=0, atol=0)  # fmt: skip
    assert all(p.requires_grad == (".lora_" in n) for n, p in loaded.model.named_parameters())
    with pytest.raises(ConfigError, match=r"lora r=8 contradicts the adapter"):
        _built(tiny_assets, lora={"adapter": str(tmp_path / "adapter"), "r": 8})
    with pytest.raises(ConfigError, match=r"is not a PEFT adapter folder"):
        _built(tiny_assets, lora={"adapter": str(tmp_path)})
    # A config that promises more adapters than its weights file holds (e.g. a file from another run).
    _built(tiny_assets, lora={**LORA, "target_modules": ["q_proj"]}).export_lora(str(tmp_path / "narrow"))
    config = json.loads((tmp_path / "narrow" / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj"]
    (tmp_path / "narrow" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"does not fit this model: 4 adapters missing from the file"):
        _built(tiny_assets, lora={"adapter": str(tmp_path / "narrow")})


MOE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                 tie_word_embeddings=True)  # fmt: skip


def _moe_lora(rank: int, world: int, assets: dict, ep: int) -> dict:
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(assets["tokenizer"]))
    options = {"pretrained": False, "config_overrides": {**MOE_SHAPE, "vocab_size": vocab}, "lora": LORA}
    _, module, losses, norms = fit_tiny("qwen3_moe", assets["tokenizer"], assets["data"], devices=world, ep_size=ep,
                                        grad_accum=4 // world, module_options=options)  # fmt: skip
    trainable = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in module.model.named_parameters()
                        if p.requires_grad})  # fmt: skip
    return {"losses": losses, "grad_norms": norms, "trainable": trainable}


@pytest.mark.timeout(300)
def test_moe_lora_adapts_attention_not_experts_and_ep2_equals_one_process(tiny_assets):
    """PEFT's all-linear would wrap the fused experts and the router (``target_parameters``); LoRA leaves them to
    the experts function and the balancing loss, and expert parallelism is unchanged: ep=2 equals one process."""
    single = run_distributed(_moe_lora, 1, tiny_assets, 1, init_process_group=False, timeout=240)[0]
    assert single["trainable"] == ["k_proj", "o_proj", "q_proj", "v_proj"], single["trainable"]
    for got in run_distributed(_moe_lora, 2, tiny_assets, 2, init_process_group=False, timeout=240):
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(single["losses"]), rtol=1e-4, atol=0)
        torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(single["grad_norms"]), rtol=1e-4,
                                   atol=0)  # fmt: skip
    assert single["losses"][-1] < single["losses"][0], single["losses"]


def _bf16_lora(rank: int, world: int, assets: dict) -> dict:
    _, module, losses, norms = fit_tiny(assets["qwen3"], assets["tokenizer"], assets["data"], devices=world,
                                        grad_accum=4 // world, param_dtype="bf16", module_options={"lora": LORA})  # fmt: skip
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731
    dtypes = {p.requires_grad: str(local(p).dtype) for p in module.model.parameters()}
    return {"losses": losses, "grad_norms": norms, "dtypes": dtypes}


@pytest.mark.timeout(300)
def test_bf16_frozen_base_shards_and_trains_under_dp2(tiny_assets):
    """FSDP2 units holding bf16 frozen weights beside fp32 adapters: dp=2 shards, gathers and reduces them, and
    follows the single-process bf16 curve (bf16 compute: a loose bar; the fp32 tests above are the exact proof)."""
    single = run_distributed(_bf16_lora, 1, tiny_assets, init_process_group=False, timeout=240)[0]
    for got in run_distributed(_bf16_lora, 2, tiny_assets, init_process_group=False, timeout=240) + [single]:
        assert got["dtypes"] == {True: "torch.float32", False: "torch.bfloat16"}, got["dtypes"]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(single["losses"]), rtol=2e-2, atol=0)
    assert single["losses"][-1] < single["losses"][0], single["losses"]
