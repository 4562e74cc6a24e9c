"""``CausalLMModule``: train any transformers decoder (``AutoModelForCausalLM``) with FSDP2 + Ulysses SP.

One optimizer step = the list of packed micro-batches the data module yields for this data-parallel rank. The loss
back-propagated for each micro-batch is its summed token loss divided by the token count of the *global* batch
(all dp × sp ranks, all micro-batches), so gradients and the logged loss equal single-process training on the same
global batch.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from veomni_lightning.models import (
    build_model_on_meta,
    config_from_model_type,
    export_hf_folder,
    init_random_weights,
    is_model_type,
    load_config,
    load_pretrained_weights,
    materialize_model,
    resolve_model_source,
)
from veomni_lightning.models.causal_lm import CausalLMWithLoss, check_supported_causal_lm
from veomni_lightning.modules.metrics import ThroughputMeter, count_parameters, device_peak_tflops, flops_per_token
from veomni_lightning.parallel.attention import packed_attention_kwargs
from veomni_lightning.parallel.dims import ParallelMesh
from veomni_lightning.parallel.fsdp import FSDPConfig, parallelize_model
from veomni_lightning.parallel.sequence import shard_packed_batch

__all__ = ["CausalLMModule"]


class CausalLMModule(pl.LightningModule):
    """Causal-LM pre-training / SFT for any HF decoder, random init from a config or pretrained weights.

    Args:
        model: local HF folder, ``package:<pkg>/<file.gguf>``, a ``.gguf`` path, a hub id (needs network), or, with
            ``pretrained=False``, a transformers model type such as ``qwen3`` (shape from ``config_overrides``).
        gguf_file: GGUF file name inside ``model`` when ``model`` is a folder.
        pretrained: load the weights (True) or random-init from the config (False).
        config_overrides: config fields to change before building (e.g. a tiny ``num_hidden_layers``).
        attn_implementation: an attention registered in transformers; ``ulysses`` (packed varlen + SP) by default.
        learning_rate, weight_decay, betas, eps: AdamW (fused on CUDA); no decay on 1-D parameters.
        warmup_steps: linear warm-up steps; then cosine decay to ``min_lr_ratio × learning_rate`` at the last step.
        max_grad_norm: clip the global gradient norm (None: only measure it).
        init_seed: seed of random init (same weights whatever the parallel layout).
        ce_chunk_size: tokens per chunk in the fused cross-entropy (peak extra memory: one chunk × vocab logits).
        compile_blocks: ``torch.compile`` every transformer block (fuses norms, RoPE, SwiGLU and residual adds;
            attention stays eager). Costs compile time at the first steps; see ``bench/results`` for its gain.
        peak_tflops: the device's dense peak for MFU (default: known GPUs; MFU not logged otherwise).
    """

    def __init__(
        self,
        model: str,
        gguf_file: str | None = None,
        pretrained: bool = True,
        config_overrides: dict[str, Any] | None = None,
        attn_implementation: str = "ulysses",
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        max_grad_norm: float | None = 1.0,
        init_seed: int = 0,
        ce_chunk_size: int = 4096,
        compile_blocks: bool = False,
        peak_tflops: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model: CausalLMWithLoss | None = None
        self.parallel_mesh: ParallelMesh | None = None
        # Where activations and collectives live (also under Fabric, which never calls module.to(), and with CPU
        # offload, where the parameters themselves stay in CPU memory).
        self.compute_device = torch.device("cpu")
        self._source = None
        self._meter: ThroughputMeter | None = None
        self._flops_per_token: float | None = None
        self._val_sums: list[torch.Tensor] = []

    # ------------------------------------------------------------------ model construction
    def configure_model(self) -> None:
        """Lightning hook: build the model on meta, parallelise it with the strategy's mesh, load the weights."""
        if self.model is not None:
            return
        strategy = self.trainer.strategy
        self.parallelize(getattr(strategy, "parallel_mesh", None), getattr(strategy, "fsdp_config", None))

    def parallelize(self, parallel_mesh: ParallelMesh | None, fsdp_config: FSDPConfig | None) -> None:
        """Build, shard and load the model (also the entry point for Fabric's ``VeOmniFabricStrategy``)."""
        hp = self.hparams
        if not hp.pretrained and is_model_type(hp.model):
            config = config_from_model_type(hp.model, overrides=hp.config_overrides)
        else:
            self._source = resolve_model_source(hp.model, gguf_file=hp.gguf_file)
            config = load_config(self._source, overrides=hp.config_overrides)
        check_supported_causal_lm(config)
        if parallel_mesh is not None:
            text = getattr(config, "text_config", config)
            heads = text.num_attention_heads
            parallel_mesh.dims.validate_attention(heads, getattr(text, "num_key_value_heads", None) or heads)
        hf_model = build_model_on_meta(config, attn_implementation=hp.attn_implementation, dtype=torch.float32)
        root = CausalLMWithLoss(hf_model, ce_chunk_size=hp.ce_chunk_size)
        parallelize_model(
            hf_model,
            root,
            parallel_mesh.fsdp_mesh if parallel_mesh is not None else None,
            fsdp_config or FSDPConfig(),
            compile_blocks=hp.compile_blocks,
        )
        offload = parallel_mesh is not None and fsdp_config is not None and fsdp_config.cpu_offload
        self.compute_device = _local_device(parallel_mesh)
        # With CPU offload FSDP2 keeps the sharded parameters (and so the optimizer state) in CPU memory.
        materialize_model(hf_model, torch.device("cpu") if offload else self.compute_device)
        if hp.pretrained:
            if not self._source.has_weights:
                raise ValueError(
                    f"{hp.model!r} has a config but no safetensors weights. Point model at a folder with weights, or "
                    "set pretrained=false to train from a random init."
                )
            load_pretrained_weights(hf_model, self._source)
        else:
            init_random_weights(hf_model, seed=hp.init_seed)
        self.model = root
        self.parallel_mesh = parallel_mesh

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """Lightning hook: :meth:`build_optimizer` over the Trainer's total number of steps."""
        optimizer, scheduler = self.build_optimizer(self._total_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def build_optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW without decay on 1-D parameters, and linear warm-up then cosine decay over ``total_steps``.

        Shared by ``configure_optimizers`` (Trainer) and Fabric loops, which pass their own step count.
        """
        hp = self.hparams
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = next(self.model.parameters()).device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps, fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            functools.partial(
                warmup_cosine, warmup_steps=hp.warmup_steps, total_steps=total_steps, min_ratio=hp.min_lr_ratio
            ),
        )
        return optimizer, scheduler

    def _total_steps(self) -> int:
        trainer = self._trainer
        if trainer is None:
            return 0
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        steps = trainer.estimated_stepping_batches
        return int(steps) if math.isfinite(steps) else 0

    # ------------------------------------------------------------------ steps
    def loss_sum(self, micro_batch: dict[str, Any]) -> torch.Tensor:
        """Summed token loss of this rank's share of one packed micro-batch (SP slicing happens here, visibly)."""
        mesh = self.parallel_mesh
        sp_rank, sp_size = (mesh.sp_rank, mesh.sp_size) if mesh is not None else (0, 1)
        local = shard_packed_batch(micro_batch, sp_rank, sp_size)
        attention_kwargs = packed_attention_kwargs(
            local["cu_seqlens"], local["max_seqlen"], mesh.sp_group if mesh is not None else None
        )
        return self.model(
            input_ids=local["input_ids"], labels=local["labels"], position_ids=local["position_ids"], **attention_kwargs
        )

    def global_token_count(self, step_batch: list[dict[str, Any]]) -> torch.Tensor:
        """Loss tokens of the whole global batch: sum over micro-batches and the data-parallel group.

        SP ranks hold the same micro-batches, so the count is reduced over ``dp`` only, never ``dp × sp``.
        """
        local = sum(int(mb["num_loss_tokens"]) for mb in step_batch)
        # torch.full launches a fill kernel; torch.tensor would copy from host and wait for the GPU queue.
        count = torch.full((), float(local), device=self.compute_device, dtype=torch.float64)
        if self.parallel_mesh is not None and self.parallel_mesh.dp_size > 1:
            dist.all_reduce(count, group=self.parallel_mesh["dp"].get_group())
        return count.clamp_min(1.0)

    def global_mean_loss(self, loss_sum: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        """Token-mean loss of the global batch from this rank's summed loss (reduced over dp × sp; for logging)."""
        loss_sum = loss_sum.detach().to(torch.float64)
        if self.parallel_mesh is not None and dist.get_world_size(self.parallel_mesh.loss_group) > 1:
            dist.all_reduce(loss_sum, group=self.parallel_mesh.loss_group)
        return (loss_sum / n_tokens).float()

    def training_step(self, step_batch: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches (gradient accumulation inside the step)."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        n_tokens = self.global_token_count(step_batch)
        accumulated = torch.zeros((), device=self.compute_device, dtype=torch.float32)
        for micro_batch in step_batch:
            loss_sum = self.loss_sum(micro_batch)
            self.manual_backward(loss_sum / n_tokens.to(loss_sum.dtype))
            accumulated = accumulated + loss_sum.detach()
        grad_norm = clip_grad_norm(self.model.parameters(), self.hparams.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss = self.global_mean_loss(accumulated, n_tokens)
        self._log_step(loss, grad_norm, step_batch)
        return loss

    def _log_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, step_batch: list[dict[str, Any]]) -> None:
        # Metrics are logged on logging steps only: Lightning turns every logged progress-bar tensor into a Python
        # number at each step, a host-device sync that would leave the GPU idle while the next step is launched.
        log_every = max(1, getattr(self.trainer, "log_every_n_steps", 1))
        on_log_step = self.trainer.global_step % log_every == 0
        if on_log_step:
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/grad_norm", grad_norm)
            self.log("train/lr", self.lr_schedulers().get_last_lr()[0], prog_bar=True)
        if self._meter is None:
            self._meter = ThroughputMeter(self.compute_device)
            n_params = count_parameters(self.model)
            self._flops_per_token = flops_per_token(
                self.model.hf_model.config, n_params, step_batch[0]["input_ids"].shape[-1]
            )
        sp = self.parallel_mesh.sp_size if self.parallel_mesh is not None else 1
        self._meter.add(sum(mb["input_ids"].numel() for mb in step_batch) // sp)
        if on_log_step:
            rate = self._meter.read()
            if rate is not None:
                self.log("train/tokens_per_s_per_device", rate, prog_bar=True)
                peak = self.hparams.peak_tflops or device_peak_tflops(self.compute_device)
                if peak:
                    self.log("train/mfu", self._flops_per_token * rate / (peak * 1e12))
            if self.compute_device.type == "cuda":
                self.log("train/peak_memory_gib", torch.cuda.max_memory_allocated(self.compute_device) / 2**30)

    def validation_step(self, step_batch: list[dict[str, Any]], batch_idx: int) -> None:
        """Accumulate summed loss and token count; the token mean is reduced and logged at epoch end."""
        loss_sum = sum(self.loss_sum(mb).detach().double() for mb in step_batch)
        tokens = float(sum(int(mb["num_loss_tokens"]) for mb in step_batch))
        self._val_sums.append(
            torch.stack([loss_sum, torch.full((), tokens, device=self.compute_device, dtype=torch.float64)])
        )

    def on_validation_epoch_end(self) -> None:
        sums = (
            torch.stack(self._val_sums).sum(0)
            if self._val_sums
            else torch.zeros(2, device=self.compute_device, dtype=torch.float64)
        )
        self._val_sums.clear()
        if self.parallel_mesh is not None and dist.get_world_size(self.parallel_mesh.loss_group) > 1:
            # Token counts are replicated across SP ranks: reduce loss over dp × sp, tokens over dp.
            loss_sum, tokens = sums[0:1].clone(), sums[1:2].clone()
            dist.all_reduce(loss_sum, group=self.parallel_mesh.loss_group)
            if self.parallel_mesh.dp_size > 1:
                dist.all_reduce(tokens, group=self.parallel_mesh["dp"].get_group())
            sums = torch.cat([loss_sum, tokens])
        self.log("val/loss", (sums[0] / sums[1].clamp_min(1.0)).float(), prog_bar=True, sync_dist=False)

    # ------------------------------------------------------------------ export
    def export_hf(self, out_dir: str, tokenizer: Any | None = None) -> None:
        """Write a folder plain ``AutoModelForCausalLM.from_pretrained`` loads (collective: call on every rank)."""
        if self.model is None:
            raise RuntimeError("The model is built in configure_model(); nothing to export yet.")
        export_hf_folder(self.model.hf_model, out_dir, tokenizer=tokenizer)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_grad_norm(parameters, max_norm: float | None) -> torch.Tensor:
    """Global gradient norm over all (sharded) parameters, clipping to ``max_norm`` when given.

    With FSDP2 the gradients are DTensors sharded over the FSDP mesh; the norm is reduced over that mesh so every
    rank gets the norm of the full gradient.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm is not None and grads:
        # torch.nn.utils.clip_grads_with_norm_'s arithmetic on the local shards: one foreach kernel, no DTensor
        # dispatch per parameter, no host sync (the coefficient stays on the device).
        with torch.no_grad():
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
            torch._foreach_mul_(local, coef.to(local[0].device))
    return total


def _local_device(parallel_mesh: ParallelMesh | None) -> torch.device:
    if torch.cuda.is_available() and (parallel_mesh is None or parallel_mesh.device_type == "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
