"""Issue-3 features on CPU: gradient clipping, partial checkpointing, compiled blocks, and the side-by-side harness.

The harness test is the CPU twin of the GPU numerics check: plain HF (a), Lightning's ModelParallelStrategy (b) and
ours (c) train the same random-init model on the same packed real text and must report the same losses (fp32).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed

from veomni_lightning.models import TransformersAdapter, build_model_on_meta, config_from_model_type, materialize_model
from veomni_lightning.models.causal_lm import CausalLMWithLoss
from veomni_lightning.parallel import ParallelConfig, clip_grad_norm, parallelize_model
from veomni_lightning.parallel.attention import packed_attention_kwargs

HF = TransformersAdapter()

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             vocab_size=300, tie_word_embeddings=True)  # fmt: skip


def _model(layers: int = 2, **fsdp) -> tuple[CausalLMWithLoss, torch.nn.Module]:
    hf = build_model_on_meta(config_from_model_type("qwen3", overrides={**SHAPE, "num_hidden_layers": layers}),
                             attn_implementation="ulysses", dtype=torch.float32)  # fmt: skip
    root = CausalLMWithLoss(hf, ce_chunk_size=32)
    parallelize_model(
        root, HF.blocks(hf), None, ParallelConfig(**fsdp), lambda blocks: HF.enable_checkpointing(hf, blocks)
    )
    materialize_model(hf, "cpu")
    HF.init_random_weights(hf, seed=0)
    return root, hf


def _loss_and_grad_norm(root: CausalLMWithLoss) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (1, 100), generator=g)
    pos = torch.cat([torch.arange(40), torch.arange(60)])[None]
    cu = torch.tensor([0, 40, 100], dtype=torch.int32)
    loss = root(ids.roll(-1, 1), pos, input_ids=ids, **packed_attention_kwargs(cu, 60, None))
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in root.parameters()]).item()
    root.zero_grad(set_to_none=True)
    return loss.item(), norm


# ------------------------------------------------------------------------------------------------- gradient clipping
def test_clip_grad_norm_clips_plain_tensors_and_returns_the_norm_before_clipping():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    norm = clip_grad_norm(params, 1.0)
    assert norm.item() == pytest.approx(5.0)
    assert torch.nn.utils.get_total_norm([p.grad for p in params]).item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(params[0].grad, torch.tensor([0.6, 0.0, 0.0]), rtol=1e-5, atol=0)
    # Below the threshold nothing changes; max_norm=None only measures.
    assert clip_grad_norm(params, 10.0).item() == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm(params, None).item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(params[0].grad, torch.tensor([0.6, 0.0, 0.0]), rtol=1e-5, atol=0)


def _clip_dtensor_worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(1.0, 9.0).reshape(4, 2)
    param = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 2), mesh, [Shard(0)]))
    param.grad = distribute_tensor(full.clone(), mesh, [Shard(0)])
    norm = clip_grad_norm([param], 2.0, mesh.get_group())
    assert isinstance(param.grad, DTensor)
    return {"norm": norm.item(), "clipped": param.grad.full_tensor().tolist(), "full": full.tolist()}


def test_clip_grad_norm_clips_sharded_dtensor_gradients():
    for result in run_distributed(_clip_dtensor_worker, 2):
        full = torch.tensor(result["full"])
        assert result["norm"] == pytest.approx(full.norm().item(), rel=1e-6)
        torch.testing.assert_close(torch.tensor(result["clipped"]), full * 2.0 / full.norm(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- checkpointing and compilation
def test_checkpoint_fraction_spreads_recomputed_blocks_and_keeps_numbers():
    eager = _loss_and_grad_norm(_model(layers=4)[0])
    root, hf = _model(layers=4, activation_checkpointing=True, checkpoint_fraction=0.5)
    assert [b.gradient_checkpointing for b in HF.blocks(hf)] == [False, True, False, True]
    got = _loss_and_grad_norm(root)
    assert got == pytest.approx(eager, rel=1e-5)
    with pytest.raises(ValueError, match="checkpoint_fraction must be in"):
        ParallelConfig(activation_checkpointing=True, checkpoint_fraction=0.0)


@pytest.mark.parametrize("ac", [False, True], ids=["no_ac", "ac"])
def test_compiled_blocks_equal_eager(ac):
    eager = _loss_and_grad_norm(_model()[0])
    root, hf = _model(compile_blocks=True, activation_checkpointing=ac)
    assert all(b._compiled_call_impl is not None for b in HF.blocks(hf))
    names = {n for n, _ in hf.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" in names  # compiling in place keeps checkpoint names
    for _ in range(2):  # second call: the cached graphs
        assert _loss_and_grad_norm(root) == pytest.approx(eager, rel=1e-4)


# ------------------------------------------------------------------------------------------------------ the harness
def test_harness_plain_hf_lightning_and_ours_train_identically_on_real_text(tiny_assets, tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "bench"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import text_throughput

    out = text_throughput.main([
        "--shape", "tiny-text", "--seq", "256", "--steps", "6", "--warmup", "1", "--dtype", "fp32", "--lr", "1e-3",
        "--data", "text", "--text", tiny_assets["data"], "--tokenizer", tiny_assets["tokenizer"],
        "--runs", "a", "b", "c:compile=0", "a:lora=4", "c:compile=0:lora=4", "--out", str(tmp_path / "results"),
        "--name", "cpu",
    ])  # fmt: skip
    result = json.loads(out.read_text())
    assert [r["status"] for r in result["rows"]] == ["ok"] * 5, result["rows"]
    losses = {r["run"]: r["losses"] for r in result["rows"]}
    assert len(losses["a"]) == 6 and losses["a"][-1] < losses["a"][0]
    for run in ("b", "c:compile=0"):
        torch.testing.assert_close(torch.tensor(losses[run]), torch.tensor(losses["a"]), rtol=1e-4, atol=0)
    # LoRA: plain PEFT + HF and ours train the same adapters (same init) identically, and only the adapters.
    torch.testing.assert_close(torch.tensor(losses["c:compile=0:lora=4"]), torch.tensor(losses["a:lora=4"]), rtol=1e-4,
                               atol=0)  # fmt: skip
    assert losses["a:lora=4"][0] == pytest.approx(losses["a"][0], rel=1e-5) and losses["a:lora=4"][-1] != losses["a"][-1]
    lora_rows = [r for r in result["rows"] if r["lora"]]
    assert all(0 < r["adapter_params"] < r["n_params"] / 10 for r in lora_rows), lora_rows
    table = (tmp_path / "results" / "cpu.md").read_text()
    assert "LoRA rows" in table and "| c:compile=0 | ours |" in table and "torch" in table and result["meta"]["device"] == "cpu"


@pytest.mark.timeout(300)
def test_dit_bench_plain_diffusers_and_ours_train_identically(tmp_path):
    """``bench/dit_throughput.py`` end to end on the tiny shape (CPU, fp32): (a) and (c) give the same losses."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "dit_throughput.py"
    proc = subprocess.run([sys.executable, str(script), "--shape", "wan-tiny", "--runs", "a", "c:compile=0",
                           "--steps", "3", "--warmup", "1", "--out", str(tmp_path), "--name", "smoke"],
                          capture_output=True, text=True, timeout=280)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    torch.testing.assert_close(torch.tensor(rows[1]["losses"]), torch.tensor(rows[0]["losses"]), rtol=1e-5, atol=0)


def test_sdpa_backend_bench_runs_on_cpu():
    """``bench/sdpa_backends.py`` smoke run: on CPU it times the default dispatch only (a forward and backward)."""
    sys.path.insert(0, str(REPO / "bench"))
    import sdpa_backends

    results = sdpa_backends.main(["--tokens", "16", "--heads", "2", "--head-dim", "8", "--repeats", "1", "--causal"])
    assert list(results) == ["default"] and "error" not in results["default"], results
