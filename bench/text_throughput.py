"""Text-path training throughput, side by side: plain HF (a), Lightning today (b) and veomni-lightning (c).

One run trains the same random-init model on the same packed token stream with each trainer in turn (one torchrun
process group per run, see ``text_workers.py``) and writes a JSON file plus a markdown table under ``bench/results``
naming the device, the library versions and the date. Per run: tokens/s per GPU (median step), MFU, peak memory
(``max_memory_allocated``, max over ranks) and the loss at each step.

MFU = (6·(P − E) + 12·L·H·D·S) · tokens/s/GPU / peak, P the parameters, E the input-embedding table (a lookup, no
FLOPs; E = 0 when it is tied to the lm_head, which stays in P), L layers, H query heads, D head dim, S the packed
sequence length, peak the GPU's dense bf16 rate (989 TFLOP/s for H100/H200): ``veomni_lightning.modules.metrics``.
``--rescore RESULT.json ...`` recomputes the MFU column of saved results by this rule and rewrites their markdown
tables (the JSON files stay as measured).

Examples::

    python bench/text_throughput.py --shape qwen3-1.7b --seq 8192                      # (a) (b) (c), 1 GPU
    python bench/text_throughput.py --shape qwen3-8b --seq 8192 --gpus 2 --ac --runs b c
    python bench/text_throughput.py --shape qwen3-8b --gpus 2 --runs c:sp=2 --seqs 4096 8192 65536 131072
    python bench/text_throughput.py --shape qwen3-1.7b --runs a c c:compile=0          # (c) with/without compile

A run is ``a``, ``b`` or ``c``, optionally with overrides ``:key=value`` (keys: ac, compile, reshard, ce_chunk, sp,
dtype, ac_frac, ac_policy (full / selective), ac_budget (the compiler's activation memory budget, 0-1), attn: an
attention registered by veomni-lightning, expandable: the allocator's expandable segments for
(a)/(b), which (c) turns on by itself). ``--data text`` packs a real text file through a tokenizer instead of the default synthetic stream (random
token ids, one document per sequence, so attention costs what the MFU formula counts).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Shapes of the Qwen3 family (random init; the vocab is Qwen3's). "tiny" is for CPU smoke tests.
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True),
    "tiny-moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                     num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, vocab_size=512, tie_word_embeddings=True, decoder_sparse_step=1),
    "tiny-text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=49152, tie_word_embeddings=True),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    # Qwen3-30B-A3B's layer (hidden 2048, 128 experts, top-8, expert intermediate 768) cut to 4 of its 48 layers so
    # that plain HF's fp32 weights and AdamW state fit one H100.
    "qwen3-30b-a3b-4l": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                             num_experts_per_tok=8, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4,
                             head_dim=128, vocab_size=151936, tie_word_embeddings=False, decoder_sparse_step=1),
}  # fmt: skip
#: The transformers model type of a shape (default: qwen3).
MODEL_TYPES = {"qwen3-30b-a3b-4l": "qwen3_moe", "tiny-moe": "qwen3_moe"}
RUN_NAMES = {"a": "plain HF", "b": "Lightning today", "c": "ours"}
OVERRIDE_KEYS = {
    "ac": bool,
    "compile": bool,
    "reshard": bool,
    "ce_chunk": int,
    "sp": int,
    "dtype": str,
    "expandable": bool,
    "ac_frac": float,
    "ac_policy": str,
    "ac_budget": float,
    "lora": int,
    "attn": str,
    "experts": str,
    "ep": int,
}


def parse_run(text: str, defaults: dict) -> dict:
    """``c:sp=2:compile=0`` -> the spec fields of one run."""
    mode, *pairs = text.split(":")
    if mode not in RUN_NAMES:
        raise SystemExit(f"unknown run {mode!r}: use a (plain HF), b (Lightning today) or c (ours)")
    spec = {**defaults, "mode": mode, "label": text}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in OVERRIDE_KEYS:
            raise SystemExit(f"unknown override {key!r} in {text!r}; known: {sorted(OVERRIDE_KEYS)}")
        kind = OVERRIDE_KEYS[key]
        spec[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    if mode != "c":
        if (
            spec["sp"] != 1
            or spec["ep"] != 1
            or any(
                k in pair
                for pair in pairs
                for k in ("compile", "reshard", "ce_chunk", "ac_frac", "ac_policy", "ac_budget", "attn")
            )
        ):
            raise SystemExit(f"{text!r}: sp, ep, compile, reshard, ce_chunk, ac_frac and attn are settings of (c)")
        spec.update(compile=False, ce_chunk=None)
    return spec


def build_stream(args: argparse.Namespace, seq: int, global_micro_batches: int, vocab: int) -> list[list[dict]]:
    """``args.steps`` global steps of ``global_micro_batches`` packed micro-batches of ``seq`` tokens."""
    if args.data == "text":
        from veomni_lightning.data import TextDataModule

        dm = TextDataModule(train_files=[args.text], tokenizer=args.tokenizer, micro_batch_tokens=seq,
                            grad_accum_steps=global_micro_batches, seed=args.seed)  # fmt: skip
        dm.setup("fit")
        stream = []
        for step in dm.train_dataloader():
            stream.append(step)
            if len(stream) == args.steps:
                return stream
        raise SystemExit(f"{args.text} holds fewer than {args.steps} steps of {global_micro_batches}×{seq} tokens")
    from veomni_lightning.data import build_micro_batch

    g = torch.Generator().manual_seed(args.seed)
    doc = min(args.doc_len or seq, seq)
    stream = []
    for _ in range(args.steps):
        step = []
        for _ in range(global_micro_batches):
            ids = torch.randint(0, vocab, (seq,), generator=g).tolist()
            docs = [(ids[i : i + doc], [True] * len(ids[i : i + doc])) for i in range(0, seq, doc)]
            step.append(build_micro_batch(docs, seq, pad_id=0))
        stream.append(step)
    return stream


def launch(spec: dict, gpus: int, workdir: Path, log) -> dict:
    spec_path = workdir / f"spec_{spec['index']}.json"
    spec["result"] = str(workdir / f"result_{spec['index']}.json")
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           str(HERE / "text_workers.py"), str(spec_path)]  # fmt: skip
    env = dict(os.environ)
    if spec["expandable"]:  # (c)'s strategy switches the allocator itself; this is for showing (a)/(b) with it
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    print(f"--- {spec['label']} seq={spec['seq']}: {' '.join(cmd)}", file=log, flush=True)
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=spec["timeout"])
    if Path(spec["result"]).exists():
        return json.loads(Path(spec["result"]).read_text())
    return {"status": "error", "error": f"worker exited with {proc.returncode} and no result (see the log)"}


def compute_mfu(config, n_params: int, embedding_params: int, seq: int, tokens_per_s_per_gpu: float, device: str,
                adapter_params: int | None = None):  # fmt: skip
    """MFU by ``veomni_lightning.modules.metrics.flops_per_token`` (``adapter_params``: the LoRA formula); None on a
    GPU without a known bf16 peak."""
    from veomni_lightning.modules.metrics import flops_per_token

    peak = 989e12 if any(n in device for n in ("H100", "H200", "H800")) else None
    fpt = flops_per_token(config, n_params, seq, embedding_params, adapter_params)
    return fpt * tokens_per_s_per_gpu / peak if peak else None


def summarize(spec: dict, raw: dict, config, gpus: int, warmup: int) -> dict:
    row = {"run": spec["label"], "trainer": RUN_NAMES[spec["mode"]], "seq": spec["seq"], "status": raw["status"],
           **{k: spec[k] for k in ("ac", "compile", "reshard", "sp", "dtype", "ce_chunk", "grad_accum")}}  # fmt: skip
    if raw["status"] != "ok":
        return {**row, "error": raw.get("error", "")}
    times = raw["step_times"][warmup:]
    if not times:
        raise SystemExit(f"--steps must exceed --warmup ({warmup}) to time anything")
    median = statistics.median(times)
    tokens_per_gpu_step = spec["seq"] * spec["grad_accum"] * (gpus // spec["sp"]) / gpus
    rate = tokens_per_gpu_step / median
    return {**row, "device": raw["device"], "n_params": raw["n_params"], "embedding_params": raw["embedding_params"],
            "step_median_s": median, "step_min_s": min(times), "step_max_s": max(times), "tokens_per_s_per_gpu": rate,
            "mfu": compute_mfu(config, raw["n_params"], raw["embedding_params"], spec["seq"], rate, raw["device"],
                               raw.get("adapter_params") if spec.get("lora") else None),
            "lora": spec.get("lora", 0), "adapter_params": raw.get("adapter_params"),
            "peak_mem_gib": raw["peak_mem_gib"],
            "peak_reserved_gib": raw["peak_reserved_gib"], "losses": raw["losses"]}  # fmt: skip


def markdown(meta: dict, rows: list[dict]) -> str:
    base = next((r for r in rows if r["run"].split(":")[0] == "a" and r["status"] == "ok"), None)  # the first (a)
    lines = [f"# {meta['title']}", "",
             f"{meta['date']} · {meta['device']} × {meta['gpus']} · torch {meta['torch']} · transformers "
             f"{meta['transformers']} · lightning {meta['lightning']} · triton {meta['triton']}", "",
             f"`{meta['command']}`", "",
             "| run | trainer | seq | AC | compile | sp | tokens/s/GPU | vs (a) | MFU | peak GiB | vs (a) | "
             f"loss @ step {meta['steps']} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['run']} | {r['trainer']} | {r['seq']} | {r['ac']} | {r['compile']} | {r['sp']} | "
                         f"**{r['status']}** | | | | | {r.get('error', '')[:80]} |")  # fmt: skip
            continue
        same_seq = base is not None and base["seq"] == r["seq"]
        speed = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.2f}×" if same_seq else ""
        mem = f"{r['peak_mem_gib'] / base['peak_mem_gib']:.2f}×" if same_seq and base["peak_mem_gib"] else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['run']} | {r['trainer']} | {r['seq']} | {r['ac']} | {r['compile']} | {r['sp']} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {speed} | {mfu} | {r['peak_mem_gib']:.1f} | {mem} | "
                     f"{r['losses'][-1]:.4f} |")  # fmt: skip
    lines += ["", "tokens/s/GPU: median step after the warm-up steps; peak: `torch.cuda.max_memory_allocated`, max "
              "over ranks; MFU = (6·(P − E) + 12·L·H·D·S) · tokens/s/GPU / peak, E the untied input-embedding table "
              "plus, for MoE, the expert weights a token does not use (1 − k/E of them; formula in "
              "`veomni_lightning/modules/metrics.py`)."]  # fmt: skip
    if any(r.get("lora") for r in rows):
        lines += ["", "LoRA rows (`lora=r`: rank r, alpha 2r, all linear layers; frozen base in bf16, adapters fp32): "
                  "MFU by the FLOPs done, 4·(P − A − E) + 6·A + 12·L·H·D·S per token, A the adapter parameters (a "
                  "frozen weight does its forward and input-gradient matmuls, no weight gradient)."]  # fmt: skip
    if meta.get("rescored"):
        lines += ["", f"MFU recomputed on {meta['rescored']} from the measured tokens/s in the JSON file by the rule "
                  "above (the JSON keeps the MFU of the rule at measurement time)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def shape_parameters(shape: str) -> tuple[int, int]:
    """``(P, E)`` of a shape in ``SHAPES``, counted on a meta-device model like the workers count theirs."""
    from transformers import AutoModelForCausalLM

    from veomni_lightning.models import config_from_model_type
    from veomni_lightning.models.adapters import find_experts
    from veomni_lightning.modules.metrics import (
        count_parameters,
        inactive_expert_parameters,
        input_embedding_parameters,
    )

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config_from_model_type(MODEL_TYPES.get(shape, "qwen3"), overrides=SHAPES[shape])
        )
    return count_parameters(model), input_embedding_parameters(model) + inactive_expert_parameters(find_experts(model))


def rescored(result_path: Path) -> dict:
    """A saved result (``{"meta", "rows"}``) with its MFU recomputed from the measured tokens/s by the current rule."""
    from veomni_lightning.models import config_from_model_type

    data = json.loads(Path(result_path).read_text())
    meta = data["meta"]
    config = config_from_model_type(MODEL_TYPES.get(meta["shape"], "qwen3"), overrides=SHAPES[meta["shape"]])
    n_params, embedding_params = shape_parameters(meta["shape"])
    for r in data["rows"]:
        if r["status"] != "ok":
            continue
        if r["n_params"] != n_params:
            raise SystemExit(f"{result_path}: run {r['run']} counted {r['n_params']} parameters, {meta['shape']} has "
                             f"{n_params}")  # fmt: skip
        r["embedding_params"] = embedding_params
        r["mfu"] = compute_mfu(config, n_params, embedding_params, r["seq"], r["tokens_per_s_per_gpu"], r["device"])
    return data


def rescore(result_path: Path) -> Path:
    """Recompute the MFU column of a saved result by the current rule and rewrite its markdown table beside it.

    The JSON file is left as measured (its ``mfu`` fields keep the rule of the day); the markdown says so.
    """
    data = rescored(result_path)
    meta, rows = data["meta"], data["rows"]
    out = Path(result_path).with_suffix(".md")
    out.write_text(markdown({**meta, "rescored": dt.date.today().isoformat()}, rows))
    return out


def versions() -> dict:
    import lightning
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "lightning": lightning.__version__,
            "triton": triton_version}  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    p.add_argument("--seq", type=int, default=8192, help="tokens per packed micro-batch (before SP slicing)")
    p.add_argument("--seqs", type=int, nargs="*", help="sweep several sequence lengths (overrides --seq)")
    p.add_argument("--runs", nargs="+", default=["a", "b", "c"])
    p.add_argument("--gpus", type=int, default=1, help="processes (GPUs) per run; (a) always uses one")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per dp rank per step")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing (compilation, allocator)")
    p.add_argument("--ac", action="store_true", help="activation checkpointing in every run")
    p.add_argument("--compile", type=int, default=1, help="(c): torch.compile per block (1/0)")
    p.add_argument("--ce-chunk", type=int, default=4096, help="(c): tokens per fused cross-entropy chunk")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="compute dtype (fp32: CPU checks)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="synthetic", choices=["synthetic", "text"])
    p.add_argument("--doc-len", type=int, default=0, help="synthetic: tokens per document (0: one per sequence)")
    p.add_argument("--text", help="--data text: a .txt/.jsonl/.parquet file")
    p.add_argument("--tokenizer", help="--data text: tokenizer folder")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and markdown results")
    p.add_argument("--name", help="file stem of the results (default: shape, seq and GPU count)")
    p.add_argument("--rescore", type=Path, nargs="+", metavar="RESULT.json",
                   help="measure nothing: recompute the MFU of saved results and rewrite their .md tables")  # fmt: skip
    args = p.parse_args(argv)
    if args.rescore:
        for result_path in args.rescore:
            print(rescore(result_path))
        return args.rescore[-1]

    from veomni_lightning.models import config_from_model_type

    config = config_from_model_type(MODEL_TYPES.get(args.shape, "qwen3"), overrides=SHAPES[args.shape])
    seqs = args.seqs or [args.seq]
    defaults = dict(model_type=MODEL_TYPES.get(args.shape, "qwen3"), overrides=SHAPES[args.shape], steps=args.steps, lr=args.lr, seed=args.seed,
                    ac=args.ac, compile=bool(args.compile), reshard=True, expandable=False, ac_frac=1.0, ac_policy="full", lora=0, attn="ulysses", ce_chunk=args.ce_chunk, sp=1, ep=1, experts="",
                    dtype=args.dtype, grad_accum=args.grad_accum, timeout=args.timeout)  # fmt: skip
    specs = [parse_run(r, defaults) for r in args.runs]
    name = args.name or f"text_{args.shape}_{'-'.join(map(str, seqs))}_{args.gpus}gpu"
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, open(args.out / f"{name}.log", "w") as log:
        workdir = Path(tmp)
        index = 0
        for seq in seqs:
            for spec in specs:
                gpus = 1 if spec["mode"] == "a" else args.gpus
                stream_path = workdir / f"stream_{seq}_{gpus // spec['sp']}.pt"
                if not stream_path.exists():
                    dp = gpus // spec["sp"]
                    torch.save(build_stream(args, seq, dp * args.grad_accum, config.vocab_size), stream_path)
                run = {**spec, "seq": seq, "stream": str(stream_path), "index": index}
                index += 1
                raw = launch(run, gpus, workdir, log)
                row = summarize(run, raw, config, gpus, args.warmup)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    device = next((r["device"] for r in rows if r.get("device")), "unknown")
    meta = {"title": f"Text throughput: {args.shape}, seq {', '.join(map(str, seqs))}, {args.gpus} GPU(s)",
            "date": dt.date.today().isoformat(), "device": device, "gpus": args.gpus, "steps": args.steps,
            "command": "python bench/text_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "shape": args.shape, "data": args.data, **versions()}  # fmt: skip
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(meta, rows)
    (args.out / f"{name}.md").write_text(table)
    print(table)
    return args.out / f"{name}.json"


if __name__ == "__main__":
    main()
