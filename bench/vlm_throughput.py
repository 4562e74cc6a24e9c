"""Vision-language training throughput on one GPU: (a) plain HF beside (c) ours, same weights, same data, one run.

- ``a`` plain HF: ``AutoModelForImageTextToText`` (sdpa), the samples of each packed micro-batch unpacked into a
  padded batch (what a user writes without us: the model computes its own 3-D positions from ``attention_mask`` and
  ``mm_token_type_ids``), fp32 weights under bf16 autocast, fused AdamW;
- ``c`` ours: ``VLMModule`` + ``VeOmniStrategy`` (bf16 compute, fp32 master weights and reduction), packed.

Both use the shared random init (one seed) of a real model shape, real pictures through a real processor (Qwen2-VL
image processor, a BPE tokenizer trained on real text), the same step stream and the same AdamW settings, and clip
the gradient norm to 1.0. Each run is its own process (clean peak-memory numbers).

MFU counts the language model and the vision tower:
``flops = 6·(P_lm − E)·T + 12·L·H·D·Σ s_i² + 6·P_vision·N`` per step, with T tokens, N vision patches, s_i the
lengths of the packed samples (each attends within itself; the padding is left out; the vision tower's attention
FLOPs are left out too), E the input
embedding table.

    python bench/vlm_throughput.py --images gpu_assets/images --text gpu_assets/lee_x3.txt --runs a c --steps 20

Options of a run (``c:ac=1:vision_ac=0``): ``compile`` and ``ac`` (both runs); for (c) also ``policy`` (full |
selective), ``fraction`` (share of blocks that recompute), ``vision_ac`` / ``lm_ac`` (0: the vision tower's / the
language model's blocks do not recompute), ``vision_compile`` (0: the tower's blocks run eagerly), ``vision_fsdp``
(``tower``: one FSDP unit for the whole tower instead of one per block), ``reshard`` (0: keep gathered weights from
forward to backward) and ``gc`` (``freeze``: ``gc.freeze()`` after warm-up). ``--profile K`` runs K more steps of
each (c) run (``profile=N``: N for this one, ``trace=1``: keep its trace) under the torch profiler and writes the
breakdown of ``profile_vlm.py`` beside the results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

SHAPES = {  # Qwen3-VL-2B-Instruct's shape (text and vision towers)
    "qwen3-vl-2b": dict(
        family="qwen3_vl",
        text=dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            max_position_embeddings=32768,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        ),  # fmt: skip
        vision=dict(
            depth=24,
            hidden_size=1024,
            intermediate_size=4096,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[5, 11, 17],
        ),  # fmt: skip
    ),
    "qwen2.5-omni-3b": dict(  # the Qwen2.5-Omni-3B thinker's shape (text, vision and audio towers)
        family="qwen2_5_omni",
        text=dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        audio=dict(
            d_model=1280,
            encoder_layers=32,
            encoder_attention_heads=20,
            encoder_ffn_dim=5120,
            num_mel_bins=128,
            output_dim=2048,
            n_window=100,
        ),
    ),  # fmt: skip
    "qwen2.5-omni-tiny": dict(  # a CPU smoke test of the omni harness
        family="qwen2_5_omni",
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=4096,
        ),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
        audio=dict(
            d_model=32,
            encoder_layers=2,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            num_mel_bins=128,
            output_dim=64,
            n_window=100,
        ),
    ),  # fmt: skip
    "qwen3-vl-tiny": dict(  # a CPU smoke test of the harness (no meaningful numbers)
        family="qwen3_vl",
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=4096,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
        ),  # fmt: skip
        vision=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[0],
        ),  # fmt: skip
    ),
}


def build_assets(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """A model folder (real shape config + processor) and a rows file of pictures with questions and answers."""
    from transformers import AutoConfig, AutoProcessor
    from vlm_assets import save_processor

    shape = SHAPES[args.shape]
    if "audio" in shape:
        return build_omni_assets(args, work, shape)
    folder = save_processor(work / "model", shape["family"], Path(args.text))
    processor = AutoProcessor.from_pretrained(folder)
    unit = 32  # patch 16 × merge 2
    processor.image_processor.max_pixels = args.image_tokens * unit * unit
    processor.image_processor.min_pixels = 64 * unit * unit
    processor.save_pretrained(folder)
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in [("image_token_id", "<|image_pad|>"),
           ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
           ("vision_end_token_id", "<|vision_end|>")]}  # fmt: skip
    config = AutoConfig.for_model(shape["family"], text_config=shape["text"], vision_config=shape["vision"],
                                  tie_word_embeddings=True, **ids)  # fmt: skip
    config.save_pretrained(folder)
    images = sorted(str(p.resolve()) for p in Path(args.images).iterdir())
    sentences = [s.strip() for s in Path(args.text).read_text(errors="ignore").split(".") if 40 < len(s.strip()) < 300]
    rng = random.Random(0)
    rows = []
    for i in range(args.rows):
        pictures = rng.sample(images, rng.choice([1, 2]))
        content = [{"type": "image", "image": p} for p in pictures]
        content.append({"type": "text", "text": sentences[i % len(sentences)] + "?"})
        answer = " ".join(sentences[(i + j) % len(sentences)] + "." for j in range(1, 4))
        rows.append({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]})
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, data


def build_omni_assets(args: argparse.Namespace, work: Path, shape: dict) -> tuple[Path, Path]:
    """An omni thinker folder (real shape, real processor with 128 mel bins) and rows of a real speech excerpt
    (2-10 s) with one picture or none, a question and an answer."""
    from transformers import AutoProcessor
    from vlm_assets import save_tiny_omni_folder, write_speech_clip

    overrides = {"text_config": shape["text"], "vision_config": shape["vision"], "audio_config": shape["audio"]}
    folder = save_tiny_omni_folder(work / "model", Path(args.text), shape["family"],
                                   mel_bins=shape["audio"]["num_mel_bins"], config_overrides=overrides)  # fmt: skip
    processor = AutoProcessor.from_pretrained(folder)
    unit = 28  # patch 14 × merge 2
    processor.image_processor.max_pixels = args.image_tokens * unit * unit
    processor.image_processor.min_pixels = 64 * unit * unit
    processor.save_pretrained(folder)
    images = sorted(str(p.resolve()) for p in Path(args.images).iterdir())
    sentences = [s.strip() for s in Path(args.text).read_text(errors="ignore").split(".") if 40 < len(s.strip()) < 300]
    rng = random.Random(0)
    clips = []
    for i in range(16):  # excerpts of the recording: different lengths and starts
        seconds = rng.uniform(2.0, 10.0)
        clips.append(str(write_speech_clip(work / f"speech_{i}.wav", rng.uniform(0.0, 10.8 - seconds), seconds,
                                           Path(args.speech))))  # fmt: skip
    rows = []
    for i in range(args.rows):
        content = [{"type": "audio", "audio": rng.choice(clips)}]
        if rng.random() < 0.5:
            content.append({"type": "image", "image": rng.choice(images)})
        content.append({"type": "text", "text": sentences[i % len(sentences)] + "?"})
        answer = " ".join(sentences[(i + j) % len(sentences)] + "." for j in range(1, 4))
        rows.append({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]})
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, data


def build_stream(folder: Path, data: Path, args: argparse.Namespace) -> list[list[dict]]:
    from veomni_lightning.data import VLMDataModule

    dm = VLMDataModule(train_files=str(data), processor=str(folder), micro_batch_tokens=args.seq,
                       grad_accum_steps=1, seed=0, shuffle=False)  # fmt: skip
    dm.setup("fit")
    stream = []
    for step in dm.train_dataloader():
        stream.append(step)
        if len(stream) == args.steps:
            return stream
    raise SystemExit(f"{args.rows} rows hold fewer than {args.steps} micro-batches of {args.seq} tokens")


# ------------------------------------------------------------------------------------------------------ workers
def _padded(mb: dict, config) -> dict:
    """A packed micro-batch as a plain padded batch of its samples (what HF users feed)."""
    cu = mb["cu_seqlens"].tolist()
    ends = [e for e in cu[1:] if e <= mb["num_tokens"]]
    segments = list(zip(cu[: len(ends)], ends))
    longest = max(b - a for a, b in segments)
    n = len(segments)
    ids = torch.full((n, longest), 0, dtype=torch.long)
    labels = torch.full((n, longest), -100, dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.long)
    for i, (a, b) in enumerate(segments):
        ids[i, : b - a], labels[i, : b - a], mask[i, : b - a] = mb["input_ids"][0, a:b], mb["labels"][0, a:b], 1
    types = (ids == config.image_token_id).long() + 2 * (ids == config.video_token_id).long()
    batch = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, shift_labels=labels, labels=labels)
    if "pixel_values" in mb:
        batch.update(pixel_values=mb["pixel_values"], image_grid_thw=mb["image_grid_thw"])
    if "input_features" in mb:  # audio: one padded row of mel frames per recording, with its mask
        lengths = mb["audio_lengths"]
        features = torch.zeros(len(lengths), mb["input_features"].shape[-1], max(lengths))
        frames = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        for i, part in enumerate(mb["input_features"].split(lengths)):
            features[i, :, : len(part)], frames[i, : len(part)] = part.T, 1
        batch.update(input_features=features, feature_attention_mask=frames)
        del batch["mm_token_type_ids"]  # the omni thinker finds its placeholders from the ids
    return batch


def run_plain_hf(spec: dict, stream: list[list[dict]]) -> dict:
    from text_workers import MAX_GRAD_NORM, StepClock, _finish
    from transformers import AutoConfig, AutoModelForImageTextToText

    from veomni_lightning.models import TransformersAdapter, build_model_on_meta, materialize_model

    device = torch.device("cuda")
    config = AutoConfig.from_pretrained(spec["model"])
    model = build_model_on_meta(config, attn_implementation="sdpa", dtype=torch.float32,
                                auto_class=AutoModelForImageTextToText)  # fmt: skip
    materialize_model(model, device)
    TransformersAdapter().init_random_weights(model, seed=0)
    if spec["ac"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                  fused=True)  # fmt: skip
    clock = StepClock(device)
    clock.mark()
    for step in stream:
        num_items = sum(mb["num_loss_tokens"] for mb in step)
        total = torch.zeros((), device=device)
        for mb in step:
            batch = {k: v.to(device) for k, v in _padded(mb, config).items()}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch, num_items_in_batch=num_items, use_cache=False).loss
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark(total)
    return _finish(clock, device)


def run_ours(spec: dict, stream: list[list[dict]]) -> dict:
    import lightning.pytorch as pl
    from text_workers import MAX_GRAD_NORM, _finish, _lightning_parts

    from veomni_lightning import modules
    from veomni_lightning.parallel import ParallelConfig
    from veomni_lightning.strategies import VeOmniStrategy

    options = spec.get("options", {})
    base = modules.OmniModule if spec.get("omni") else modules.VLMModule

    class Module(base):
        """``VLMModule`` with the run's experimental per-tower options applied around the model's set-up."""

        def setup_model(self, mesh, config) -> None:
            with _tower_fsdp_unit(options.get("vision_fsdp") == "tower"):
                super().setup_model(mesh, config)
            hf_model = self.model.hf_model
            vision = list(self.adapter.vision_tower(hf_model).blocks)
            language = list(self.adapter.language_model(hf_model).layers)
            for flag, blocks in (("vision_ac", vision), ("lm_ac", language)):
                if options.get(flag) == "0":
                    for block in blocks:
                        block.gradient_checkpointing = False
            if options.get("vision_compile") == "0":
                for block in vision:
                    block._compiled_call_impl = None

    class FreezeGarbage(pl.Callback):
        """``gc=freeze``: after the warm-up steps, move every live object out of the collector's generations."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 2:
                gc.collect()
                gc.freeze()

    module = Module(spec["model"], pretrained=False, learning_rate=spec["lr"], weight_decay=0.0, betas=(0.9, 0.95),
                    eps=1e-8, warmup_steps=0, min_lr_ratio=1.0, max_grad_norm=MAX_GRAD_NORM, init_seed=0)  # fmt: skip
    parallel = ParallelConfig(param_dtype="bf16", reduce_dtype="fp32", compile_blocks=spec["compile"],
                              activation_checkpointing=spec["ac"], checkpoint_policy=options.get("policy", "full"),
                              checkpoint_fraction=float(options.get("fraction", 1.0)),
                              reshard_after_forward=options.get("reshard", "1") == "1")  # fmt: skip
    data, timer, make_trainer = _lightning_parts({"grad_accum": 1}, stream, per_micro_batch=False)
    trainer = make_trainer(VeOmniStrategy(parallel=parallel), timer)
    if options.get("gc") == "freeze":
        trainer.callbacks.append(FreezeGarbage())
    if spec.get("profile"):
        from profile_vlm import StepProfiler

        keep = spec["keep_trace"] or options.get("trace") == "1"
        profiler = StepProfiler(spec["steps"], spec["profile"], Path(spec["out"]), spec["stem"], keep)
        trainer.callbacks.append(profiler.callback())
    trainer.fit(module, datamodule=data)
    from torch._dynamo.utils import counters
    from torch.distributed.fsdp import FSDPModule

    dynamo = {kind: {k[:200]: v for k, v in counters[kind].items()} for kind in ("stats", "graph_break")}
    units = len({id(m._get_fsdp_state()) for m in module.model.modules() if isinstance(m, FSDPModule)})
    return {**_finish(timer.clock, torch.device("cuda" if torch.cuda.is_available() else "cpu")), "dynamo": dynamo,
            "fsdp_units": units}  # fmt: skip


class _tower_fsdp_unit:
    """While active, ``parallelize_model`` shards the vision tower (its blocks, patch embedding and mergers) as one
    FSDP unit instead of one unit per block: an experiment on FSDP2's per-unit host cost."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.fsdp = importlib.import_module("veomni_lightning.parallel.fsdp")
        self.original = self.fsdp.apply_fsdp

    def __enter__(self) -> None:
        if not self.active:
            return
        from torch.distributed.fsdp import fully_shard

        original = self.original

        def apply_fsdp(blocks, root, mesh, config, *args, **kwargs):
            tower = root.adapter.vision_tower(root.hf_model)
            ids = {id(b) for b in tower.blocks}
            fully_shard(tower, mesh=mesh, mp_policy=config.mixed_precision(),
                        reshard_after_forward=config.reshard_after_forward)  # fmt: skip
            return original([b for b in blocks if id(b) not in ids], root, mesh, config, *args, **kwargs)

        self.fsdp.apply_fsdp = apply_fsdp

    def __exit__(self, *exc) -> None:
        self.fsdp.apply_fsdp = self.original


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    stream = torch.load(spec["stream"], weights_only=True)
    try:
        result = {"status": "ok", **(run_plain_hf if spec["mode"] == "a" else run_ours)(spec, stream)}
    except torch.OutOfMemoryError:
        result = {"status": "OOM"}
    Path(spec["result"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------------ parent
def model_flops(folder: Path, stream: list[list[dict]]) -> list[float]:
    """Training FLOPs of each step by the formula in the module docstring."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from veomni_lightning.modules.metrics import attention_length, count_parameters
    from veomni_lightning.parallel.audio import frames_after_front_end

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    from veomni_lightning.models.vision_language import VisionLanguageAdapter

    adapter = VisionLanguageAdapter()
    vision = count_parameters(adapter.vision_tower(model))
    audio_tower = adapter.audio_tower(model)
    audio = 0 if audio_tower is None else count_parameters(audio_tower)
    embed = model.get_input_embeddings().weight.numel()
    lm = count_parameters(model) - vision - audio - (0 if config.tie_word_embeddings else embed)
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    out = []
    for step in stream:
        tokens = sum(mb["input_ids"].numel() for mb in step)
        patches = sum(mb["pixel_values"].shape[0] for mb in step if "pixel_values" in mb)
        # Each packed sample attends within itself: Σ s_i² over the micro-batches' real samples.
        attention = (
            12
            * text.num_hidden_layers
            * text.num_attention_heads
            * head_dim
            * sum(attention_length(mb) * mb["input_ids"].shape[-1] for mb in step)
        )
        frames = (
            sum(frames_after_front_end(mb.get("audio_lengths") or [], audio_tower.n_window) for mb in step)
            if audio
            else 0
        )
        out.append(6 * lm * tokens + attention + 6 * vision * patches + 6 * audio * frames)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-vl-2b", choices=sorted(SHAPES))
    p.add_argument("--images", required=True, help="a folder of pictures")
    p.add_argument("--text", required=True, help="a text file: tokenizer training text and the answers")
    p.add_argument("--speech", default="/usr/share/codec2/raw/speech_orig_16k.wav", help="omni shapes: a speech WAV")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--image-tokens", type=int, default=1024, help="max merged tokens per picture")
    p.add_argument("--rows", type=int, default=700)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--runs", nargs="+", default=["a", "c"], help="a, c, c:compile=0, a:ac=1, c:ac=1 (ac: checkpointing)"
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--profile", type=int, default=0, help="profile this many extra steps of each (c) run")
    p.add_argument("--keep-trace", action="store_true", help="keep the profiler's Chrome trace (gzipped)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="vlm_throughput")
    p.add_argument("--worker")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    work = Path(tempfile.mkdtemp())
    folder, data = build_assets(args, work)
    total = args.steps + args.profile
    stream = build_stream(folder, data, argparse.Namespace(**{**vars(args), "steps": total}))
    torch.save(stream, work / "stream.pt")
    flops = model_flops(folder, stream)[: args.steps]
    timed = stream[: args.steps]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.date.today().isoformat(), "command": "python " + " ".join(sys.argv), "shape": args.shape,
            "torch": torch.__version__, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "patches_per_step":
            [sum(mb["pixel_values"].shape[0] for mb in s if "pixel_values" in mb) for s in timed]}  # fmt: skip
    rows = []
    for i, run in enumerate(args.runs):
        mode, *pairs = run.split(":")
        options = dict(pair.split("=") for pair in pairs)
        stem = f"{args.name}_{i}_" + run.replace(":", "_").replace("=", "")
        spec = {"mode": mode, "model": str(folder), "stream": str(work / "stream.pt"), "lr": args.lr,
                "omni": "audio" in SHAPES[args.shape],
                "compile": options.get("compile", "1") == "1", "ac": options.get("ac", "0") == "1",
                "options": options, "steps": args.steps,
                "profile": int(options.get("profile", args.profile)) if mode == "c" else 0,
                "out": str(args.out), "stem": stem, "keep_trace": args.keep_trace,
                "result": str(work / f"result_{i}.json")}  # fmt: skip
        (work / f"spec_{i}.json").write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, __file__, "--worker", str(work / f"spec_{i}.json"), "--images", ".",
                               "--text", "."], capture_output=True, text=True, timeout=900)  # fmt: skip
        print(proc.stdout[-3000:], proc.stderr[-6000:], flush=True)
        result = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).exists() else {"status": "error"}
        if result["status"] == "ok":
            result["step_times"] = result["step_times"][: args.steps]
            result["losses"] = result["losses"][: args.steps]
            times = result["step_times"][args.warmup :]
            median = statistics.median(times)
            step_flops = statistics.median(flops[args.warmup :])
            tokens = statistics.median(sum(mb["input_ids"].numel() for mb in s) for s in timed[args.warmup :])
            result.update(median_s=median, tokens_per_s=tokens / median, mfu=step_flops / median / 989e12)
        rows.append({"run": run, **result})
        write_results(args, meta, rows)  # after every run: a later crash or timeout keeps the finished ones


def write_results(args: argparse.Namespace, meta: dict, rows: list[dict]) -> None:
    """``<name>.json`` (every number) and ``<name>.md`` (the table) in ``args.out``."""
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    base = next((r for r in rows if r["run"].split(":")[0] == "a" and r["status"] == "ok"), None)
    lines = [f"# VLM throughput: {args.shape}, {args.seq}-token micro-batches, 1 GPU", "",
             f"{meta['date']} · {meta['device']} · torch {meta['torch']}", "", f"`{meta['command']}`", "",
             "| run | tokens/s | vs (a) | MFU (LM + encoders) | peak GiB | vs (a) | loss @ last step |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['run']} | **{r['status']}** | | | | | |")
            continue
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}×" if base else ""
        memory = f"{r['peak_mem_gib'] / base['peak_mem_gib']:.2f}×" if base else ""
        lines.append(f"| {r['run']} | {r['tokens_per_s']:,.0f} | {speed} | {r['mfu']:.1%} | {r['peak_mem_gib']:.1f} | "
                     f"{memory} | {r['losses'][-1]:.4f} |")  # fmt: skip
    if base:
        for r in rows:
            if r is not base and r["status"] == "ok":
                worst = max(abs(x - y) / abs(y) for x, y in zip(r["losses"], base["losses"]))
                lines.append(
                    f"\n{r['run']}: per-step losses within {worst:.1e} relative of (a) over {len(r['losses'])} steps."
                )
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
