"""Video DiT training throughput on one GPU: (a) a plain diffusers loop beside (c) ours, same weights and inputs.

- ``a`` plain diffusers: ``WanTransformer3DModel`` (the attention diffusers picks), fp32 weights under bf16
  autocast, diffusers' gradient checkpointing, fused AdamW, ``clip_grad_norm_``;
- ``c`` ours: ``DiTModule`` + ``VeOmniStrategy`` (bf16 compute, fp32 master weights and reduction), reading cached
  latents and text embeddings (``latents`` / ``text_embeds`` micro-batches, as the latent cache yields them).

Both use the same layout-independent random init (one seed), the same cached inputs (random latents of an 81-frame
480×832 clip: ``[16, 21, 60, 104]``, 32,760 tokens, and a 512-token text embedding), the same per-sample timesteps
and noise (Wan's flow-matching schedule) and one clip per step. Each run is its own process.

FLOPs per clip (training = 3 × forward): ``6·(P − P_kv)·S + 6·P_kv·L + 12·N·H·D·(S² + S·L)`` with S video tokens,
L text tokens, N blocks, H heads of D dims, P the transformer's parameters and P_kv its cross-attention key/value
projections (applied to the text); self-attention is bidirectional (no causal halving).

    python bench/dit_throughput.py --runs a c --steps 12
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

SHAPES = {
    "wan2.1-1.3b": dict(  # Wan2.1-T2V-1.3B's transformer
        config=dict(
            patch_size=(1, 2, 2),
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=30,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
        ),  # fmt: skip
        latents=(16, 21, 60, 104),
        text=(512, 4096),
    ),
    "wan-tiny": dict(  # a CPU smoke test of the harness
        config=dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            text_dim=32,
            freq_dim=32,
            ffn_dim=64,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        ),  # fmt: skip
        latents=(4, 3, 6, 10),
        text=(16, 32),
    ),
}
MAX_GRAD_NORM = 1.0


def build_stream(shape: dict, steps: int) -> list[list[dict]]:
    generator = torch.Generator().manual_seed(0)
    return [[{"latents": torch.randn(1, *shape["latents"], generator=generator),
              "text_embeds": torch.randn(1, *shape["text"], generator=generator), "sample_seed": i}]
            for i in range(steps)]  # fmt: skip


def run_plain(spec: dict, stream: list[list[dict]]) -> dict:
    from diffusers import WanTransformer3DModel
    from text_workers import StepClock, _finish

    from veomni_lightning.models import DiffusersAdapter, materialize_model
    from veomni_lightning.models.diffusion import DiTWithLoss, FlowMatching
    from veomni_lightning.models.loading import params_on_meta

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with params_on_meta():
        model = WanTransformer3DModel.from_config(spec["config"])
    materialize_model(model, device)
    DiffusersAdapter().init_random_weights(model, seed=0)
    model.enable_gradient_checkpointing()
    model.train()
    loss_of = DiTWithLoss(model, FlowMatching())  # the same schedule arithmetic; the model runs as diffusers runs it
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                  fused=device.type == "cuda")  # fmt: skip
    clock = StepClock(device)
    clock.mark()
    for step in stream:
        mb = step[0]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_of(mb["latents"].to(device), mb["text_embeds"].to(device), mb["sample_seed"], 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark(loss)
    return _finish(clock, device)


def run_ours(spec: dict, stream: list[list[dict]]) -> dict:
    from text_workers import _finish, _lightning_parts

    from veomni_lightning.modules import DiTModule
    from veomni_lightning.parallel import ParallelConfig
    from veomni_lightning.strategies import VeOmniStrategy

    options = spec.get("options", {})
    module = DiTModule(spec["model"], pretrained=False, learning_rate=spec["lr"], weight_decay=0.0, betas=(0.9, 0.95),
                       eps=1e-8, warmup_steps=0, min_lr_ratio=1.0, max_grad_norm=MAX_GRAD_NORM, init_seed=0)  # fmt: skip
    cuda = torch.cuda.is_available()
    parallel = ParallelConfig(param_dtype="bf16" if cuda else "fp32", reduce_dtype="fp32",
                              compile_blocks=options.get("compile", "1") == "1" and cuda,
                              activation_checkpointing=options.get("ac", "1") == "1",
                              reshard_after_forward=options.get("reshard", "1") == "1",
                              checkpoint_fraction=float(options.get("fraction", 1.0)),
                              activation_memory_budget=float(options["budget"]) if "budget" in options else None)  # fmt: skip
    data, timer, make_trainer = _lightning_parts({"grad_accum": 1}, stream, per_micro_batch=False)
    make_trainer(VeOmniStrategy(parallel=parallel), timer).fit(module, datamodule=data)
    return _finish(timer.clock, torch.device("cuda" if cuda else "cpu"))


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    stream = torch.load(spec["stream"], weights_only=True)
    try:
        result = {"status": "ok", **(run_plain if spec["mode"] == "a" else run_ours)(spec, stream)}
    except torch.OutOfMemoryError:
        result = {"status": "OOM"}
    Path(spec["result"]).write_text(json.dumps(result))


def clip_flops(shape: dict) -> float:
    """Training FLOPs of one clip by the formula in the module docstring."""
    from diffusers import WanTransformer3DModel

    from veomni_lightning.models.loading import params_on_meta

    with params_on_meta():
        model = WanTransformer3DModel.from_config(shape["config"])
    params = sum(p.numel() for p in model.parameters())
    kv = sum(p.numel() for b in model.blocks for m in (b.attn2.to_k, b.attn2.to_v) for p in m.parameters())
    c = shape["config"]
    _, frames, height, width = shape["latents"]
    p_t, p_h, p_w = c["patch_size"]
    tokens, text = frames // p_t * (height // p_h) * (width // p_w), shape["text"][0]
    attention = 12 * c["num_layers"] * c["num_attention_heads"] * c["attention_head_dim"] * (tokens**2 + tokens * text)
    return 6 * (params - kv) * tokens + 6 * kv * text + attention


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="wan2.1-1.3b", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", nargs="+", default=["a", "c"], help="a, c, c:ac=0, c:fraction=0.5, c:reshard=0, c:compile=0, c:ac=0:budget=0.5 (compiler memory budget)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="dit_throughput")
    p.add_argument("--worker")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    shape = SHAPES[args.shape]
    work = Path(tempfile.mkdtemp())
    folder = work / "wan"
    (folder / "transformer").mkdir(parents=True)
    config = {"_class_name": "WanTransformer3DModel", **shape["config"]}
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    torch.save(build_stream(shape, args.steps), work / "stream.pt")
    flops = clip_flops(shape)
    rows = []
    for i, run in enumerate(args.runs):
        mode, *pairs = run.split(":")
        spec = {"mode": mode, "model": str(folder), "config": shape["config"], "stream": str(work / "stream.pt"),
                "lr": args.lr, "options": dict(pair.split("=") for pair in pairs),
                "result": str(work / f"result_{i}.json")}  # fmt: skip
        (work / f"spec_{i}.json").write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, __file__, "--worker", str(work / f"spec_{i}.json")], capture_output=True,
                              text=True, timeout=900)  # fmt: skip
        print(proc.stdout[-2000:], proc.stderr[-4000:], flush=True)
        path = Path(spec["result"])
        result = json.loads(path.read_text()) if path.exists() else {"status": "error"}
        if result["status"] == "ok":
            median = statistics.median(result["step_times"][args.warmup :])
            result.update(median_s=median, clips_per_s=1 / median, mfu=flops / median / 989e12)
        rows.append({"run": run, **result})
    meta = {"date": dt.date.today().isoformat(), "command": "python " + " ".join(sys.argv), "shape": args.shape,
            "torch": torch.__version__, "flops_per_clip": flops,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    base = next((r for r in rows if r["run"].split(":")[0] == "a" and r["status"] == "ok"), None)
    lines = [f"# DiT throughput: {args.shape}, one clip per step, 1 GPU", "", f"{meta['date']} · {meta['device']} · "
             f"torch {meta['torch']} · {flops / 1e12:.1f} TFLOP per clip", "", f"`{meta['command']}`", "",
             "| run | clips/s | vs (a) | MFU | peak GiB | vs (a) | loss @ last step |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['run']} | **{r['status']}** | | | | | |")
            continue
        speed = f"{r['clips_per_s'] / base['clips_per_s']:.2f}×" if base else ""
        memory = f"{r['peak_mem_gib'] / base['peak_mem_gib']:.2f}×" if base and base["peak_mem_gib"] else ""
        lines.append(f"| {r['run']} | {r['clips_per_s']:.3f} | {speed} | {100 * r['mfu']:.1f}% | "
                     f"{r['peak_mem_gib']:.1f} | {memory} | {r['losses'][-1]:.4f} |")  # fmt: skip
    if base:
        for r in rows:
            if r is not base and r["status"] == "ok":
                rel = max(abs(x - y) / abs(y) for x, y in zip(r["losses"], base["losses"]))
                steps = len(r["losses"])
                lines += ["", f"{r['run']}: per-step losses within {rel:.1e} relative of (a) over {steps} steps."]
    text = "\n".join(lines) + "\n"
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
