"""Omni training: the Qwen2.5-Omni thinker (tiny random config, a real processor, real speech, pictures and video).

* One process equals plain transformers: the module's summed loss on a packed micro-batch (audio + image, video +
  audio, text) equals the sum of the thinker's per-sample losses computed the plain way, rtol 1e-5; also with each
  video's own sound track (``use_audio_in_video``).
* Rank-asymmetric batches: step 0 has dp rank 0 with image + video + audio and dp rank 1 with audio only, step 1
  dp rank 0 with text only and dp rank 1 with a picture but no audio, step 2 no media anywhere. dp=2, sp=2 (with and
  without checkpointing) and dp=2 × sp=2 give the single-process losses and grad norms (fp32, rtol 1e-4); every run
  is bounded by a timeout, so a hung collective fails the test.
* The audio tower split over SP ranks equals the whole tower (features, input and parameter gradients).
* Freeze / learning-rate options, export round trip, full omni folders, and bad rows.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from e2e_helpers import lee_text_path
from multimodal_runs import assert_runs_equal, assert_split_equals_whole, fit_from_cli, fit_plan
from vlm_assets import media_files, save_tiny_omni_folder, write_speech_clip

TOKENS = 256
GLOBAL_MICRO_BATCHES = 4
VIDEO_SIZE = {"size": {"shortest_edge": 3136, "longest_edge": 6272}}  # pixels per frame: keeps CPU tests small


def _chat(media: list[tuple[str, str]], question: str, answer: str) -> dict:
    content = [{"type": kind, kind: path} for kind, path in media] + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def _text(i: int) -> dict:
    return _chat([], f"Question {i}: what happened in the story?", f"Answer {i}: the fire was put out.")


# Step-major list of global micro-batches; dp rank r of 2 takes micro-batches 2r, 2r+1.
PLAN = [
    [[_chat([("audio", "media/a.wav"), ("image", "media/cat.png")], "What is said?", "A greeting."), _text(0)],
     [_chat([("video", "media/clip.mp4")], "Describe the clip.", "A rabbit.")],
     [_chat([("audio", "media/b.wav")], "Transcribe.", "Some words.")],
     [_text(1)]],
    [[_text(2)], [_text(3), _text(4)],
     [_chat([("image", "media/china.jpg")], "Where is this?", "A temple.")], [_text(5)]],
    [[_text(6)], [_text(7)], [_text(8), _text(9)], [_text(10)]],
]  # fmt: skip


def build_omni_assets(root: Path, family: str) -> dict:
    """The thinker folder (config + processor) and the plan's micro-batches built by the real pipeline, under
    ``root`` (also used by ``bench/nccl_equivalence.py prepare``)."""
    from veomni_lightning.data import OmniDataModule
    from veomni_lightning.data.multimodal import build_multimodal_micro_batch
    from veomni_lightning.data.sources import RowLocation

    media = root / "media"
    media.mkdir(parents=True)
    files = media_files()
    for name, source in [("cat.png", "cat"), ("china.jpg", "china"), ("clip.mp4", "video")]:
        shutil.copy(files[source], media / name)
    write_speech_clip(media / "a.wav", 0.5, 2.0)
    write_speech_clip(media / "b.wav", 4.0, 1.3)
    rows = [row for step in PLAN for mb in step for row in mb]
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = save_tiny_omni_folder(root / "thinker", lee_text_path(), family)
    dm = OmniDataModule(train_files=str(data), processor=str(folder), micro_batch_tokens=TOKENS,
                        videos_kwargs=VIDEO_SIZE)  # fmt: skip
    encoder = dm.make_encoder()
    line = iter(range(1, len(rows) + 1))
    steps = [
        [
            build_multimodal_micro_batch(
                [encoder.encode(r, RowLocation(str(data), next(line))) for r in mb], TOKENS, dm.tokenizer.pad_token_id
            )
            for mb in step
        ]  # fmt: skip
        for step in PLAN
    ]
    return {"root": str(root), "data": str(data), "model": str(folder), "steps": steps}


@pytest.fixture(scope="module")
def omni_assets(tmp_path_factory) -> dict:
    """Qwen2.5-Omni thinker assets (see :func:`build_omni_assets`)."""
    return build_omni_assets(tmp_path_factory.mktemp("omni"), "qwen2_5_omni")


@pytest.fixture(scope="module")
def moe_assets(tmp_path_factory) -> dict:
    """Qwen3-Omni-MoE thinker assets: Qwen3-VL style vision (deepstack), a conv2d audio front end, MoE experts."""
    return build_omni_assets(tmp_path_factory.mktemp("omni_moe"), "qwen3_omni_moe")


def _runs(rank: int, world: int, assets: dict, layouts: list) -> dict:
    return {name: fit_plan(rank, world, assets["steps"], GLOBAL_MICRO_BATCHES, "OmniModule", assets["model"], sp, ac,
                           *ep) for name, sp, ac, *ep in layouts}  # fmt: skip


@pytest.fixture(scope="module")
def single(omni_assets) -> dict:
    return run_distributed(_runs, 1, omni_assets, [("single", 1, False)], init_process_group=False, timeout=240)[0]


def test_the_plan_is_rank_asymmetric(omni_assets):
    """The premise of the equivalence tests: which micro-batches hold which media."""
    steps = omni_assets["steps"]
    has = lambda mbs, key: any(key in mb for mb in mbs)  # noqa: E731
    assert has(steps[0][:2], "pixel_values") and has(steps[0][:2], "pixel_values_videos")
    assert has(steps[0][:2], "input_features") and has(steps[0][2:], "input_features")
    assert not has(steps[0][2:], "pixel_values") and not has(steps[1][:2], "pixel_values")
    assert has(steps[1][2:], "pixel_values") and not has(steps[1], "input_features")
    assert not any(has(steps[2], key) for key in ("pixel_values", "pixel_values_videos", "input_features"))


@pytest.mark.timeout(600)
def test_dp2_and_sp2_with_audio_less_ranks_equal_single_process(omni_assets, single):
    layouts = [("dp2", 1, False), ("sp2", 2, False), ("sp2_ac", 2, True)]
    results = run_distributed(_runs, 2, omni_assets, layouts, init_process_group=False, timeout=500)
    for rank_results in results:
        for label, got in rank_results.items():
            assert_runs_equal(got, single["single"], len(PLAN), label)
    losses = single["single"]["losses"]
    assert losses[-1] < losses[0], losses


@pytest.mark.timeout(600)
def test_dp2_times_sp2_equals_single_process(omni_assets, single):
    results = run_distributed(_runs, 4, omni_assets, [("dp2_sp2_ac", 2, True)], init_process_group=False, timeout=500)
    for rank_results in results:
        for label, got in rank_results.items():
            assert_runs_equal(got, single["single"], len(PLAN), label)


# ------------------------------------------------------------------------------------------ one process, plain HF
def _built_module(model: str, **options):
    from veomni_lightning.modules import OmniModule

    module = OmniModule(model, pretrained=False, **options)
    module.setup_model(None, None)
    return module


@pytest.mark.parametrize("use_audio_in_video", [False, True])
def test_single_process_loss_equals_plain_transformers_per_sample(omni_assets, use_audio_in_video):
    _assert_equals_plain_transformers(omni_assets, use_audio_in_video)


def test_moe_thinker_single_process_loss_equals_plain_transformers(moe_assets):
    """Qwen3-Omni-MoE's thinker: its towers compute their own indices (other helper signatures), same loss."""
    _assert_equals_plain_transformers(moe_assets, use_audio_in_video=False)


@pytest.mark.timeout(600)
def test_moe_thinker_with_ep2_and_sp2_ep2_equals_single_process(moe_assets):
    """Expert parallelism from the MoE work applies to the thinker's experts unchanged (audio-less ranks included)."""
    single = run_distributed(_runs, 1, moe_assets, [("single", 1, False)], init_process_group=False, timeout=240)[0]
    layouts = [("dp2_ep2", 1, False, 2), ("sp2_ep2", 2, True, 2)]
    results = run_distributed(_runs, 2, moe_assets, layouts, init_process_group=False, timeout=500)
    for rank_results in results:
        for label, got in rank_results.items():
            assert_runs_equal(got, single["single"], len(PLAN), label)


def _assert_equals_plain_transformers(omni_assets: dict, use_audio_in_video: bool) -> None:
    from transformers import AutoModelForImageTextToText

    from veomni_lightning.data import OmniDataModule
    from veomni_lightning.data.multimodal import build_multimodal_micro_batch
    from veomni_lightning.data.sources import RowLocation

    module = _built_module(omni_assets["model"])
    hf = module.model.hf_model
    # A copy: from_config sets the attention implementation on the config it is given (ours is shared with hf).
    plain = AutoModelForImageTextToText.from_config(copy.deepcopy(hf.config), attn_implementation="sdpa",
                                                    dtype=torch.float32)  # fmt: skip
    plain.load_state_dict(hf.state_dict())
    plain.eval()
    dm = OmniDataModule(train_files=omni_assets["data"], processor=omni_assets["model"], videos_kwargs=VIDEO_SIZE,
                        use_audio_in_video=use_audio_in_video)  # fmt: skip
    encoder = dm.make_encoder()
    rows = [*PLAN[0][0], *PLAN[0][1]]  # audio + image, text, video (+ its sound track)
    total = torch.zeros((), dtype=torch.float64)
    samples = []
    for line, row in enumerate(rows, start=1):
        where = RowLocation(omni_assets["data"], line)
        messages, media = encoder._validate(row, where)
        inputs = encoder._process(messages, [encoder._load(kind, path, where) for kind, path in media], where)
        samples.append(encoder.encode(row, where))
        ids, mask, _ = samples[-1]
        with torch.no_grad():
            logits = plain(**inputs, use_audio_in_video=use_audio_in_video).logits[0].double()
        keep = torch.tensor(mask[1:])
        total += torch.nn.functional.cross_entropy(logits[:-1][keep], torch.tensor(ids[1:])[keep], reduction="sum")
    micro_batch = build_multimodal_micro_batch(samples, 512, dm.tokenizer.pad_token_id)
    assert len(micro_batch["audio_lengths"]) == (2 if use_audio_in_video else 1)  # the clip's sound track
    with torch.no_grad():
        ours = module.loss_sums(micro_batch)["loss"]
    torch.testing.assert_close(ours.double(), total, rtol=1e-5, atol=0)


def _audio_tower_split(rank: int, world: int, assets: dict) -> dict:
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForImageTextToText

    from veomni_lightning.models.vision_language import VisionLanguageAdapter, VisionLanguageWithLoss
    from veomni_lightning.parallel.attention import ENCODER_ATTENTION

    torch.manual_seed(0)
    hf = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(assets["model"]))
    adapter = VisionLanguageAdapter()
    adapter.audio_tower(hf).config._attn_implementation = ENCODER_ATTENTION
    root = VisionLanguageWithLoss(hf, adapter)
    first, other = assets["steps"][0][0], assets["steps"][0][2]  # two speech clips of different lengths
    micro_batch = {"input_features": torch.cat([first["input_features"], other["input_features"]]),
                   "audio_lengths": first["audio_lengths"] + other["audio_lengths"]}  # fmt: skip
    weights = torch.randn(4096, generator=torch.Generator().manual_seed(1))

    def run(sp_size: int, group) -> tuple:
        features = micro_batch["input_features"].clone().requires_grad_()
        out, _ = root.audio_features({**micro_batch, "input_features": features}, features.device, sp_size, group)
        loss = (out * weights[: out.shape[-1]]).sum() / sp_size  # the ranks' shares sum to the whole loss
        hf.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in adapter.audio_tower(hf).named_parameters() if p.grad is not None}
        return out.detach(), features.grad, grads

    reference = run(1, None)
    adapter.split_for_sequence_parallel(hf, dist.group.WORLD)
    return {"reference": reference, "split": run(world, dist.group.WORLD)}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_audio_tower_split_over_sp_ranks_equals_the_whole_tower(omni_assets, world):
    """Each SP rank runs the audio layers on its slice of the frames (3 ranks: zero frames pad them evenly): the
    features equal the unsplit tower's on every rank; input and parameter gradients summed over ranks equal too."""
    results = run_distributed(_audio_tower_split, world, omni_assets, timeout=150)
    assert results[0]["reference"][0].shape[0] == 50 + 32  # 2.0 s and 1.3 s of speech: 25 features per second
    assert_split_equals_whole(results)


def test_freeze_audio_and_audio_lr(omni_assets):
    module = _built_module(omni_assets["model"], freeze_audio=True, learning_rate=1e-3)
    tower = module.adapter.audio_tower(module.model.hf_model)
    assert not any(p.requires_grad for p in tower.parameters())
    optimizer, _ = module.build_optimizer(10)
    assert not {id(p) for p in tower.parameters()} & {id(p) for g in optimizer.param_groups for p in g["params"]}
    with torch.enable_grad():
        module.loss_sums(omni_assets["steps"][0][0])["loss"].backward()
    assert all(p.grad is None for p in tower.parameters())

    module = _built_module(omni_assets["model"], audio_lr=3e-4, vision_lr=5e-4, learning_rate=1e-3)
    hf = module.model.hf_model
    audio = {id(p) for p in module.adapter.audio_tower(hf).parameters()}
    vision = {id(p) for p in module.adapter.vision_tower(hf).parameters()}
    optimizer, _ = module.build_optimizer(10)
    seen = set()
    for group in optimizer.param_groups:
        kinds = {"audio" if id(p) in audio else "vision" if id(p) in vision else "lm" for p in group["params"]}
        assert len(kinds) == 1, "a group mixes towers"
        seen |= kinds
        assert group["lr"] == pytest.approx({"audio": 3e-4, "vision": 5e-4, "lm": 1e-3}[kinds.pop()])
    assert seen == {"audio", "vision", "lm"}


def test_export_round_trip_gives_the_module_logits(omni_assets, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    module = _built_module(omni_assets["model"])
    processor = AutoProcessor.from_pretrained(omni_assets["model"])
    module.export_hf(str(tmp_path / "hf"), processor=processor)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    reference = module.model.hf_model.eval()
    ids = torch.randint(10, 500, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    assert AutoProcessor.from_pretrained(tmp_path / "hf").audio_token == processor.audio_token


def test_full_omni_folder_trains_its_thinker_and_speech_parts_are_refused(omni_assets, tmp_path):
    """A full omni checkpoint ("thinker." keys beside talker / token2wav ones) loads into the thinker; asking for
    the talker is a clear error."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, Qwen2_5OmniConfig

    from veomni_lightning.errors import ConfigError
    from veomni_lightning.modules import OmniModule

    source = _built_module(omni_assets["model"])
    thinker = AutoConfig.from_pretrained(omni_assets["model"])
    full = Qwen2_5OmniConfig(thinker_config=thinker.to_dict())
    folder = tmp_path / "full"
    full.save_pretrained(folder)
    state = {f"thinker.{k}": v.contiguous() for k, v in source.model.hf_model.state_dict().items()}
    state["talker.model.embed_tokens.weight"] = torch.zeros(4, 4)
    state["token2wav.code2wav.weight"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors")

    module = OmniModule(str(folder), pretrained=True)
    module.setup_model(None, None)
    for name, tensor in source.model.hf_model.state_dict().items():
        torch.testing.assert_close(module.model.hf_model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)

    talker = tmp_path / "talker"
    full.talker_config.save_pretrained(talker)
    with pytest.raises(ConfigError, match=r"speech-generation parts \(talker, token2wav\) are not trained here"):
        OmniModule(str(talker), pretrained=False).setup_model(None, None)


# ------------------------------------------------------------------------------------------ bad rows
@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", r"rows.jsonl line 1: audio file .*missing.wav does not exist"),
        ("unreadable", r"rows.jsonl line 1: cannot read audio .*broken.wav"),
        ("too_long", r"rows.jsonl line 1: cannot read audio .*long.wav: 32.4 s is longer than .* 30 s window"),
        ("placeholder", r"rows.jsonl line 1: message 0 text holds the audio placeholder '<\|AUDIO\|>'"),
    ],
)
def test_bad_audio_rows_name_file_line_and_media(omni_assets, tmp_path, case, expected):
    import wave

    from veomni_lightning.data import OmniDataModule
    from veomni_lightning.data.sources import DataError

    (tmp_path / "broken.wav").write_bytes(b"RIFF but not a wave file")
    clip = write_speech_clip(tmp_path / "clip.wav", 0.0, 11.0)
    with wave.open(str(clip)) as src, wave.open(str(tmp_path / "long.wav"), "wb") as dst:
        dst.setparams(src.getparams())
        frames = src.readframes(src.getnframes())
        dst.writeframes(frames * 3)  # 32.4 s of real speech
    row = {
        "missing": _chat([("audio", "missing.wav")], "What?", "Nothing."),
        "unreadable": _chat([("audio", "broken.wav")], "What?", "Nothing."),
        "too_long": _chat([("audio", "long.wav")], "What?", "Nothing."),
        "placeholder": _chat([], "Listen: <|AUDIO|>", "Nothing."),
    }[case]
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row) + "\n")
    dm = OmniDataModule(train_files=str(data), processor=omni_assets["model"])
    with pytest.raises(DataError, match=expected):
        dm.setup("fit")


def test_audio_row_for_a_model_without_audio_is_refused(tmp_path):
    from veomni_lightning.data import VLMDataModule
    from veomni_lightning.data.sources import DataError

    write_speech_clip(tmp_path / "a.wav", 0.0, 1.0)
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(_chat([("audio", "a.wav")], "What?", "Words.")) + "\n")
    folder = Path(__file__).resolve().parents[1] / "configs" / "vlm" / "tiny_qwen3_vl"
    dm = VLMDataModule(train_files=str(data), processor=str(folder))
    with pytest.raises(DataError, match=r"rows.jsonl line 1: the row has audio \(.*a.wav\) but the processor has no"):
        dm.setup("fit")


def test_mfu_flops_count_the_audio_tower(omni_assets):
    from veomni_lightning.modules.metrics import count_parameters

    module = _built_module(omni_assets["model"])
    micro_batch = omni_assets["steps"][0][2]  # audio only
    no_audio = {k: v for k, v in micro_batch.items() if k not in ("input_features", "audio_lengths")}
    tower = module.adapter.audio_tower(module.model.hf_model)
    frames = sum((n - 1) // 2 + 1 for n in micro_batch["audio_lengths"])  # chunks of 20 mel frames: exact here?
    tokens = micro_batch["input_ids"].shape[-1]
    assert module.flops_per_token(micro_batch) > module.flops_per_token(no_audio)
    extra = (module.flops_per_token(micro_batch) - module.flops_per_token(no_audio)) * tokens
    assert extra == pytest.approx(6 * count_parameters(tower) * frames, rel=0.05)


@pytest.mark.timeout(300)
def test_cli_tiny_omni_config_trains_with_sp2(tmp_path):
    """The shipped tiny Qwen2.5-Omni config from the command line, over 2 processes with Ulysses SP."""
    losses = fit_from_cli(
        "configs/omni/qwen2_5_omni_tiny_cpu.yaml",
        tmp_path / "run",
        "--trainer.callbacks+=veomni_lightning.callbacks.HFExport",
    )
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    # HFExport wrote a thinker folder with the processor: plain transformers loads both.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    export = tmp_path / "run" / "version_0" / "hf"
    assert AutoProcessor.from_pretrained(export).audio_token == "<|AUDIO|>"
    assert type(AutoModelForImageTextToText.from_pretrained(export)).__name__.startswith("Qwen2_5OmniThinker")
