"""The chunked fused cross-entropy against a float64 reference, and the packaging of the repo-root ``kernels`` folder.

``kernels/`` (repo root) is installed as ``veomni_lightning.kernels`` but, with the repo root on ``sys.path``, is also
importable as a top-level ``kernels`` package: the name of Hugging Face's kernels library, which transformers probes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from veomni_lightning.kernels.cross_entropy import linear_cross_entropy

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------------
# linear_cross_entropy
# ---------------------------------------------------------------------------------------------------------------------


def _reference(hidden, weight, labels, bias=None):
    """Float64 sum of token losses and its gradients w.r.t. hidden / weight / bias."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = bias.detach().double().requires_grad_(True) if bias is not None else None
    logits = h.reshape(-1, h.shape[-1]) @ w.T
    if b is not None:
        logits = logits + b
    loss = F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _ours(hidden, weight, labels, bias=None, **kwargs):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True) if bias is not None else None
    loss = linear_cross_entropy(h, w, labels, b, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _inputs(shape, hidden_size=16, vocab=37, dtype=torch.float32, ignore_frac=0.2, seed=0, with_bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=g).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(dtype)
    bias = (torch.randn(vocab, generator=g) * 0.1).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    return hidden, weight, labels, bias


def _assert_close(ours, ref, rtol, atol):
    loss, gh, gw, gb = ours
    rloss, rgh, rgw, rgb = ref
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), rloss, rtol=rtol, atol=atol)
    torch.testing.assert_close(gh.double(), rgh, rtol=rtol, atol=atol)
    torch.testing.assert_close(gw.double(), rgw, rtol=rtol, atol=atol)
    if rgb is not None:
        torch.testing.assert_close(gb.double(), rgb, rtol=rtol, atol=atol)


N_TOKENS = 50


@pytest.mark.parametrize("chunk_size", [1, 7, 16, N_TOKENS, 64, 4096], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_matches_float64_reference_fp32(chunk_size, with_bias):
    # chunk sizes: 1, non-dividing smaller (7, 16), equal, larger (64) and the default.
    hidden, weight, labels, bias = _inputs((N_TOKENS,), with_bias=with_bias)
    assert (labels == -100).any() and (labels != -100).any()
    ours = _ours(hidden, weight, labels, bias, chunk_size=chunk_size)
    _assert_close(ours, _reference(hidden, weight, labels, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [5, 24, 1000])
def test_3d_inputs(chunk_size):
    hidden, weight, labels, bias = _inputs((3, 8), with_bias=True)  # [B, S, H], 24 tokens
    loss, gh, gw, gb = _ours(hidden, weight, labels, bias, chunk_size=chunk_size)
    assert gh.shape == hidden.shape
    _assert_close((loss, gh, gw, gb), _reference(hidden, weight, labels, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [4, 4096])
def test_all_ignored_labels_give_zero_loss_and_zero_grads(chunk_size):
    hidden, weight, labels, bias = _inputs((2, 10), with_bias=True)
    labels.fill_(-100)
    loss, gh, gw, gb = _ours(hidden, weight, labels, bias, chunk_size=chunk_size)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    for g in (gh, gw, gb):
        assert g is not None and torch.count_nonzero(g) == 0


def test_custom_ignore_index():
    hidden, weight, labels, _ = _inputs((20,), ignore_frac=0.0)
    labels[::3] = 0  # treat token id 0 as ignored
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=6, ignore_index=0)
    keep = labels != 0
    ref = F.cross_entropy(hidden[keep].double() @ weight.double().T, labels[keep], reduction="sum")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_no_grad_and_frozen_weight():
    hidden, weight, labels, _ = _inputs((N_TOKENS,))
    ref = _reference(hidden, weight, labels)[0]
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=7)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    # Only hidden requires grad (frozen lm_head).
    h = hidden.clone().requires_grad_(True)
    linear_cross_entropy(h, weight, labels, chunk_size=7).backward()
    torch.testing.assert_close(h.grad.double(), _reference(hidden, weight, labels)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [7, 4096])
def test_bf16_inputs_within_tolerance(chunk_size):
    # bf16 has an 8-bit mantissa (~4e-3 relative): the logits are bf16 matmul outputs, the loss is summed in fp32.
    # Stated tolerance: loss within 1% relative, grads within 2e-2 absolute + 5% relative of the float64 reference
    # computed from the same (bf16-rounded) inputs.
    hidden, weight, labels, bias = _inputs((4, 16), hidden_size=32, vocab=64, dtype=torch.bfloat16, with_bias=True)
    loss, gh, gw, gb = _ours(hidden, weight, labels, bias, chunk_size=chunk_size)
    assert loss.dtype == torch.float32
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    rloss, rgh, rgw, rgb = _reference(hidden, weight, labels, bias)
    torch.testing.assert_close(loss.double(), rloss, rtol=1e-2, atol=1e-2)
    for g, r in ((gh, rgh), (gw, rgw), (gb, rgb)):
        torch.testing.assert_close(g.double(), r, rtol=5e-2, atol=2e-2)


def test_shape_mismatch_raises():
    hidden, weight, labels, _ = _inputs((2, 8))
    with pytest.raises(ValueError, match=r"labels shape \(2, 7\) does not match hidden states \(2, 8\)"):
        linear_cross_entropy(hidden, weight, labels[:, :7])
    with pytest.raises(ValueError, match="does not match"):
        linear_cross_entropy(hidden, weight, labels.reshape(-1))


def test_gradients_are_computed_in_forward_not_by_recomputing_the_logits():
    # The fused loss runs the output projection once per chunk in forward and never again in backward.
    hidden, weight, labels, _ = _inputs((N_TOKENS,))
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    calls = []
    original = F.linear
    try:
        F.linear = lambda *a, **k: calls.append(1) or original(*a, **k)
        loss = linear_cross_entropy(h, w, labels, chunk_size=16)
        forward_calls = len(calls)
        (loss * 0.5).backward()
    finally:
        F.linear = original
    assert forward_calls == 4 and len(calls) == 4
    ref = _reference(hidden, weight, labels)
    torch.testing.assert_close(h.grad.double(), ref[1] * 0.5, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), ref[2] * 0.5, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# the Triton row kernel, run on CPU by Triton's interpreter (a subprocess: TRITON_INTERPRET is read at import)
# ---------------------------------------------------------------------------------------------------------------------

_TRITON_ROWS = """
import json, torch
from veomni_lightning.kernels.cross_entropy import cross_entropy_rows_torch
from veomni_lightning.kernels.triton_cross_entropy import cross_entropy_rows_triton
out = {}
for dtype in (torch.float32, torch.bfloat16):
    for n_cols in (37, 1024, 2500):  # below, at and above one block (1024 in the interpreter)
        g = torch.Generator().manual_seed(n_cols)
        logits = (torch.randn(9, n_cols, generator=g) * 3).to(dtype)
        labels = torch.randint(0, n_cols, (9,), generator=g)
        labels[[2, 5]] = -100
        x = logits.double()
        lse = torch.logsumexp(x, -1)
        valid = labels != -100
        ref_loss = (lse - x.gather(1, labels.clamp_min(0)[:, None])[:, 0]) * valid
        ref_grad = torch.softmax(x, -1)
        ref_grad[torch.arange(9), labels.clamp_min(0)] -= 1
        ref_grad *= valid[:, None]
        key = f"{dtype}-{n_cols}"
        t = logits.clone(); loss_t = cross_entropy_rows_triton(t, labels, -100, True)
        c = logits.clone(); loss_c = cross_entropy_rows_torch(c, labels, -100, True)
        nograd = logits.clone(); loss_n = cross_entropy_rows_triton(nograd, labels, -100, False)
        out[key] = {
            "loss_err": ((loss_t.double() - ref_loss).norm() / ref_loss.norm()).item(),
            "grad_err": ((t.double() - ref_grad).norm() / ref_grad.norm()).item(),
            "torch_grad_err": ((c.double() - ref_grad).norm() / ref_grad.norm()).item(),
            "ignored_rows_zero": bool((t[~valid] == 0).all()),
            "nograd_untouched": bool(torch.equal(nograd, logits)),
            "nograd_loss_equal": bool(torch.equal(loss_n, loss_t)),
            "dtype_kept": str(t.dtype),
        }
print(json.dumps(out))
"""


def test_triton_row_kernel_matches_float64_in_the_interpreter(tmp_path):
    pytest.importorskip("triton", reason="the Triton interpreter test needs triton (pip install -e '.[dev]')")
    result = _run_python(_TRITON_ROWS, cwd=tmp_path, timeout=300, env={"TRITON_INTERPRET": "1"})
    assert len(result) == 6
    for key, r in result.items():
        tol = 1e-6 if "float32" in key else 1e-2  # bf16 stores the gradient rounded to 8 mantissa bits
        assert r["loss_err"] < 1e-6, (key, r)  # the loss is computed in fp32 from the (rounded) logits
        assert r["grad_err"] < tol and r["torch_grad_err"] < tol, (key, r)
        assert r["ignored_rows_zero"] and r["nograd_untouched"] and r["nograd_loss_equal"], (key, r)
        assert r["dtype_kept"] in key


# ---------------------------------------------------------------------------------------------------------------------
# packaging: the repo-root ``kernels`` folder and the setuptools package-dir mapping
# ---------------------------------------------------------------------------------------------------------------------


def _run_python(code: str, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter with ``cwd`` first on sys.path (``python -c`` puts '' there); it prints
    one JSON line last."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_repo_root_kernels_is_harmless_and_not_hf_kernels():
    result = _run_python(
        """
        import json, sys, importlib.util
        before = set(sys.modules)
        import kernels
        new = sorted(set(sys.modules) - before)
        spec = importlib.util.find_spec("kernels")
        from transformers.utils.import_utils import is_kernels_available
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
        import torch
        cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
        model = LlamaForCausalLM(cfg)
        out = model(torch.randint(0, 64, (1, 5)))
        print(json.dumps({
            "file": kernels.__file__,
            "new_modules": new,
            "has_version": hasattr(kernels, "__version__"),
            "spec_origin": spec.origin,
            "kernels_available": is_kernels_available(),
            "logits_shape": list(out.logits.shape),
        }))
        """,
        cwd=REPO,
    )
    assert Path(result["file"]).resolve() == (REPO / "kernels" / "__init__.py").resolve()
    assert result["new_modules"] == ["kernels"], f"importing kernels pulled in {result['new_modules']}"
    assert not any(m.startswith(("torch", "veomni_lightning", "transformers")) for m in result["new_modules"])
    assert not result["has_version"]
    assert result["kernels_available"] is False
    assert result["logits_shape"] == [1, 5, 64]


def test_installed_packages_import_from_outside_the_repo(tmp_path):
    result = _run_python(
        """
        import json, importlib.util
        import veomni_lightning.kernels, veomni_lightning.strategies
        from veomni_lightning.kernels.cross_entropy import linear_cross_entropy
        from veomni_lightning.strategies import VeOmniStrategy, VeOmniFabricStrategy
        from veomni_lightning.strategies.checkpoint_io import write_atomically
        print(json.dumps({
            "kernels_file": veomni_lightning.kernels.__file__,
            "strategies_file": veomni_lightning.strategies.__file__,
            "top_strategies": importlib.util.find_spec("strategies") is not None,
            "top_kernels": importlib.util.find_spec("kernels") is not None,
        }))
        """,
        cwd=tmp_path,
    )
    # The setuptools package-dir mapping points the installed names at the repo-root folders.
    assert Path(result["kernels_file"]).resolve().parent.name == "kernels"
    assert Path(result["strategies_file"]).resolve().parent.name == "strategies"
    assert not result["top_strategies"], "a top-level `strategies` module is importable outside the repo"
    assert not result["top_kernels"], "a top-level `kernels` module is importable outside the repo"


# ---------------------------------------------------------------------------------------------------------------------
# GPU: the compiled Triton kernel and the fused loss in bf16 at a real vocabulary size
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_row_kernel_on_cuda_matches_float64(dtype):
    from veomni_lightning.kernels.triton_cross_entropy import cross_entropy_rows_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(257, 151936, device="cuda", generator=g) * 4).to(dtype)
    labels = torch.randint(0, 151936, (257,), device="cuda", generator=g)
    labels[::7] = -100
    x = logits.double()
    lse = torch.logsumexp(x, -1)
    valid = labels != -100
    ref_loss = (lse - x.gather(1, labels.clamp_min(0)[:, None])[:, 0]) * valid
    ref_grad = torch.softmax(x, -1)
    ref_grad[torch.arange(257, device="cuda"), labels.clamp_min(0)] -= 1
    ref_grad *= valid[:, None]
    out = logits.clone()
    loss = cross_entropy_rows_triton(out, labels, -100, True)
    assert ((loss.double() - ref_loss).norm() / ref_loss.norm()).item() < 1e-6
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert ((out.double() - ref_grad).norm() / ref_grad.norm()).item() < tol
    assert (out[~valid] == 0).all()


@pytest.mark.gpu
def test_linear_cross_entropy_cuda_bf16_matches_float64():
    hidden, weight, labels, _ = _inputs((3000,), hidden_size=256, vocab=32000, dtype=torch.bfloat16)
    hidden, weight, labels = hidden.cuda(), weight.cuda(), labels.cuda()
    loss, gh, gw, _ = _ours(hidden, weight, labels, chunk_size=1024)
    rloss, rgh, rgw, _ = _reference(hidden, weight, labels)
    assert abs(loss.double() - rloss).item() / rloss.item() < 1e-3
    for g, r in ((gh, rgh), (gw, rgw)):
        assert ((g.double() - r).norm() / r.norm()).item() < 1e-2
