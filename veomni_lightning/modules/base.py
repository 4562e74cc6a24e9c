"""``TrainingModule``: the one training core that every model family (text, MoE, VLM, Omni, DiT) plugs into.

It owns, once: building the model (on meta → parallelised with the strategy's mesh → materialised → pretrained
weights streamed in, or a layout-independent random init), the optimizer and schedule, the training step (gradient
accumulation over micro-batches, named losses reduced as (sum, count) pairs, clipping, logging), validation and
export. A family module supplies only:

* :meth:`~TrainingModule.build_model`: its trained module built on the meta device, and the library models
  (:class:`Backbone`) inside it with their adapters and weight folders;
* :meth:`~TrainingModule.loss_counts` and :meth:`~TrainingModule.loss_sums`: for each named loss (the keys of
  ``loss_weights``), the number of items it averages over (from the data) and this rank's summed loss;
* :meth:`~TrainingModule.flops_per_token` (for MFU), and, for encoders some ranks have no input for, a dummy forward
  inside ``loss_sums`` (run the encoder on a tiny input and add ``0 × output``, so FSDP's collectives match).

The arithmetic (why parallel equals serial): the step's objective is ``Σ_k w_k · S_k / N_k``, with ``S_k`` the sum of
loss ``k`` over the whole global batch and ``N_k`` its global count. ``N_k`` is known from the data before the first
backward (counts are summed over the ``batch`` view: SP ranks share micro-batches), so every rank back-propagates its
own share ``w_k · s_k / N_k`` per micro-batch; FSDP sums the gradients over dp × sp (``parallel/fsdp.py``), which gives
the single-process gradient. The logged losses are the sums reduced over the ``loss`` view divided by the counts.
That is also why a count is not returned by the forward: the divisor must be known before the first backward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from veomni_lightning.errors import ConfigError
from veomni_lightning.models import ModelAdapter, materialize_model
from veomni_lightning.models.lora import (
    add_lora,
    init_lora_weights,
    load_peft_adapter,
    lora_config,
    merge_lora,
)
from veomni_lightning.modules.metrics import ThroughputMeter, device_peak_tflops
from veomni_lightning.parallel import ParallelConfig, ParallelMesh, all_reduce_sum, clip_grad_norm, parallelize_model
from veomni_lightning.parallel.checkpointing import selective_checkpoint_context
from veomni_lightning.parallel.reductions import split_groups

__all__ = ["Backbone", "StepResult", "TrainingModule", "warmup_cosine"]


@dataclass
class Backbone:
    """A library model inside the trained module: its adapter, and the folder its weights stream from.

    ``weights=None`` means a random init (seeded, identical whatever the parallel layout).
    """

    module: nn.Module
    adapter: ModelAdapter
    weights: str | None = None


class StepResult(NamedTuple):
    """What one optimizer step returns; tensors stay on the device (reading them syncs)."""

    loss: torch.Tensor  # the weighted objective Σ w_k · mean_k over the global batch
    losses: dict[str, torch.Tensor]  # each named loss's global mean
    grad_norm: torch.Tensor  # before clipping
    tokens: int  # sequence positions this rank processed (host count, for throughput)
    lr: float  # the learning rate this step applied (of the first parameter group)


class TrainingModule(pl.LightningModule):
    """Base LightningModule: build → parallelise → load, optimizer and schedule, the step, validation, export.

    Family modules subclass it and pass these keyword-only settings through ``**kwargs``:

    Args:
        learning_rate: AdamW's peak learning rate (reached after ``warmup_steps``).
        weight_decay: AdamW's decoupled weight decay; 1-D parameters (norms, biases) get none (see
            :meth:`param_groups`).
        betas: AdamW's moment coefficients.
        eps: AdamW's epsilon.
        warmup_steps: linear warm-up steps; then cosine decay to ``min_lr_ratio × learning_rate`` at the last step
            (``min_lr_ratio=1`` keeps the rate constant after warm-up).
        max_grad_norm: clip the global gradient norm (None: only measure it).
        init_seed: seed of random init (same weights whatever the parallel layout).
        loss_weights: weight of each named loss in the objective (default: the family's ``default_loss_weights``).
        peak_tflops: the device's dense peak for MFU (default: known GPUs; MFU not logged otherwise).
        lora: train LoRA adapters (PEFT) instead of the full model: ``{r: 16, alpha: 32, target_modules:
            all-linear}`` (also ``dropout``, ``exclude_modules``; ``adapter: <folder>`` continues training a PEFT
            adapter folder). The base weights are frozen, stored in the compute dtype and left out of the optimizer;
            checkpoints hold the adapters and their optimizer state only. See ``models/lora.py``.
    """

    #: The named losses a family returns, and their default weights in the objective.
    default_loss_weights: Mapping[str, float] = {"loss": 1.0}

    def __init__(
        self,
        *,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        max_grad_norm: float | None = 1.0,
        init_seed: int = 0,
        loss_weights: dict[str, float] | None = None,
        peak_tflops: float | None = None,
        lora: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if lora is not None:
            lora_config(lora)  # a bad option fails here, before any process group or model exists
            # Checkpoints hold the adapters only (see checkpoints_trainable_only); a full-file one loads non-strictly.
            self.strict_loading = False
        check_training_settings(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            betas=betas,
            eps=eps,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            max_grad_norm=max_grad_norm,
            peak_tflops=peak_tflops,
        )
        self.save_hyperparameters()
        self.automatic_optimization = False
        weights = dict(self.default_loss_weights)
        unknown = sorted(set(loss_weights or {}) - set(weights))
        if unknown:
            raise ConfigError(
                f"loss_weights names {unknown}, but {type(self).__name__}'s losses are {sorted(weights)}."
            )
        bad = {name: w for name, w in (loss_weights or {}).items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise ConfigError(f"loss_weights must be finite and >= 0, got {bad}.")
        weights.update(loss_weights or {})
        self.loss_weights = weights
        self.model: nn.Module | None = None
        self.backbones: list[Backbone] = []
        self.experts: list[nn.Module] = []  # the MoE experts modules (split over ep ranks under EP)
        self.parallel_mesh: ParallelMesh | None = None
        self.parallel_config = ParallelConfig()
        # Where activations and collectives live (also under Fabric, which never calls module.to(), and with CPU
        # offload, where the parameters themselves stay in CPU memory).
        self.compute_device = torch.device("cpu")
        self._meter: ThroughputMeter | None = None
        self._flops_per_token: float | None = None
        self._val_sums: list[torch.Tensor] = []

    def add_loss(self, name: str, weight: float) -> None:
        """Declare a named loss that only exists for some models (call in :meth:`build_model`), e.g. the balancing
        loss of a model that turns out to have experts. It is logged as ``train/<name>`` like the others."""
        if name in self.loss_weights:
            raise ValueError(f"{type(self).__name__} already has a loss named {name!r}.")
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"the weight of loss {name!r} must be finite and >= 0, got {weight}.")
        self.loss_weights = {**self.loss_weights, name: float(weight)}

    # ================================================================== what a family supplies
    def build_model(self) -> tuple[nn.Module, list[Backbone]]:
        """Build the trained module with parameters on the meta device; return it and the library models inside it.

        ``self.parallel_mesh`` is set: validate sizes against it here (before any collective), e.g. attention
        heads against ``sp``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement build_model()")

    def loss_counts(self, micro_batch: dict[str, Any]) -> dict[str, float]:
        """Items each named loss averages over in this micro-batch, from the data (host numbers, no sync)."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss_counts()")

    def loss_sums(self, micro_batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """This rank's summed loss of each named loss for one micro-batch (SP ranks: their slice only)."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss_sums()")

    def flops_per_token(self, micro_batch: dict[str, Any]) -> float | None:
        """Training FLOPs per token for MFU (None: MFU is not logged)."""
        return None

    def tokens_in(self, micro_batch: dict[str, Any]) -> int:
        """Sequence positions in a micro-batch (before SP slicing), for tokens/s."""
        return int(micro_batch["input_ids"].numel())

    def blocks(self, backbone: Backbone) -> list[nn.Module]:
        """The blocks of a backbone that FSDP shards, checkpointing recomputes and compile compiles."""
        return backbone.adapter.blocks(backbone.module)

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups. Override to give an encoder or the experts their own ``lr`` (absolute; the
        schedule scales every group alike) or leave parameters out (frozen: also set ``requires_grad_(False)``).

        Default: weight decay on trainable ≥2-D parameters, none on the rest.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]

    # ================================================================== build → parallelise → load
    def configure_model(self) -> None:
        """Lightning hook: :meth:`setup_model` with the strategy's mesh and parallel config."""
        if self.model is not None:
            return
        strategy = self.trainer.strategy
        mesh = getattr(strategy, "parallel_mesh", None)
        config = getattr(strategy, "parallel_config", None)
        self.setup_model(mesh, config)

    def setup_model(self, mesh: ParallelMesh | None, config: ParallelConfig | None) -> None:
        """Build on meta, parallelise, materialise, load weights (the entry point for Fabric's strategy too)."""
        self.parallel_config = config or ParallelConfig(param_dtype="fp32")
        self.compute_device = _local_device(mesh)
        self.parallel_mesh = mesh or ParallelMesh.single_process(self.compute_device.type)
        root, backbones = self.build_model()
        if self.hparams.get("lora") is not None:
            # Inside the blocks, before FSDP2 wraps them: SP, EP and the sharding apply to the adapters unchanged.
            frozen_dtype = self.parallel_config.mixed_precision().param_dtype
            self.lora_configs = [add_lora(b.module, self.hparams.lora, frozen_dtype) for b in backbones]
        per_backbone = [(b, self.blocks(b)) for b in backbones]

        selective = self.parallel_config.checkpoint_policy == "selective"
        context_fn = selective_checkpoint_context if selective else None

        def enable_checkpointing(chosen: list[nn.Module]) -> None:
            ids = {id(block) for block in chosen}
            for backbone, blocks in per_backbone:
                mine = [block for block in blocks if id(block) in ids]
                if mine:
                    backbone.adapter.enable_checkpointing(backbone.module, mine, context_fn=context_fn)

        all_blocks = [block for _, blocks in per_backbone for block in blocks]
        experts = [m for b in backbones for m in b.adapter.experts(b.module)]
        check_expert_layout(experts, self.parallel_mesh.dims.ep)
        parallelize_model(
            root,
            all_blocks,
            self.parallel_mesh.fsdp_mesh,
            self.parallel_config,
            enable_checkpointing,
            experts=experts,
            ep_mesh=self.parallel_mesh.view("ep"),
            efsdp_mesh=self.parallel_mesh.view("efsdp"),
        )
        # With CPU offload FSDP2 keeps the sharded parameters (and so the optimizer state) in CPU memory.
        offload = self.parallel_mesh.fsdp_mesh is not None and self.parallel_config.cpu_offload
        materialize_model(root, torch.device("cpu") if offload else self.compute_device)
        for i, backbone in enumerate(backbones):
            if backbone.weights is not None:
                backbone.adapter.load_weights(backbone.module, backbone.weights)
            else:
                backbone.adapter.init_random_weights(backbone.module, seed=self.hparams.init_seed + i)
            if self.hparams.get("lora") is not None:
                init_lora_weights(backbone.module, seed=self.hparams.init_seed + i)
                if self.hparams.lora.get("adapter") is not None:
                    load_peft_adapter(backbone.module, self.hparams.lora["adapter"])
        self.model, self.backbones, self.experts = root, backbones, experts

    # ================================================================== optimizer and schedule
    def configure_optimizers(self) -> dict[str, Any]:
        """Lightning hook: :meth:`build_optimizer` over the Trainer's total number of steps."""
        optimizer, scheduler = self.build_optimizer(self._total_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def build_optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW over :meth:`param_groups`, and linear warm-up then cosine decay over ``total_steps``.

        Shared by ``configure_optimizers`` (Trainer) and Fabric loops, which pass their own step count.
        """
        hp = self.hparams
        if hp.min_lr_ratio < 1.0 and total_steps <= 0:
            raise ValueError(
                "The cosine schedule needs the number of steps, but it is unknown (an endless data stream and no "
                "max_steps). Fix: set trainer.max_steps (the schedule ends there), or min_lr_ratio=1.0 for a constant "
                "learning rate after warm-up."
            )
        fused = next(self.model.parameters()).device.type == "cuda"
        expert_params = {id(p) for module in self.experts for p in module.parameters()}
        groups = split_groups(self.param_groups(), key=lambda p: id(p) in expert_params)
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps, fused=fused)
        schedule = functools.partial(
            warmup_cosine, warmup_steps=hp.warmup_steps, total_steps=total_steps, min_ratio=hp.min_lr_ratio
        )
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def _total_steps(self) -> int:
        trainer = self._trainer
        if trainer is None:
            return 0
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        steps = trainer.estimated_stepping_batches
        return int(steps) if math.isfinite(steps) else 0

    # ================================================================== the step
    def global_loss_counts(self, step_batch: list[dict[str, Any]]) -> torch.Tensor:
        """Counts of every named loss over the whole global batch (all micro-batches, all dp ranks), float64.

        One all-reduce over the ``batch`` view: SP ranks hold the same micro-batches, so never over dp × sp.
        """
        local = [0.0] * len(self.loss_weights)
        for micro_batch in step_batch:
            counts = self._named(self.loss_counts(micro_batch), "loss_counts")
            local = [acc + float(c) for acc, c in zip(local, counts)]
        # torch.full launches fill kernels; torch.tensor would copy from pageable host memory, which waits for the
        # device queue to drain.
        counts = torch.stack([self._host_scalar(c) for c in local])
        return all_reduce_sum(counts, self.parallel_mesh.batch_group).clamp_min(1.0)

    def global_means(self, local_sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Global means of the named losses from this rank's summed losses (one all-reduce over the ``loss`` view)."""
        sums = all_reduce_sum(local_sums.detach().to(torch.float64), self.parallel_mesh.loss_group)
        return (sums / counts).float()

    def run_step(
        self,
        step_batch: list[dict[str, Any]],
        *,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        backward: Callable[[torch.Tensor], None],
    ) -> StepResult:
        """One optimizer step over this rank's micro-batches (gradient accumulation inside the step).

        ``backward`` is the loop's: ``self.manual_backward`` under the Trainer, ``fabric.backward`` under Fabric.
        """
        counts = self.global_loss_counts(step_batch)
        weights = list(self.loss_weights.values())
        sums = torch.zeros(len(weights), device=self.compute_device, dtype=torch.float32)
        tokens = 0
        for micro_batch in step_batch:
            micro_batch = move_data_to_device(micro_batch, self.compute_device)
            local = self._named(self.loss_sums(micro_batch), "loss_sums")
            objective = sum(w * s / n.to(s.dtype) for w, s, n in zip(weights, local, counts))
            backward(objective)
            sums = sums + torch.stack([s.detach().float() for s in local])
            tokens += self.tokens_in(micro_batch)
        grad_norm = clip_grad_norm(
            self.model.parameters(), self.hparams.max_grad_norm, self.parallel_mesh.group("fsdp_shard")
        )
        lr = float(optimizer.param_groups[0]["lr"])  # the rate this step applies (the scheduler moves it below)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        means = self.global_means(sums, counts)
        loss = sum(w * m for w, m in zip(weights, means))
        tokens //= self.parallel_mesh.sp_size
        if self._meter is None:
            self._meter = ThroughputMeter(self.compute_device)
            self._flops_per_token = self.flops_per_token(step_batch[0])
        self._meter.add(tokens)
        return StepResult(loss, dict(zip(self.loss_weights, means)), grad_norm, tokens, lr)

    def step_metrics(self, result: StepResult) -> dict[str, Any]:
        """The metrics of a logging step: loss (and each named loss), grad norm, lr, tokens/s, MFU, peak memory.

        Reading the throughput syncs the device once; call it on logging steps only.
        """
        metrics: dict[str, Any] = {
            "train/loss": result.loss,
            "train/grad_norm": result.grad_norm,
            "train/lr": result.lr,
        }
        if len(result.losses) > 1:
            metrics.update({f"train/{name}": value for name, value in result.losses.items()})
        rate = self._meter.read() if self._meter is not None else None
        if rate is not None:
            metrics["train/tokens_per_s_per_device"] = rate
            peak = self.hparams.peak_tflops or device_peak_tflops(self.compute_device)
            if peak and self._flops_per_token:
                metrics["train/mfu"] = self._flops_per_token * rate / (peak * 1e12)
        if self.compute_device.type == "cuda":
            metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.compute_device) / 2**30
        return metrics

    def training_step(self, step_batch: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        """Lightning hook: :meth:`run_step`, then log on logging steps."""
        scheduler = self.lr_schedulers()
        result = self.run_step(
            step_batch, optimizer=self.optimizers(), scheduler=scheduler, backward=self.manual_backward
        )
        # Metrics are logged on logging steps only: Lightning turns every logged progress-bar tensor into a Python
        # number at each step, a host-device sync that would leave the GPU idle while the next step is launched.
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            metrics = self.step_metrics(result)
            shown = {"train/loss", "train/lr", "train/tokens_per_s_per_device"}
            for name, value in metrics.items():
                self.log(name, value, prog_bar=name in shown)
        return result.loss

    # ================================================================== validation
    def validation_step(self, step_batch: list[dict[str, Any]], batch_idx: int) -> None:
        """Accumulate each named loss's sum and count; the global means are reduced and logged at epoch end."""
        for micro_batch in step_batch:
            micro_batch = move_data_to_device(micro_batch, self.compute_device)
            sums = torch.stack([s.detach().double() for s in self._named(self.loss_sums(micro_batch), "loss_sums")])
            counts = torch.stack(
                [self._host_scalar(c) for c in self._named(self.loss_counts(micro_batch), "loss_counts")]
            )
            self._val_sums.append(torch.stack([sums, counts]))

    def on_validation_epoch_end(self) -> None:
        n = len(self.loss_weights)
        totals = (
            torch.stack(self._val_sums).sum(0)
            if self._val_sums
            else torch.zeros(2, n, device=self.compute_device, dtype=torch.float64)
        )
        self._val_sums.clear()
        # Counts are replicated across SP ranks: reduce loss sums over dp × sp, counts over dp.
        sums = all_reduce_sum(totals[0].clone(), self.parallel_mesh.loss_group)
        counts = all_reduce_sum(totals[1].clone(), self.parallel_mesh.batch_group).clamp_min(1.0)
        means = (sums / counts).float()
        # Already reduced over the mesh above: no second sync by Lightning.
        total = sum(w * m for w, m in zip(self.loss_weights.values(), means))
        self.log("val/loss", total, prog_bar=True, sync_dist=False)
        if n > 1:
            for name, mean in zip(self.loss_weights, means):
                self.log(f"val/{name}", mean, sync_dist=False)

    @property
    def checkpoints_trainable_only(self) -> bool:
        """Whether checkpoints hold only the trainable parameters and their optimizer state (LoRA: the frozen base
        is loaded from ``model`` at setup, so a checkpoint is a few MB instead of the whole model)."""
        return self.hparams.get("lora") is not None

    # ================================================================== export
    def export_hf(self, out_dir: str, **extras: Any) -> Path:
        """Write the first backbone as a folder its library's ``from_pretrained`` loads (collective: every rank).

        ``extras`` go to the adapter (``tokenizer=`` for transformers models).
        """
        if self.model is None:
            raise RuntimeError("The model is built in configure_model(); nothing to export yet.")
        backbone = self.backbones[0]
        if self.hparams.get("lora") is not None:  # the adapters merged in: a plain model folder
            extras["transform"] = functools.partial(merge_lora, config=self.lora_configs[0])
        return backbone.adapter.export(backbone.module, out_dir, **extras)

    def export_lora(self, out_dir: str) -> Path:
        """Write the first backbone's LoRA adapters in its library's adapter format (collective: every rank calls it;
        rank 0 writes, atomically): a PEFT folder ``peft.PeftModel.from_pretrained(base, folder)`` loads for
        transformers models, a diffusers LoRA folder ``pipe.load_lora_weights(folder)`` loads for diffusers ones."""
        if self.hparams.get("lora") is None:
            raise ConfigError("export_lora: this module trains no LoRA adapters (set lora: {r: 16, ...}).")
        backbone = self.backbones[0]
        base = str(self.hparams.get("model", "")) or None
        return backbone.adapter.export_lora(backbone.module, out_dir, self.lora_configs[0], base)

    # ================================================================== helpers
    def _host_scalar(self, value: float) -> torch.Tensor:
        return torch.full((), float(value), device=self.compute_device, dtype=torch.float64)

    def _named(self, values: Mapping[str, Any], what: str) -> list[Any]:
        """``values`` in the order of ``loss_weights``; a missing or unknown name is a bug of the family module."""
        if set(values) != set(self.loss_weights):
            raise KeyError(
                f"{type(self).__name__}.{what}() returned {sorted(values)}, but its losses are "
                f"{sorted(self.loss_weights)} (default_loss_weights)."
            )
        return [values[name] for name in self.loss_weights]


def check_expert_layout(experts: list[nn.Module], ep: int) -> None:
    """``ep`` must divide every MoE layer's expert count, and needs a model with experts."""
    if ep == 1:
        return
    if not experts:
        raise ConfigError(
            f"ep_size={ep}, but the model has no mixture-of-experts layers (no experts module found). Fix: ep_size: 1 "
            "for a dense model."
        )
    counts = sorted({int(m.num_experts) for m in experts})
    if any(n % ep for n in counts):
        raise ConfigError(
            f"ep_size={ep} does not divide the model's number of experts ({', '.join(map(str, counts))}): each EP rank "
            "holds the same number of experts. Fix: an ep_size dividing it (and dp_shard × sp)."
        )


def check_training_settings(
    *,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    warmup_steps: int,
    min_lr_ratio: float,
    max_grad_norm: float | None,
    peak_tflops: float | None,
) -> None:
    """Refuse impossible optimizer settings when the module is constructed, long before the model is loaded."""

    def bad(name: str, value: Any, want: str) -> ConfigError:
        return ConfigError(
            f"{name} must be {want}, got {value!r}. Fix: --model.init_args.{name} <value> (or the yaml)."
        )

    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise bad("learning_rate", learning_rate, "a positive number (e.g. 2e-5)")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise bad("weight_decay", weight_decay, ">= 0")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise bad("betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.95]")
    if not (math.isfinite(eps) and eps > 0):
        raise bad("eps", eps, "a positive number (e.g. 1e-8)")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise bad("warmup_steps", warmup_steps, "an integer >= 0")
    if not 0 <= min_lr_ratio <= 1:
        raise bad("min_lr_ratio", min_lr_ratio, "in [0, 1] (1 keeps the rate constant after warm-up)")
    if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise bad("max_grad_norm", max_grad_norm, "a positive number, or null to only measure the norm")
    if peak_tflops is not None and not (math.isfinite(peak_tflops) and peak_tflops > 0):
        raise bad("peak_tflops", peak_tflops, "a positive number, or null for the known GPUs' peak")


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _local_device(parallel_mesh: ParallelMesh | None) -> torch.device:
    if torch.cuda.is_available() and (parallel_mesh is None or parallel_mesh.device_type == "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
