"""``DiTModule``: train a diffusers text-to-video transformer (Wan2.1) with FSDP2 + Ulysses SP, flow matching.

A family module on :class:`~veomni_lightning.modules.base.TrainingModule`. The model is a standard diffusers Wan
folder (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), read without conversion:
the transformer is built on meta and sharded (FSDP blocks: ``WanTransformerBlock``), its weights streamed in or
randomly initialised; the condition model (UMT5 text encoder, Wan VAE) is frozen, unsharded, and encodes each clip
and prompt on the fly (:class:`~veomni_lightning.models.diffusion.ConditionModel`). One named loss, ``loss``: the
mean over the global batch's clips of each clip's mean squared velocity error. The export is a transformer folder
``WanTransformer3DModel.from_pretrained`` loads and ``WanPipeline`` takes unchanged. Data:
:class:`~veomni_lightning.data.DiTDataModule`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from veomni_lightning.data.latent_cache import LatentCache
from veomni_lightning.errors import ConfigError
from veomni_lightning.models import DiffusersAdapter
from veomni_lightning.models.diffusion import ConditionModel, DiTWithLoss, FlowMatching, latent_tokens
from veomni_lightning.models.loading import params_on_meta
from veomni_lightning.models.source import resolve_hub, run_on_rank0_then_share
from veomni_lightning.modules.base import Backbone, TrainingModule
from veomni_lightning.parallel.diffusion import split_wan_transformer
from veomni_lightning.paths import resolve_path

__all__ = ["DiTModule"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class DiTModule(TrainingModule):
    """Text-to-video flow-matching training of a Wan transformer.

    Args:
        model: a diffusers Wan folder (``transformer/``, ``vae/``, ``text_encoder/``, ...).
        pretrained: load ``transformer/``'s weights (True) or random-init it from its config (False); the text
            encoder and the VAE are always loaded with their weights.
        config_overrides: transformer config fields to change before building (e.g. ``num_layers``).
        flow_shift: the timestep shift of the flow-matching schedule (Wan2.1: 3.0 at 480p, 5.0 at 720p).
        timestep_sampling: ``logit_normal`` or ``uniform`` noise levels before the shift.
        logit_mean: mean of the logit-normal.
        logit_std: standard deviation of the logit-normal.
        **training: the training core's settings (see :class:`~veomni_lightning.modules.base.TrainingModule`).
    """

    def __init__(
        self,
        model: str,
        *,
        pretrained: bool = True,
        config_overrides: dict[str, Any] | None = None,
        flow_shift: float = 3.0,
        timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        **training: Any,
    ) -> None:
        super().__init__(**training)
        if not flow_shift > 0:
            raise ConfigError(f"flow_shift must be a positive number, got {flow_shift!r}.")
        self.schedule = FlowMatching(flow_shift, timestep_sampling, logit_mean, logit_std)
        self.condition: ConditionModel | None = None  # a plain holder: not a submodule, not in checkpoints
        self._root: Path | None = None

    def _folder(self, part: str) -> Path:
        if self._root is None:  # a local folder, a package: path, or a hub id (downloaded once, rank 0 first)
            self._root = Path(resolve_model_source_folder(self.hparams.model))
        folder = self._root / part
        if part not in ("", "tokenizer") and not (folder / "config.json").is_file():
            raise ConfigError(
                f"{folder} has no config.json. Fix: point model at a diffusers Wan folder (transformer/, vae/, "
                "text_encoder/, tokenizer/, scheduler/)."
            )
        return folder

    def build_model(self) -> tuple[nn.Module, list[Backbone]]:
        from diffusers import WanTransformer3DModel

        hp = self.hparams
        folder = self._folder("transformer")
        config = dict(WanTransformer3DModel.load_config(folder))
        unknown = sorted(set(hp.config_overrides or {}) - set(config))
        if unknown:
            raise ConfigError(f"config_overrides {unknown}: WanTransformer3DModel has no such settings.")
        config.update(hp.config_overrides or {})
        heads = config["num_attention_heads"]
        if heads % self.parallel_mesh.sp_size:
            raise ConfigError(f"sp_size={self.parallel_mesh.sp_size} does not divide the transformer's {heads} heads.")
        with params_on_meta():
            transformer = WanTransformer3DModel.from_config(config)
        split_wan_transformer(transformer, self.parallel_mesh.sp_group)
        weights = str(folder) if hp.pretrained else None
        return DiTWithLoss(transformer, self.schedule), [Backbone(transformer, DiffusersAdapter(), weights)]

    def condition_model(self) -> ConditionModel:
        """The frozen text encoder and VAE, loaded on first use (a run reading a latent cache never loads them)."""
        if self.condition is not None:
            return self.condition
        import transformers
        from diffusers import AutoencoderKLWan

        dtype = _DTYPES[self.parallel_config.param_dtype]
        folder = self._folder("text_encoder")
        # The class the folder names (Wan: UMT5EncoderModel; AutoModel would build the encoder-decoder).
        architecture = (transformers.AutoConfig.from_pretrained(folder).architectures or ["AutoModel"])[0]
        text = getattr(transformers, architecture).from_pretrained(folder, dtype=dtype)
        vae = AutoencoderKLWan.from_pretrained(self._folder("vae"), torch_dtype=torch.float32)
        for part in (text, vae):
            part.requires_grad_(False).eval().to(self.compute_device)
        self.condition = ConditionModel(text_encoder=text, vae=vae)
        return self.condition

    # ================================================================== latent cache
    def on_fit_start(self) -> None:
        """Fill and attach the data module's latent cache when it names one (before the first batch is read)."""
        data = getattr(self.trainer, "datamodule", None)
        if getattr(data, "latent_cache", None):
            self.fill_latent_cache(data)

    def fill_latent_cache(self, data: Any) -> LatentCache:
        """Encode the rows the cache lacks with the frozen condition model, each rank its shards, then attach the
        cache to ``data`` (a :class:`~veomni_lightning.data.DiTDataModule`). Collective when distributed."""
        if not data.rows:
            data.setup("fit")
        fingerprint = {**data.cache_fingerprint(), "model": str(self._folder(""))}
        cache = LatentCache(data.latent_cache, fingerprint, len(data.rows), data.rows_per_shard)
        run_on_rank0_then_share(lambda: cache.check_manifest(create=True), "checking the latent cache")
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

        def encode_row(row: int) -> tuple[torch.Tensor, torch.Tensor]:
            raw = {k: v.to(self.compute_device) for k, v in data.raw_row(row).items()}
            latents, text = self.conditioning(raw)
            return latents[0], text[0]

        failure: BaseException | None = None
        try:
            cache.fill(encode_row, rank, world)
        except Exception as error:  # reported on every rank below, so none waits for a rank that failed
            failure = error
        if distributed:
            flag = torch.tensor([failure is not None], dtype=torch.float32, device=self.compute_device)
            dist.all_reduce(flag)
            if failure is None and flag.item():
                raise RuntimeError("filling the latent cache failed on another rank (its error is in its log).")
        if failure is not None:
            raise failure
        data.cache = cache
        return cache

    def loss_counts(self, micro_batch: dict[str, Any]) -> dict[str, float]:
        return {"loss": 1}  # one clip: the global loss is the mean of the clips' mean squared errors

    def conditioning(self, micro_batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents, text embeddings)`` of a micro-batch: read from a latent cache, or encoded now."""
        if "latents" in micro_batch:
            return micro_batch["latents"], micro_batch["text_embeds"]
        condition = self.condition_model()
        text = condition.encode_prompt(micro_batch["input_ids"], micro_batch["attention_mask"])
        return condition.encode_video(micro_batch["pixels"]), text

    def loss_sums(self, micro_batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        latents, text = self.conditioning(micro_batch)
        return {"loss": self.model(latents, text, int(micro_batch["sample_seed"]), self.parallel_mesh.sp_size)}

    def tokens_in(self, micro_batch: dict[str, Any]) -> int:
        """Latent tokens of the clip (after patchifying), for tokens/s."""
        if "latents" in micro_batch:
            shape = tuple(micro_batch["latents"].shape)
        else:
            vae = self.condition_model().vae.config
            _, _, frames, height, width = micro_batch["pixels"].shape
            time, space = vae.get("scale_factor_temporal", 4), vae.get("scale_factor_spatial", 8)
            shape = (1, 1, 1 + (frames - 1) // time, height // space, width // space)
        return latent_tokens(shape, self.model.transformer.config.patch_size)


def resolve_model_source_folder(model: str) -> str:
    """A local folder for ``model``: a folder, a ``package:`` path, or a hub id (a diffusers folder has no
    top-level ``config.json``, so hub ids are fetched whole)."""
    path = Path(resolve_path(model)) if model.startswith("package:") else Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if model.startswith(("/", ".", "~", "package:")):
        raise ConfigError(f"model {model!r} is not a folder. Fix: a diffusers Wan folder or a hub id.")
    return resolve_hub(model, None).folder
