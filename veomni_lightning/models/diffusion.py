"""Flow-matching training of a diffusers video DiT (Wan) with a frozen condition model (text encoder + VAE).

``FlowMatching`` draws a sample's noise level and noise from its seed, the way Wan trains: ``u`` uniform or
logit-normal, shifted ``σ = s·u / (1 + (s − 1)·u)``, timestep ``1000·σ``; ``x_σ = (1 − σ)·x₀ + σ·ε``; the target is
the velocity ``ε − x₀``. ``ConditionModel`` turns pixels and prompt tokens into normalised VAE latents and text
embeddings exactly as ``WanPipeline`` prepares them (embeddings of the real tokens, zero-padded). ``DiTWithLoss``
is the FSDP root: one clip per call, the transformer's prediction, the clip's mean squared error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["ConditionModel", "DiTWithLoss", "FlowMatching"]


@dataclass(frozen=True)
class FlowMatching:
    """Wan's flow-matching training schedule.

    Args:
        shift: the timestep shift ``s`` (Wan2.1: 3.0 at 480p, 5.0 at 720p).
        sampling: ``logit_normal`` (``u = sigmoid(N(mean, std))``) or ``uniform``.
        logit_mean: mean of the logit-normal.
        logit_std: standard deviation of the logit-normal.
    """

    shift: float = 3.0
    sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def draw(self, seed: int, latent_shape: tuple[int, ...]) -> tuple[float, torch.Tensor]:
        """``(σ, ε)`` of the sample with ``seed``, on the CPU: identical on every rank, layout and data mode."""
        generator = torch.Generator().manual_seed(seed)
        if self.sampling == "uniform":
            u = torch.rand((), generator=generator, dtype=torch.float64)
        else:
            u = torch.sigmoid(
                torch.randn((), generator=generator, dtype=torch.float64) * self.logit_std + self.logit_mean
            )
        sigma = float(self.shift * u / (1 + (self.shift - 1) * u))
        return sigma, torch.randn(latent_shape, generator=generator, dtype=torch.float32)


@dataclass
class ConditionModel:
    """The frozen models that make the transformer's inputs: a T5-style text encoder and a Wan VAE.

    Not part of the trained module (not sharded, not saved in checkpoints); every rank holds a copy.
    """

    text_encoder: nn.Module
    vae: nn.Module

    @torch.no_grad()
    def encode_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` text embeddings: the real tokens' embeddings, zeros after them (``WanPipeline``'s form)."""
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden * attention_mask[..., None].to(hidden.dtype)

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, z, 1 + (F−1)/4, H/8, W/8]`` of pixels in ``[-1, 1]`` (the posterior's mode)."""
        vae = self.vae
        dtype = next(vae.parameters()).dtype
        latents = vae.encode(pixels.to(dtype)).latent_dist.mode().float()
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        return (latents - mean) / std


class DiTWithLoss(nn.Module):
    """The transformer and the flow-matching loss of one clip; returns this rank's share of the clip's mean squared
    error (under SP every rank computes the gathered prediction, so each returns ``1/sp`` of it).

    Args:
        transformer: a diffusers ``WanTransformer3DModel``.
        schedule: the noise-level schedule.
    """

    def __init__(self, transformer: nn.Module, schedule: FlowMatching) -> None:
        super().__init__()
        self.transformer = transformer
        self.schedule = schedule

    def forward(self, latents: torch.Tensor, text: torch.Tensor, seed: int, sp_size: int) -> torch.Tensor:
        sigma, noise = self.schedule.draw(seed, tuple(latents.shape))
        noise = noise.to(latents.device)
        noisy = (1.0 - sigma) * latents + sigma * noise
        dtype = self.transformer.proj_out.weight.dtype
        timestep = torch.full((latents.shape[0],), 1000.0 * sigma, device=latents.device)
        prediction = self.transformer(hidden_states=noisy.to(dtype), timestep=timestep,
                                      encoder_hidden_states=text.to(dtype), return_dict=False)[0]  # fmt: skip
        target = noise - latents
        return (prediction.float() - target).pow(2).mean() / sp_size


def latent_tokens(latent_shape: tuple[int, ...], patch_size: Any) -> int:
    """Tokens the transformer sees for latents of ``latent_shape`` ``[B, C, F, H, W]`` (after patchifying)."""
    p_t, p_h, p_w = patch_size
    _, _, frames, height, width = latent_shape
    return frames // p_t * (height // p_h) * (width // p_w)
