"""Time torch SDPA's backends on one attention shape (forward + backward), to see which one the default picks.

    python bench/sdpa_backends.py --tokens 32760 --heads 12 --head-dim 128            # Wan2.1-1.3B self-attention
    python bench/sdpa_backends.py --tokens 8192 --heads 32 --head-dim 128 --causal    # a Qwen3-8B row

Prints, per backend (default dispatch, cuDNN, FlashAttention-2, memory-efficient), the median milliseconds of
forward + backward and the TFLOP/s by ``4·S²·H·D`` (forward) ×3.5 (forward + backward, the FlashAttention
convention), halved for causal. CPU runs only the default, as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip


def time_backend(backend: SDPBackend | None, q, k, v, causal: bool, repeats: int) -> list[float]:
    """Milliseconds of forward + backward for each of ``repeats`` runs (after two warm-up runs)."""
    cuda = q.is_cuda
    times = []
    for i in range(repeats + 2):
        q.grad = k.grad = v.grad = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        if backend is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out.sum().backward()
        if cuda:
            end.record()
            torch.cuda.synchronize()
            if i >= 2:
                times.append(start.elapsed_time(end))
        elif i >= 2:
            times.append(0.0)
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shape = (1, args.heads, args.tokens, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    flops = 3.5 * 4 * args.tokens**2 * args.heads * args.head_dim / (2 if args.causal else 1)
    results = {}
    for name, backend in BACKENDS.items() if cuda else [("default", None)]:
        try:
            ms = statistics.median(time_backend(backend, q, k, v, args.causal, args.repeats))
        except RuntimeError as error:  # a backend that does not support the shape/dtype
            results[name] = {"error": str(error).splitlines()[0][:120]}
            continue
        results[name] = {"ms": ms, "tflops": flops / ms / 1e9 if ms else None}
    print(json.dumps({"shape": vars(args), "device": torch.cuda.get_device_name() if cuda else "cpu",
                      "torch": torch.__version__, "results": results}, indent=1))  # fmt: skip
    return results


if __name__ == "__main__":
    main()
