"""Vision-language training: Qwen2.5-VL and Qwen3-VL (tiny random configs, a real processor, real images and video).

* One process equals plain transformers: the module's summed loss on a packed micro-batch of an image sample, a video
  sample and a text sample equals the sum of the HF model's per-sample losses computed the plain way (the processor's
  inputs, the model's own forward and position ids, no packing), rtol 1e-5.
* Rank-asymmetric batches: in step 0 dp rank 0 holds images and a video and dp rank 1 text only; step 2 has no image
  anywhere. dp=2, sp=2 and dp=2 × sp=2 (and checkpointing on) give the single-process losses and grad norms (fp32,
  rtol 1e-4), for both families; every run is bounded by a timeout, so a hung collective fails the test.
* Freeze options, a separate vision learning rate, export round trip, and bad rows (``DataError`` naming the file,
  line and media path).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from e2e_helpers import lee_text_path
from multimodal_runs import assert_runs_equal, assert_split_equals_whole, fit_from_cli, fit_plan
from vlm_assets import media_files, save_tiny_vlm_folder

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
TOKENS = 256
GLOBAL_MICRO_BATCHES = 4


def _chat(media: list[tuple[str, str]], question: str, answer: str) -> dict:
    content = [{"type": kind, kind: path} for kind, path in media] + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def _text(i: int) -> dict:
    return _chat([], f"Question number {i}: what happened in the story?", f"Answer {i}: the fire was put out.")


# Step-major list of global micro-batches, each a list of rows; dp rank r of 2 takes micro-batches 2r, 2r+1.
PLAN = [
    [[_chat([("image", "media/cat.png")], "What is this?", "A cat."), _text(0)],
     [_chat([("video", "media/clip.mp4")], "Describe the clip.", "A rabbit in a forest.")],
     [_text(1), _text(2)],
     [_text(3)]],
    [[_chat([("image", "media/china.jpg")], "Where is this?", "A temple.")],
     [_chat([("image", "media/coffee.png"), ("image", "media/astronaut.png")], "Compare them.", "Cup and person.")],
     [_text(4)],
     [_text(5), _text(6)]],
    [[_text(7)], [_text(8)], [_text(9), _text(10)], [_text(11)]],
]  # fmt: skip


def build_vlm_assets(root: Path, families: tuple[str, ...] = FAMILIES) -> dict:
    """Per family: the model folder (config + processor) and the plan's micro-batches built by the real pipeline, under
    ``root`` (also used by ``bench/nccl_equivalence.py prepare``)."""
    from veomni_lightning.data import VLMDataModule
    from veomni_lightning.data.multimodal import build_multimodal_micro_batch
    from veomni_lightning.data.sources import RowLocation

    media = root / "media"
    media.mkdir(parents=True)
    files = media_files()
    for name, source in [("cat.png", "cat"), ("china.jpg", "china"), ("coffee.png", "coffee"),
                         ("astronaut.png", "astronaut"), ("clip.mp4", "video")]:  # fmt: skip
        shutil.copy(files[source], media / name)
    rows = [row for step in PLAN for mb in step for row in mb]
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {"root": str(root), "data": str(data)}
    for family in families:
        folder = save_tiny_vlm_folder(root / family, family, lee_text_path())
        dm = VLMDataModule(train_files=str(data), processor=str(folder), micro_batch_tokens=TOKENS)
        encoder = dm.make_encoder()
        pad = dm.tokenizer.pad_token_id
        line = iter(range(1, len(rows) + 1))
        steps = [
            [
                build_multimodal_micro_batch(
                    [encoder.encode(r, RowLocation(str(data), next(line))) for r in mb], TOKENS, pad
                )
                for mb in step
            ]  # fmt: skip
            for step in PLAN
        ]
        out[family] = {"model": str(folder), "steps": steps}
    return out


@pytest.fixture(scope="module")
def vlm_assets(tmp_path_factory) -> dict:
    """Both families' assets (see :func:`build_vlm_assets`)."""
    return build_vlm_assets(tmp_path_factory.mktemp("vlm"))


def _runs(rank: int, world: int, assets: dict, layouts: list) -> dict:
    return {
        f"{family}/{name}": fit_plan(
            rank, world, assets[family]["steps"], GLOBAL_MICRO_BATCHES, "VLMModule", assets[family]["model"], sp, ac
        )  # fmt: skip
        for family, name, sp, ac in layouts
    }


@pytest.fixture(scope="module")
def single(vlm_assets) -> dict:
    layouts = [(f, "single", 1, False) for f in FAMILIES]
    return run_distributed(_runs, 1, vlm_assets, layouts, init_process_group=False, timeout=240)[0]


def _assert_equal(got: dict, ref: dict, label: str) -> None:
    assert_runs_equal(got, ref, len(PLAN), label)


@pytest.mark.timeout(600)
def test_dp2_and_sp2_with_text_only_ranks_equal_single_process(vlm_assets, single):
    layouts = [(f, name, sp, ac) for f in FAMILIES for name, sp, ac in [("dp2", 1, False), ("sp2", 2, False)]]
    layouts.append(("qwen2_5_vl", "dp2_ac", 1, True))
    results = run_distributed(_runs, 2, vlm_assets, layouts, init_process_group=False, timeout=500)
    for rank_results in results:
        for label, got in rank_results.items():
            _assert_equal(got, single[f"{label.split('/')[0]}/single"], label)
    for family in FAMILIES:
        losses = single[f"{family}/single"]["losses"]
        assert losses[-1] < losses[0], (family, losses)


@pytest.mark.timeout(600)
def test_dp2_times_sp2_equals_single_process(vlm_assets, single):
    layouts = [(f, "dp2_sp2", 2, False) for f in FAMILIES]
    results = run_distributed(_runs, 4, vlm_assets, layouts, init_process_group=False, timeout=500)
    for rank_results in results:
        for label, got in rank_results.items():
            _assert_equal(got, single[f"{label.split('/')[0]}/single"], label)


# ------------------------------------------------------------------------------------------ one process, plain HF
def _built_module(model: str, **options):
    from veomni_lightning.modules import VLMModule

    module = VLMModule(model, pretrained=False, **options)
    module.setup_model(None, None)
    return module


@pytest.mark.parametrize("family", FAMILIES)
def test_single_process_loss_equals_plain_transformers_per_sample(vlm_assets, family):
    from transformers import AutoModelForImageTextToText

    from veomni_lightning.data import VLMDataModule
    from veomni_lightning.data.sources import RowLocation

    module = _built_module(vlm_assets[family]["model"])
    micro_batch = vlm_assets[family]["steps"][0][0]  # an image sample and a text sample, packed, then padding
    with torch.no_grad():
        ours = module.loss_sums(micro_batch)["loss"]

    hf = module.model.hf_model
    plain = AutoModelForImageTextToText.from_config(hf.config, attn_implementation="sdpa", dtype=torch.float32)
    plain.load_state_dict(hf.state_dict())
    plain.eval()
    dm = VLMDataModule(train_files=vlm_assets["data"], processor=vlm_assets[family]["model"])
    encoder = dm.make_encoder()
    total = torch.zeros((), dtype=torch.float64)
    for line, row in enumerate(PLAN[0][0], start=1):
        messages, media = encoder._validate(row, RowLocation(vlm_assets["data"], line))
        loaded = [encoder._load(kind, path, None) for kind, path in media]
        inputs = encoder._process(messages, loaded, None)
        ids, mask, _ = encoder.encode(row, RowLocation(vlm_assets["data"], line))
        with torch.no_grad():
            logits = plain(**inputs).logits[0].double()
        targets = torch.tensor(ids[1:])
        keep = torch.tensor(mask[1:])
        total += torch.nn.functional.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum")
    torch.testing.assert_close(ours.double(), total, rtol=1e-5, atol=0)


def test_freeze_options_and_vision_lr(vlm_assets):
    model = vlm_assets["qwen2_5_vl"]["model"]
    module = _built_module(model, freeze_vision=True, learning_rate=1e-3)
    tower = module.adapter.vision_tower(module.model.hf_model)
    merger = {id(p) for p in tower.merger.parameters()}
    frozen = [n for n, p in tower.named_parameters() if not p.requires_grad]
    assert frozen and all(not n.startswith("merger.") for n in frozen)
    assert all(p.requires_grad for p in tower.merger.parameters())
    optimizer, _ = module.build_optimizer(10)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in tower.parameters() if not p.requires_grad)
    with torch.enable_grad():
        module.loss_sums(vlm_assets["qwen2_5_vl"]["steps"][0][0])["loss"].backward()
    assert all(p.grad is None for p in tower.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in tower.merger.parameters())

    module = _built_module(model, freeze_projector=True, vision_lr=5e-4, learning_rate=1e-3)
    tower = module.adapter.vision_tower(module.model.hf_model)
    assert not any(p.requires_grad for p in tower.merger.parameters())
    optimizer, _ = module.build_optimizer(10)
    vision = {id(p) for p in tower.parameters()}
    for group in optimizer.param_groups:
        kinds = {id(p) in vision for p in group["params"]}
        assert len(kinds) == 1, "a group mixes vision and language parameters"
        assert group["lr"] == pytest.approx(5e-4 if kinds == {True} else 1e-3)
    assert not merger & {id(p) for g in optimizer.param_groups for p in g["params"]}


def test_export_round_trip_gives_the_module_logits(vlm_assets, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = vlm_assets["qwen3_vl"]["model"]
    module = _built_module(model)
    processor = AutoProcessor.from_pretrained(model)
    module.export_hf(str(tmp_path / "hf"), processor=processor)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    reference = module.model.hf_model.eval()
    ids = torch.randint(10, 500, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    assert AutoProcessor.from_pretrained(tmp_path / "hf").image_token == processor.image_token


# ------------------------------------------------------------------------------------------ bad rows
@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", r"rows.jsonl line 1: image file .*missing.png does not exist"),
        ("unreadable", r"rows.jsonl line 1: cannot read image .*broken.png"),
        ("token_count", r"rows.jsonl line 1: the processor rejected the row: Found 1 <\|image_pad\|> tokens"),
        ("no_assistant", r"rows.jsonl line 1: the conversation has no assistant message"),
    ],
)
def test_bad_rows_name_file_line_and_media(vlm_assets, tmp_path, case, expected):
    from veomni_lightning.data import VLMDataModule
    from veomni_lightning.data.sources import DataError

    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    row = {
        "missing": _chat([("image", "missing.png")], "What?", "Nothing."),
        "unreadable": _chat([("image", "broken.png")], "What?", "Nothing."),
        "token_count": _chat([], "Look: <|image_pad|>", "Nothing."),
        "no_assistant": {"messages": [{"role": "user", "content": "hello"}]},
    }[case]
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row) + "\n")
    dm = VLMDataModule(train_files=str(data), processor=vlm_assets["qwen2_5_vl"]["model"])
    with pytest.raises(DataError, match=expected):
        dm.setup("fit")


def test_video_row_without_video_support_is_refused(vlm_assets, tmp_path):
    from veomni_lightning.data.multimodal import MultimodalEncoder
    from veomni_lightning.data.sources import DataError, RowLocation
    from veomni_lightning.data.vlm import load_processor, rope_index_of

    model = vlm_assets["qwen2_5_vl"]["model"]
    processor = load_processor(model)
    processor.video_processor = None
    encoder = MultimodalEncoder(processor, rope_index_of(model))
    row = _chat([("video", str(Path(vlm_assets["root"]) / "media" / "clip.mp4"))], "What?", "A clip.")
    with pytest.raises(DataError, match=r"rows.jsonl line 3: the row has a video \(.*clip.mp4\) but the processor"):
        encoder.encode(row, RowLocation(str(tmp_path / "rows.jsonl"), 3))


@pytest.mark.timeout(300)
def test_cli_tiny_vlm_config_trains_with_sp2(tmp_path):
    """The shipped tiny Qwen3-VL config from the command line, over 2 processes with Ulysses SP."""
    losses = fit_from_cli("configs/vlm/qwen3_vl_tiny_cpu.yaml", tmp_path / "run")
    assert len(losses) == 3 and losses[-1] < losses[0], losses


def _tower_split(rank: int, world: int, assets: dict, family: str) -> dict:
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForImageTextToText

    from veomni_lightning.models.vision_language import VisionLanguageAdapter, VisionLanguageWithLoss
    from veomni_lightning.parallel.attention import ENCODER_ATTENTION

    torch.manual_seed(0)
    hf = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(assets[family]["model"]))
    adapter = VisionLanguageAdapter()
    adapter.vision_tower(hf).config._attn_implementation = ENCODER_ATTENTION
    root = VisionLanguageWithLoss(hf, adapter)
    micro_batch = dict(assets[family]["steps"][1][1])  # two pictures of different sizes
    video = assets[family]["steps"][0][1]
    micro_batch.update(pixel_values_videos=video["pixel_values_videos"], video_grid_thw=video["video_grid_thw"],
                       vision_grids=micro_batch["vision_grids"] + video["vision_grids"])  # fmt: skip
    weights = torch.randn(4096, generator=torch.Generator().manual_seed(1))

    def run(sp_size: int, group) -> tuple:
        pixels = micro_batch["pixel_values"].clone().requires_grad_()
        features, deepstack, _ = root.vision_features({**micro_batch, "pixel_values": pixels}, pixels.device,
                                                      sp_size, group)  # fmt: skip
        outputs = [features, *(deepstack or [])]
        # Every rank sees the whole loss here; as in training, the ranks' shares must sum to it.
        loss = sum((o * weights[: o.shape[-1]]).sum() * (i + 1) for i, o in enumerate(outputs)) / sp_size
        hf.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in adapter.vision_tower(hf).named_parameters() if p.grad is not None}
        return [o.detach() for o in outputs], pixels.grad, grads

    reference = run(1, None)
    adapter.split_for_sequence_parallel(hf, dist.group.WORLD)
    split = run(world, dist.group.WORLD)
    return {"reference": reference, "split": split}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.timeout(180)
def test_vision_tower_split_over_sp_ranks_equals_the_whole_tower(vlm_assets, family):
    """Each SP rank runs the tower's blocks on its slice of the patches (a padding image evens them out): the merged
    (and deepstack) features equal the unsplit tower's on every rank, and the parameter and pixel gradients summed
    over the ranks equal the unsplit ones."""
    results = run_distributed(_tower_split, 2, vlm_assets, family, timeout=150)
    assert_split_equals_whole(results)


def test_mfu_flops_count_the_vision_tower(vlm_assets):
    from veomni_lightning.modules.metrics import count_parameters

    module = _built_module(vlm_assets["qwen2_5_vl"]["model"])
    micro_batch = vlm_assets["qwen2_5_vl"]["steps"][0][0]
    text_only = {k: v for k, v in micro_batch.items() if not k.startswith("pixel_values")}
    tower = module.adapter.vision_tower(module.model.hf_model)
    patches, tokens = micro_batch["pixel_values"].shape[0], micro_batch["input_ids"].shape[-1]
    expected = module.flops_per_token(text_only) + 6 * count_parameters(tower) * patches / tokens
    assert module.flops_per_token(micro_batch) == pytest.approx(expected)
    assert patches > 0 and count_parameters(tower) > 0


def test_lora_adapter_and_merged_exports_give_the_module_logits(vlm_assets, tmp_path):
    """LoRA on a VLM (language model and vision tower, all-linear): the PEFT adapter folder on the base model and the
    merged folder give the module's logits, also with a picture through the adapted vision tower."""
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = vlm_assets["qwen2_5_vl"]["model"]
    processor = AutoProcessor.from_pretrained(model)
    module = _built_module(model, lora={"r": 4, "alpha": 8, "target_modules": "all-linear"})
    adapted = {n.split(".lora_")[0] for n, p in module.model.named_parameters() if p.requires_grad}
    assert any(".visual." in n for n in adapted) and any(".language_model." in n for n in adapted), sorted(adapted)
    # MFU: a frozen weight does no weight gradient (4 FLOPs per parameter and row instead of 6), an adapter all 6.
    from veomni_lightning.modules.metrics import count_parameters, input_embedding_parameters

    hf, micro_batch = module.model.hf_model, vlm_assets["qwen2_5_vl"]["steps"][0][0]
    lm = [module.adapter.language_model(hf), hf.lm_head]
    lm_adapters = sum(count_parameters(m, trainable_only=True) for m in lm)
    lm_frozen = sum(count_parameters(m) for m in lm) - lm_adapters - input_embedding_parameters(hf)
    tower = module.adapter.vision_tower(hf)
    tower_adapters = count_parameters(tower, trainable_only=True)
    tower_frozen = count_parameters(tower) - tower_adapters
    patches_per_token = micro_batch["pixel_values"].shape[0] / micro_batch["input_ids"].shape[-1]
    full = _built_module(model)  # the same base without adapters: 6 FLOPs per weight
    expected = 2 * lm_frozen - 6 * lm_adapters + (2 * tower_frozen - 6 * tower_adapters) * patches_per_token
    assert full.flops_per_token(micro_batch) - module.flops_per_token(micro_batch) == pytest.approx(expected)
    module.export_hf(str(tmp_path / "base"), processor=processor)  # B = 0: the merged export is the base model
    with torch.no_grad():  # a trained adapter: B away from zero
        for name, param in module.model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    module.export_lora(str(tmp_path / "adapter"))
    module.export_hf(str(tmp_path / "merged"), processor=processor)
    load = lambda folder: AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()  # noqa: E731
    peft_model, merged, base = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "adapter").eval(), \
        load(tmp_path / "merged"), load(tmp_path / "base")  # fmt: skip
    ids = torch.randint(10, 500, (1, 24))
    picture = Image.open(Path(vlm_assets["root"]) / "media" / "cat.png").convert("RGB")
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    inputs = processor(text=processor.apply_chat_template(chat, add_generation_prompt=True), images=[picture],
                       return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        want = module.model.hf_model.eval()(input_ids=ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
        with_picture = peft_model(**inputs).logits
        torch.testing.assert_close(merged(**inputs).logits, with_picture, rtol=1e-4, atol=1e-5)
        assert (with_picture - base(**inputs).logits).abs().max() > 1e-3
