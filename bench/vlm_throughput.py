"""Vision-language training throughput: (a) plain HF beside (c) ours, same weights, same data, one run.

- ``a`` plain HF: ``AutoModelForImageTextToText`` (sdpa), the samples of each packed micro-batch unpacked into a
  padded batch (what a user writes without us: the model computes its own 3-D positions from ``attention_mask`` and
  ``mm_token_type_ids``), fp32 weights under bf16 autocast, fused AdamW, always one GPU;
- ``c`` ours: ``VLMModule`` + ``VeOmniStrategy`` (bf16 compute, fp32 master weights and reduction), packed, on
  ``--gpus`` GPUs (one process each, started by torchrun; FSDP2 over dp = GPUs / sp).

Both use the shared random init (one seed) of a real model shape, real pictures (and, with ``--video``, a real clip:
every ``--video-every``-th row carries it instead of pictures) through a real processor (Qwen2-VL image and video
processors, a BPE tokenizer trained on real text), the same step stream and the same AdamW settings, and clip the
gradient norm to 1.0. Each run is its own process group (clean peak-memory numbers).

A global step holds ``--gpus`` packed micro-batches of ``--seq`` tokens (``--seq`` tokens per GPU and step): (c)
gives each of its dp = GPUs / sp ranks its own consecutive share of them (``sp=2``: the 2 GPUs of a dp rank split each
micro-batch's sequence and accumulate 2 micro-batches), and (a) trains the whole global step on its one GPU with
gradient accumulation, so all runs see the same data and their per-step losses compare. Reported per run: tokens/s
per GPU (median step after ``--warmup``: the step's tokens, padding included, / step time / the run's GPUs), MFU per
GPU and peak memory (``max_memory_allocated``, max over ranks).

MFU counts the language model and the vision tower:
``flops = 6·(P_lm − E)·T + 12·L·H·D·Σ s_i² + 6·P_vision·N`` per step, with T tokens, N vision patches (pictures' and
video frames'), s_i the lengths of the packed samples (each attends within itself; the padding is left out; the
vision tower's attention FLOPs are left out too), E the input embedding table (E = 0 when tied to the lm_head); MFU
per GPU = flops / step time / the run's GPUs / 989 TFLOP/s (H100/H200 dense bf16).

    python bench/vlm_throughput.py --images gpu_assets/images --text gpu_assets/lee_x3.txt --runs a c --steps 20
    python bench/vlm_throughput.py --shape qwen2.5-vl-7b --gpus 2 --images gpu_assets/images \
        --video gpu_assets/clip.mp4 --text gpu_assets/lee_x3.txt --runs c:ac=1 c:ac=1:sp=2 a --steps 12

Options of a run (``c:ac=1:vision_ac=0``): ``compile`` and ``ac`` (both runs); for (c) also ``sp`` (Ulysses
degree; it must divide ``--gpus``), ``policy`` (full | selective), ``fraction`` (share of blocks that recompute),
``vision_ac`` / ``lm_ac`` (0: the vision tower's / the language model's blocks do not recompute), ``vision_compile``
(0: the tower's blocks run eagerly), ``vision_fsdp`` (``tower``: one FSDP unit for the whole tower instead of one per
block), ``reshard`` (0: keep gathered weights from forward to backward) and ``gc`` (``freeze``: ``gc.freeze()`` after
warm-up). ``--profile K`` runs K more steps of each (c) run (``profile=N``: N for this one, ``trace=1``: keep its
trace) under the torch profiler (rank 0) and writes the breakdown of ``profile_vlm.py`` beside the results. An
out-of-memory error is a row (``OOM``), not a crash.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import traceback
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
    # Qwen2.5-VL-7B-Instruct's shape: the config_overrides of configs/vlm/qwen2_5_vl_7b_sft.yaml (8.29B parameters;
    # tests/test_vlm_bench.py keeps the two equal).
    "qwen2.5-vl-tiny": dict(  # a CPU smoke test of the harness on the 7B's family (no meaningful numbers)
        family="qwen2_5_vl",
        tie_word_embeddings=False,
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=4096,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
    ),  # fmt: skip
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


def recipe_shape(recipe: Path) -> dict:
    """A bench shape read from a shipped VLM recipe's ``config_overrides`` (one source for the shape and the recipe)."""
    import yaml

    init = yaml.safe_load(recipe.read_text())["model"]["init_args"]
    overrides = init["config_overrides"]
    return dict(family=init["model"], tie_word_embeddings=overrides["tie_word_embeddings"],
                text=overrides["text_config"], vision=overrides["vision_config"])  # fmt: skip


# Qwen2.5-VL-7B-Instruct's shape, as the 7B recipe (configs/vlm/qwen2_5_vl_7b_sft.yaml) trains it.
SHAPES["qwen2.5-vl-7b"] = recipe_shape(HERE.parent / "configs" / "vlm" / "qwen2_5_vl_7b_sft.yaml")


def build_assets(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """A model folder (real shape config + processor) and a rows file of pictures (or, every ``--video-every``-th row
    with ``--video``, the clip) with questions and answers."""
    from transformers import AutoConfig, AutoProcessor
    from vlm_assets import save_processor

    shape = SHAPES[args.shape]
    if "audio" in shape:
        if args.video:
            raise SystemExit("--video: the omni shapes' rows carry speech and pictures only")
        return build_omni_assets(args, work, shape)
    folder = save_processor(work / "model", shape["family"], Path(args.text))
    processor = AutoProcessor.from_pretrained(folder)
    unit = shape["vision"]["patch_size"] * shape["vision"]["spatial_merge_size"]
    processor.image_processor.max_pixels = args.image_tokens * unit * unit
    processor.image_processor.min_pixels = min(64, args.image_tokens) * unit * unit
    # Per frame pair (the temporal patch): the default 768 merged tokens is Qwen's own video budget (qwen-vl-utils:
    # 128-768 tokens of 28×28 pixels per frame); the clip's frames are decoded at the processor's 2 fps. Qwen3-VL's
    # video processor reads the same numbers as a budget of the whole clip.
    processor.video_processor.size = {"shortest_edge": min(128, args.video_tokens) * unit * unit,
                                      "longest_edge": args.video_tokens * unit * unit}  # fmt: skip
    processor.save_pretrained(folder)
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in [("image_token_id", "<|image_pad|>"),
           ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
           ("vision_end_token_id", "<|vision_end|>")]}  # fmt: skip
    config = AutoConfig.for_model(shape["family"], text_config=shape["text"], vision_config=shape["vision"],
                                  tie_word_embeddings=shape.get("tie_word_embeddings", True), **ids)  # fmt: skip
    config.save_pretrained(folder)
    images = sorted(str(p.resolve()) for p in Path(args.images).iterdir())
    video = str(Path(args.video).resolve()) if args.video else None
    sentences = [s.strip() for s in Path(args.text).read_text(errors="ignore").split(".") if 40 < len(s.strip()) < 300]
    rng = random.Random(0)
    rows = []
    for i in range(args.rows):
        if video and i % args.video_every == args.video_every - 1:
            content = [{"type": "video", "video": video}]
        else:
            content = [{"type": "image", "image": p} for p in rng.sample(images, rng.choice([1, 2]))]
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
    """``args.steps`` global steps of ``args.gpus`` packed micro-batches (the product's split: dp rank r of a run
    takes its consecutive share of each step, like ``VLMDataModule`` on r)."""
    from veomni_lightning.data import VLMDataModule

    dm = VLMDataModule(train_files=str(data), processor=str(folder), micro_batch_tokens=args.seq,
                       grad_accum_steps=args.gpus, seed=0, shuffle=False)  # fmt: skip
    dm.setup("fit")
    stream = []
    for step in dm.train_dataloader():
        stream.append(step)
        if len(stream) == args.steps:
            return stream
    raise SystemExit(f"{args.rows} rows hold fewer than {args.steps} steps of {args.gpus} micro-batches of {args.seq} "
                     "tokens: raise --rows")  # fmt: skip


# ------------------------------------------------------------------------------------------------------ workers
def _padded(mb: dict, config, seconds_per_grid: float | None = None) -> dict:
    """A packed micro-batch as a plain padded batch of its samples (what HF users feed); ``seconds_per_grid``: the
    clip's seconds per frame pair, which the processor hands a user beside the video (``second_per_grid_ts``)."""
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
    if "pixel_values_videos" in mb:
        batch.update(pixel_values_videos=mb["pixel_values_videos"], video_grid_thw=mb["video_grid_thw"])
        if seconds_per_grid is not None:
            batch["second_per_grid_ts"] = torch.full((len(mb["video_grid_thw"]),), seconds_per_grid)
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
    from text_workers import MAX_GRAD_NORM, StepClock, _device, _finish
    from transformers import AutoConfig, AutoModelForImageTextToText

    from veomni_lightning.models import TransformersAdapter, build_model_on_meta, materialize_model

    device = _device()
    config = AutoConfig.from_pretrained(spec["model"])
    model = build_model_on_meta(config, attn_implementation="sdpa", dtype=torch.float32,
                                auto_class=AutoModelForImageTextToText)  # fmt: skip
    materialize_model(model, device)
    TransformersAdapter().init_random_weights(model, seed=0)
    if spec["ac"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                  fused=device.type == "cuda")  # fmt: skip
    clock = StepClock(device)
    clock.mark()
    for step in stream:  # the whole global step on this one GPU: its micro-batches accumulate
        num_items = sum(mb["num_loss_tokens"] for mb in step)
        total = torch.zeros((), device=device)
        for mb in step:
            batch = {k: v.to(device) for k, v in _padded(mb, config, spec.get("seconds_per_grid")).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16"):
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
    from text_workers import MAX_GRAD_NORM, _device, _finish, _lightning_parts

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
    parallel = ParallelConfig(sp_size=int(options.get("sp", 1)), param_dtype=spec["dtype"], reduce_dtype="fp32",
                              compile_blocks=spec["compile"], activation_checkpointing=spec["ac"],
                              checkpoint_policy=options.get("policy", "full"),
                              checkpoint_fraction=float(options.get("fraction", 1.0)),
                              reshard_after_forward=options.get("reshard", "1") == "1")  # fmt: skip
    data, timer, make_trainer = _lightning_parts({"grad_accum": 1}, stream, per_micro_batch=False)
    trainer = make_trainer(VeOmniStrategy(parallel=parallel), timer)
    if options.get("gc") == "freeze":
        trainer.callbacks.append(FreezeGarbage())
    if spec.get("profile") and int(os.environ.get("RANK", 0)) == 0:  # one trace: the ranks would write the same files
        from profile_vlm import StepProfiler

        keep = spec["keep_trace"] or options.get("trace") == "1"
        profiler = StepProfiler(spec["steps"], spec["profile"], Path(spec["out"]), spec["stem"], keep)
        trainer.callbacks.append(profiler.callback())
    trainer.fit(module, datamodule=data)
    from torch._dynamo.utils import counters
    from torch.distributed.fsdp import FSDPModule

    dynamo = {kind: {k[:200]: v for k, v in counters[kind].items()} for kind in ("stats", "graph_break")}
    units = len({id(m._get_fsdp_state()) for m in module.model.modules() if isinstance(m, FSDPModule)})
    return {**_finish(timer.clock, _device()), "dynamo": dynamo, "fsdp_units": units}


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
    """One process of a run (under torchrun for a run of several GPUs). Every rank writes its status; rank 0 the
    numbers. A rank that fails exits non-zero, so torchrun stops the others instead of leaving them in a collective."""
    from text_workers import _device

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", 0))
    try:
        _device()  # this rank's GPU before anything allocates on GPU 0
        stream = torch.load(spec["stream"], weights_only=True)
        result = {"status": "ok", **(run_plain_hf if spec["mode"] == "a" else run_ours)(spec, stream)}
    except torch.OutOfMemoryError as err:
        result = {"status": "OOM", "error": str(err).splitlines()[0][:300]}
    except Exception as err:  # a row of the table; the traceback goes to the run's log
        traceback.print_exc()
        # NCCL and cuBLAS report a full GPU as their own errors, not as torch.OutOfMemoryError.
        status = "OOM" if "out of memory" in str(err).lower() else "error"
        result = {"status": status, "error": f"{type(err).__name__}: {err}"[:500]}
    Path(f"{spec['result']}.rank{rank}").write_text(json.dumps(result if rank == 0 else {"status": result["status"],
                                                                 "error": result.get("error", "")}))  # fmt: skip
    if result["status"] != "ok":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # skip the interpreter's teardown: it could wait on a collective of a peer that failed


def launch(spec: dict, log: Path, timeout: float) -> dict:
    """Run one spec in its own process group (``torch.distributed.run`` for several processes, which sets the
    torchrun variables: MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE) and read its result."""
    spec_path = Path(spec["result"]).with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    worker_args = [__file__, "--worker", str(spec_path), "--images", ".", "--text", "."]
    n = spec["processes"]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else []),
           *worker_args]  # fmt: skip
    timed_out = False
    run_log = Path(spec["result"]).with_suffix(".log")
    with open(run_log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            # SIGTERM first: torchrun then stops its workers (they run in sessions of their own, out of our reach).
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    text = run_log.read_text(errors="replace")
    print(text[-6000:], flush=True)
    with open(log, "a") as out:  # one log of all runs: the device machine hands back few files
        out.write(f"--- {spec['stem']}: {' '.join(cmd)}\n{text}\n")
    files = {r: Path(f"{spec['result']}.rank{r}") for r in range(n)}
    results = {r: json.loads(f.read_text()) for r, f in files.items() if f.exists()}
    if len(results) == n and all(r["status"] == "ok" for r in results.values()):
        return results[0]
    failed = [r for r in results.values() if r["status"] != "ok"]
    if failed:  # an OOM on any rank names the run, whatever its peers reported after it
        return next((r for r in failed if r["status"] == "OOM"), failed[0])
    return {"status": "timeout" if timed_out else "error",
            "error": f"exit code {proc.returncode}, no result (see {log.name})"}  # fmt: skip


# ------------------------------------------------------------------------------------------------------ parent
def vision_patches(step: list[dict], keys: tuple[str, ...] = ("pixel_values", "pixel_values_videos")) -> int:
    """Patches the vision tower embeds in a step (pictures' and video frames')."""
    return sum(mb[k].shape[0] for mb in step for k in keys if k in mb)


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
        patches = vision_patches(step)
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


def video_seconds_per_grid(folder: Path, video: str) -> float | None:
    """The clip's seconds per frame pair as the product's encoder decodes it (None if the processor gives none, as
    Qwen3-VL's, which marks time in the text): plain HF takes it from the user beside the video; the packed stream
    holds only the positions computed from it."""
    from veomni_lightning.data.multimodal import MultimodalEncoder
    from veomni_lightning.data.sources import RowLocation
    from veomni_lightning.data.vlm import load_processor, rope_index_of

    encoder = MultimodalEncoder(load_processor(str(folder)), rope_index_of(str(folder)))
    loc = RowLocation(video, 1)
    messages = [{"role": "user", "content": [{"type": "video"}]}]
    seconds = encoder._process(messages, [encoder._load("video", video, loc)], loc).get("second_per_grid_ts")
    return None if seconds is None else float(seconds[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-vl-2b", choices=sorted(SHAPES))
    p.add_argument("--images", required=True, help="a folder of pictures")
    p.add_argument("--text", required=True, help="a text file: tokenizer training text and the answers")
    p.add_argument("--video", help="a video clip (mp4): every --video-every-th row carries it instead of pictures")
    p.add_argument("--video-every", type=int, default=4, help="with --video: one row in this many is a video row")
    p.add_argument("--video-tokens", type=int, default=768,
                   help="max merged tokens per frame pair of the video (Qwen3-VL: of the whole clip)")  # fmt: skip
    p.add_argument("--speech", default="/usr/share/codec2/raw/speech_orig_16k.wav", help="omni shapes: a speech WAV")
    p.add_argument("--seq", type=int, default=8192, help="tokens per packed micro-batch (one per GPU and step)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of each (c) run ((a) always uses one)")
    p.add_argument("--image-tokens", type=int, default=1024, help="max merged tokens per picture")
    p.add_argument("--rows", type=int, default=700)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--runs", nargs="+", default=["a", "c"], help="a, c, c:compile=0, a:ac=1, c:ac=1 (ac: checkpointing), c:sp=2"
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="compute dtype (fp32: CPU checks)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per run (a run past it is a 'timeout' row)")
    p.add_argument("--profile", type=int, default=0, help="profile this many extra steps of each (c) run")
    p.add_argument("--keep-trace", action="store_true", help="keep the profiler's Chrome trace (gzipped)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default="vlm_throughput")
    p.add_argument("--worker")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    runs = []
    for run in args.runs:
        mode, *pairs = run.split(":")
        options = dict(pair.split("=") for pair in pairs)
        sp = int(options.get("sp", 1))
        if mode not in ("a", "c") or (mode == "a" and sp != 1) or args.gpus % sp:
            raise SystemExit(f"{run!r}: a run is a or c; sp is an option of (c) and must divide --gpus {args.gpus}")
        runs.append((run, mode, options))
    # The stream file is the size of every step's pixels (GBs for the 7B shape): gone with the run.
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder, data = build_assets(args, work)
        total = args.steps + args.profile
        stream = build_stream(folder, data, argparse.Namespace(**{**vars(args), "steps": total}))
        torch.save(stream, work / "stream.pt")
        flops = model_flops(folder, stream)[: args.steps]
        timed = stream[: args.steps]
        seconds_per_grid = video_seconds_per_grid(folder, str(Path(args.video).resolve())) if args.video else None
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.log").write_text("")
        import lightning
        import transformers

        meta = {"date": dt.date.today().isoformat(), "command": "python " + " ".join(sys.argv), "shape": args.shape,
                "gpus": args.gpus, "torch": torch.__version__, "transformers": transformers.__version__,
                "lightning": lightning.__version__,
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                "tokens_per_step": [sum(mb["input_ids"].numel() for mb in s) for s in timed],
                "patches_per_step": [vision_patches(s) for s in timed],
                "video_patches_per_step": [vision_patches(s, ("pixel_values_videos",)) for s in timed],
                "videos_per_step": [sum(len(mb.get("video_grid_thw", ())) for mb in s) for s in timed]}  # fmt: skip
        rows = []
        for i, (run, mode, options) in enumerate(runs):
            stem = f"{args.name}_{i}_" + run.replace(":", "_").replace("=", "")
            processes = args.gpus if mode == "c" else 1
            spec = {"mode": mode, "model": str(folder), "stream": str(work / "stream.pt"), "lr": args.lr,
                    "omni": "audio" in SHAPES[args.shape], "dtype": args.dtype, "processes": processes,
                    "compile": options.get("compile", "1") == "1", "ac": options.get("ac", "0") == "1",
                    "options": options, "steps": args.steps, "seconds_per_grid": seconds_per_grid,
                    "profile": int(options.get("profile", args.profile)) if mode == "c" else 0,
                    "out": str(args.out), "stem": stem, "keep_trace": args.keep_trace,
                    "result": str(work / f"result_{i}.json")}  # fmt: skip
            print(f"--- {run} on {processes} process(es)", flush=True)
            result = launch(spec, args.out / f"{args.name}.log", args.timeout)
            if result["status"] == "ok":
                result["step_times"] = result["step_times"][: args.steps]
                result["losses"] = result["losses"][: args.steps]
                times = result["step_times"][args.warmup :]
                median = statistics.median(times)
                step_flops = statistics.median(flops[args.warmup :])
                tokens = statistics.median(sum(mb["input_ids"].numel() for mb in s) for s in timed[args.warmup :])
                result.update(median_s=median, tokens_per_s=tokens / median,
                              tokens_per_s_per_gpu=tokens / median / processes,
                              mfu=step_flops / median / processes / 989e12)  # fmt: skip
            rows.append({"run": run, "gpus": processes, **result})
            write_results(args, meta, rows)  # after every run: a later crash or timeout keeps the finished ones


def write_results(args: argparse.Namespace, meta: dict, rows: list[dict]) -> None:
    """``<name>.json`` (every number) and ``<name>.md`` (the table) in ``args.out``."""
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    base = next((r for r in rows if r["run"].split(":")[0] == "a" and r["status"] == "ok"), None)
    media = "pictures" + (f" + a video every {args.video_every} rows" if args.video else "")
    lines = [f"# VLM throughput: {args.shape}, {args.seq}-token micro-batches, {media}, (c) on {args.gpus} GPU(s)", "",
             f"{meta['date']} · {meta['device']} · torch {meta['torch']} · transformers {meta['transformers']} · "
             f"lightning {meta['lightning']}", "", f"`{meta['command']}`", "",
             "| run | GPUs | tokens/s/GPU | vs (a) | MFU/GPU (LM + encoders) | peak GiB (max over ranks) | vs (a) | "
             "loss @ last step |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['run']} | {r['gpus']} | **{r['status']}** | | | | | {r.get('error', '')[:80]} |")
            continue
        speed = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.2f}×" if base else ""
        memory = f"{r['peak_mem_gib'] / base['peak_mem_gib']:.2f}×" if base and base["peak_mem_gib"] else ""
        lines.append(f"| {r['run']} | {r['gpus']} | {r['tokens_per_s_per_gpu']:,.0f} | {speed} | {r['mfu']:.1%} | "
                     f"{r['peak_mem_gib']:.1f} | {memory} | {r['losses'][-1]:.4f} |")  # fmt: skip
    median = {key: statistics.median(meta[key]) for key in ("tokens_per_step", "patches_per_step",
              "video_patches_per_step")}  # fmt: skip
    lines += ["", f"A step: {args.gpus} micro-batch(es), median {median['tokens_per_step']:,.0f} tokens and "
              f"{median['patches_per_step']:,.0f} vision patches ({median['video_patches_per_step']:,.0f} of video "
              "frames); (a) trains it on one GPU."]  # fmt: skip
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
