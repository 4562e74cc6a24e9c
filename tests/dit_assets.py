"""Offline DiT test assets: a tiny diffusers Wan folder (random weights for the VAE and the UMT5 text encoder, the
transformer as a config, a BPE tokenizer trained on real text, a flow-matching scheduler) and rows on real clips
and pictures that ship in wheels."""

from __future__ import annotations

from pathlib import Path

TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                   text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", rope_max_seq_len=1024)  # fmt: skip
TEXT_LENGTH = 32


def save_tiny_wan_folder(folder: Path, text_file: Path, transformer_weights: bool = False) -> Path:
    """A diffusers Wan folder: ``transformer/`` (config; weights too if asked), ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``scheduler/``."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel
    from vlm_assets import train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer(text_file, vocab_size=500)
    tokenizer.save_pretrained(folder / "tokenizer")
    UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder / "text_encoder")  # fmt: skip
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                     latents_std=[1.5, 0.8, 1.0, 2.0]).save_pretrained(folder / "vae")  # fmt: skip
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    transformer = WanTransformer3DModel(**TRANSFORMER)
    if transformer_weights:
        transformer.save_pretrained(folder / "transformer")
    else:
        transformer.save_config(folder / "transformer")
    return folder
