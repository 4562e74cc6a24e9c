"""Ulysses attention: exact against per-segment causal attention, single- and multi-rank, and inside HF models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from e2e_helpers import TINY
from torch import nn

from veomni_lightning.parallel.attention import (
    ULYSSES_ATTENTION_NAMES,
    packed_attention_kwargs,
    register_attention_functions,
    ulysses_attention,
)

# --------------------------------------------------------------------------------------------- kernel-level checks

SEGMENTS = (5, 3, 6, 2)  # unequal lengths, total 16: divisible by sp = 2 and 4


def _reference(q, k, v, seg_lens, scaling, window=None):
    """Plain causal softmax attention run independently on each segment; q [B,Hq,S,D] -> [B,S,Hq,D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    outs, start = [], 0
    for n in seg_lens:
        sl = slice(start, start + n)
        scores = q[:, :, sl] @ k[:, :, sl].transpose(-1, -2) * scaling
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = (j <= i) & ((j > i - window) if window is not None else True)
        outs.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[:, :, sl])
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2)


def _case_tensors(hq: int, hkv: int, batch: int = 1, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = sum(SEGMENTS)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(batch, hq, s, d), mk(batch, hkv, s, d), mk(batch, hkv, s, d), mk(batch, s, hq, d)


# (Hq, Hkv, packed, sliding_window); batch 2 without packing: each row is one causal sequence.
# Hq not divisible by sp (9 at sp=2, 6 and 3 at sp=4) exercises head padding.
CASES = {
    2: [(4, 2, True, None), (4, 2, True, 3), (4, 4, False, None), (6, 3, True, None), (9, 3, True, None)],
    4: [(8, 2, True, None), (12, 3, True, None), (8, 8, True, 4), (6, 2, True, None), (3, 1, False, None)],
}


def _run_case(q, k, v, w, packed, window, group, rank, world):
    """Ulysses attention on this rank's sequence slice; returns the local output and grads of the local inputs."""
    s_local = q.shape[2] // world
    seq = slice(rank * s_local, (rank + 1) * s_local)
    ql, kl, vl = (t[:, :, seq].clone().requires_grad_() for t in (q, k, v))
    cu = torch.tensor([0, *torch.tensor(SEGMENTS).cumsum(0).tolist()], dtype=torch.int32) if packed else None
    kwargs = packed_attention_kwargs(cu, max(SEGMENTS), group)
    out, weights = ulysses_attention(
        nn.Module(), ql, kl, vl, None, kernel="sdpa", scaling=0.3, sliding_window=window, **kwargs
    )
    assert weights is None
    (out * w[:, seq]).sum().backward()
    return out.detach(), ql.grad, kl.grad, vl.grad


def _attention_worker(rank: int, world: int) -> list[tuple[torch.Tensor, ...]]:
    group = dist.group.WORLD
    results = []
    for hq, hkv, packed, window in CASES[world]:
        q, k, v, w = _case_tensors(hq, hkv, batch=1 if packed else 2)
        results.append(_run_case(q, k, v, w, packed, window, group, rank, world))
    return results


def _check_against_reference(world: int, results_per_rank: list) -> None:
    s_local = sum(SEGMENTS) // world
    for i, (hq, hkv, packed, window) in enumerate(CASES[world]):
        q, k, v, w = _case_tensors(hq, hkv, batch=1 if packed else 2)
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        seg = SEGMENTS if packed else (sum(SEGMENTS),)
        ref = _reference(q, k, v, seg, 0.3, window)
        (ref * w).sum().backward()
        for rank, res in enumerate(results_per_rank):
            out, gq, gk, gv = res[i]
            seq = slice(rank * s_local, (rank + 1) * s_local)
            msg = f"case {(hq, hkv, packed, window)}, rank {rank}"
            torch.testing.assert_close(out, ref[:, seq].detach(), msg=msg)
            torch.testing.assert_close(gq, q.grad[:, :, seq], msg=msg)
            torch.testing.assert_close(gk, k.grad[:, :, seq], msg=msg)
            torch.testing.assert_close(gv, v.grad[:, :, seq], msg=msg)


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_attention_matches_per_segment_reference(world: int) -> None:
    _check_against_reference(world, run_distributed(_attention_worker, world))


@pytest.mark.parametrize("case", CASES[2])
def test_single_rank_matches_reference(case) -> None:
    # sp = 1 (no group): the same code path minus the all-to-alls.
    hq, hkv, packed, window = case
    q, k, v, w = _case_tensors(hq, hkv, batch=1 if packed else 2)
    out, gq, gk, gv = _run_case(q, k, v, w, packed, window, None, 0, 1)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    ref = _reference(q, k, v, SEGMENTS if packed else (sum(SEGMENTS),), 0.3, window)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref.detach())
    for got, want in ((gq, q.grad), (gk, k.grad), (gv, v.grad)):
        torch.testing.assert_close(got, want)


def test_default_scaling_and_errors() -> None:
    q, k, v, _ = _case_tensors(4, 2)
    out, _ = ulysses_attention(nn.Module(), q, k, v, None)  # auto kernel on CPU -> SDPA, scale 1/sqrt(D)
    torch.testing.assert_close(out, _reference(q, k, v, (sum(SEGMENTS),), 1 / math.sqrt(q.shape[-1])))
    with pytest.raises(ValueError, match="does not take an attention_mask"):
        ulysses_attention(nn.Module(), q, k, v, torch.ones(1, 1, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch size 1"):
        qb = q.expand(2, -1, -1, -1)
        ulysses_attention(nn.Module(), qb, qb, qb, None, **packed_attention_kwargs(torch.tensor([0, 16]), 16, None))
    for kernel in ("flash", "varlen"):
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match=f"ulysses_{kernel}"):
                ulysses_attention(nn.Module(), q, k, v, None, kernel=kernel)


def test_registration_is_idempotent() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    before = {name: AttentionInterface._global_mapping[name] for name in ULYSSES_ATTENTION_NAMES}
    register_attention_functions()
    for name in ULYSSES_ATTENTION_NAMES:
        assert AttentionInterface._global_mapping[name] is before[name]
        assert ALL_MASK_ATTENTION_FUNCTIONS[name]() is None


def test_hf_builds_no_mask_and_skips_packing_detection(monkeypatch) -> None:
    # The packed-sequence detection in masking_utils ends in a host-device sync (`.all()`): it must not run, and
    # neither must any mask builder; attention must receive attention_mask=None.
    import transformers.masking_utils as mu
    from transformers import AttentionInterface

    calls = []
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda *a, **k: calls.append("packed"))
    monkeypatch.setitem(mu.ALL_MASK_ATTENTION_FUNCTIONS, "ulysses", lambda *a, **k: calls.append("mask"))
    real = AttentionInterface._global_mapping["ulysses"]

    def spy(module, q, k, v, mask, **kwargs):
        calls.append(mask)
        return real(module, q, k, v, mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "ulysses", spy)
    model = _tiny_model("qwen3", "ulysses")
    ids, pos, cu = _packed_inputs()
    model(ids, position_ids=pos, use_cache=False, **packed_attention_kwargs(cu, 5, None))
    assert calls == [None, None]  # one attention call per layer, each without a mask


# ---------------------------------------------------------------------------------------------- model-level checks

MODEL_SEGMENTS = (5, 3, 4, 4)


def _tiny_model(model_type: str, attn: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**TINY, "vocab_size": 128, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)


def _packed_inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (1, sum(MODEL_SEGMENTS)), generator=g)
    pos = torch.cat([torch.arange(n) for n in MODEL_SEGMENTS])[None]
    cu = torch.tensor([0, *torch.tensor(MODEL_SEGMENTS).cumsum(0).tolist()], dtype=torch.int32)
    return ids, pos, cu


def _eager_per_segment(model_type: str, state: dict, **overrides) -> torch.Tensor:
    """Reference logits: the eager model run on each segment on its own, with no packing at all."""
    ref = _tiny_model(model_type, "eager", **overrides)
    ref.load_state_dict(state)
    ids, _, _ = _packed_inputs()
    with torch.no_grad():
        return torch.cat([ref(chunk, use_cache=False).logits for chunk in ids.split(MODEL_SEGMENTS, dim=1)], dim=1)


def _model_worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    group = dist.group.WORLD
    out = {}
    for model_type in ("qwen3", "llama"):
        model = _tiny_model(model_type, "ulysses")
        if model_type == "llama":  # exercise the kwargs' path through non-reentrant activation checkpointing
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids, pos, cu = _packed_inputs()
        chunk = ids.shape[1] // world
        local = model(
            ids.narrow(1, rank * chunk, chunk),
            position_ids=pos.narrow(1, rank * chunk, chunk),
            use_cache=False,
            **packed_attention_kwargs(cu, max(MODEL_SEGMENTS), group),
        ).logits
        # Forward comparison on the gathered sequence (detached: the loss below uses only the local logits).
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.detach().contiguous(), group=group)
        logits = torch.cat(parts, dim=1)
        torch.testing.assert_close(logits, _eager_per_segment(model_type, model.state_dict()), atol=1e-5, rtol=1e-4)
        out[f"{model_type}_logits"] = logits
        # A loss over the local tokens; the per-rank parameter gradients must sum to the single-process ones.
        w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
        (local * w.narrow(1, rank * chunk, chunk)).sum().backward()
        out[f"{model_type}_grad"] = model.model.layers[0].self_attn.q_proj.weight.grad
    return out


def test_models_with_ulysses_sp2_match_eager_per_segment() -> None:
    results = run_distributed(_model_worker, 2)
    ids, pos, cu = _packed_inputs()
    for model_type in ("qwen3", "llama"):
        torch.testing.assert_close(results[0][f"{model_type}_logits"], results[1][f"{model_type}_logits"])
        # Single-process packed reference for the gradients (sp = 1).
        model = _tiny_model(model_type, "ulysses")
        logits = model(ids, position_ids=pos, use_cache=False, **packed_attention_kwargs(cu, None, None)).logits
        w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
        (logits * w).sum().backward()
        want = model.model.layers[0].self_attn.q_proj.weight.grad
        torch.testing.assert_close(results[0][f"{model_type}_grad"] + results[1][f"{model_type}_grad"], want)


@pytest.mark.parametrize(
    "model_type, overrides",
    [("qwen2", {}), ("mistral", {}), ("mistral", {"sliding_window": 3}), ("qwen3", {})],
)
def test_single_rank_packed_models_match_eager(model_type: str, overrides: dict) -> None:
    model = _tiny_model(model_type, "ulysses", **overrides)
    ids, pos, cu = _packed_inputs()
    with torch.no_grad():
        logits = model(ids, position_ids=pos, use_cache=False, **packed_attention_kwargs(cu, 5, None)).logits
    torch.testing.assert_close(logits, _eager_per_segment(model_type, model.state_dict(), **overrides))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["varlen", "flash", "auto"])
@pytest.mark.parametrize("window", [None, 129])
def test_cuda_kernels_match_fp32_sdpa(kernel: str, window: int | None) -> None:
    """bf16 varlen / flash kernels against the exact fp32 SDPA path (outputs and q/k/v grads), packed GQA."""
    from veomni_lightning.parallel.attention import _flash_varlen_func

    if kernel == "flash" and _flash_varlen_func() is None:
        pytest.skip("flash-attn not installed")
    segs = (300, 77, 1000, 671)
    cu = torch.tensor([0, *torch.tensor(segs).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1, 8, 2048, 64), (1, 2, 2048, 64), (1, 2, 2048, 64), (1, 2048, 8, 64)]  # q, k, v, output weights
    q, k, v, w = (torch.randn(*s, device="cuda", generator=g) for s in shapes)

    def run(name: str, dtype: torch.dtype) -> list[torch.Tensor]:
        t = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        kwargs = packed_attention_kwargs(cu, max(segs), None)
        out, _ = ulysses_attention(nn.Module(), *t, None, kernel=name, scaling=0.11, sliding_window=window, **kwargs)
        (out.float() * w).sum().backward()
        return [out.float()] + [x.grad.float() for x in t]

    for got, want in zip(run(kernel, torch.bfloat16), run("sdpa", torch.float32)):
        assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("cu_seqlens", [None, "one"], ids=["no_cu", "one_segment"])
def test_cuda_single_sequence_rows_take_sdpa_and_match_fp32(cu_seqlens) -> None:
    """Rows that are one causal sequence each go to SDPA (cuDNN on Hopper) in ``auto``; same numbers as fp32."""
    from veomni_lightning.parallel import attention

    s = 2048
    cu = torch.tensor([0, s], dtype=torch.int32, device="cuda") if cu_seqlens else None
    assert attention._select_kernel("auto", torch.empty(1, device="cuda", dtype=torch.bfloat16), True) is (
        attention._sdpa_kernel
    )
    g = torch.Generator(device="cuda").manual_seed(1)
    shapes = [(1, 8, s, 128), (1, 2, s, 128), (1, 2, s, 128), (1, s, 8, 128)]
    q, k, v, w = (torch.randn(*sh, device="cuda", generator=g) for sh in shapes)

    def run(name: str, dtype: torch.dtype) -> list[torch.Tensor]:
        t = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        kwargs = packed_attention_kwargs(cu, s, None)
        out, _ = ulysses_attention(nn.Module(), *t, None, kernel=name, scaling=0.09, **kwargs)
        (out.float() * w).sum().backward()
        return [out.float()] + [x.grad.float() for x in t]

    for got, want in zip(run("auto", torch.bfloat16), run("sdpa", torch.float32)):
        assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
