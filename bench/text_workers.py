"""The three trainers compared by ``text_throughput.py``, one per process group (started by torchrun).

- ``a`` plain HF: ``AutoModelForCausalLM`` (sdpa), fp32 weights under bf16 autocast, fused AdamW, no framework;
- ``b`` Lightning today: Lightning's ``ModelParallelStrategy``, the HF model with ``fully_shard`` per block;
- ``c`` ours: ``VeOmniStrategy`` + ``CausalLMModule`` with our kernels and settings.

All three build the same random-init weights (``init_random_weights`` with one seed), read the same packed token
stream (a ``torch.save`` file of global steps written by the parent), clip the gradient norm to 1.0 and use AdamW
with the same hyper-parameters. Step times are CUDA-event intervals between step ends (no host sync inside a step);
rank 0 writes one JSON result. An out-of-memory error is a result (``status: OOM``), not a crash.

Usage (the parent does this): ``torchrun --nproc_per_node N bench/text_workers.py SPEC.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

BETAS, EPS, MAX_GRAD_NORM = (0.9, 0.95), 1e-8, 1.0


class StepClock:
    """Step-end timestamps: CUDA events on GPU (read once at the end), ``perf_counter`` on CPU.

    With ``BENCH_PROFILE=N`` in the environment, rank 0 profiles steps N and N+1 and prints the top kernels.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []
        self.losses: list[torch.Tensor] = []
        self.profile_step = int(os.environ.get("BENCH_PROFILE", 0)) if int(os.environ.get("RANK", 0)) == 0 else 0
        self.profiler = None

    def _maybe_profile(self) -> None:
        step = len(self.marks) - 1  # steps finished
        if self.profile_step and step == self.profile_step:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
        elif self.profiler is not None and step == self.profile_step + 2:
            self.profiler.__exit__(None, None, None)
            sort = "cuda_time_total" if self.cuda else "cpu_time_total"
            print(self.profiler.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=90), flush=True)
            self.profiler = None

    def mark(self, loss: torch.Tensor | None = None) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        if loss is not None:
            self.losses.append(loss.detach().float().reshape(()))
        self._maybe_profile()

    def step_times(self) -> list[float]:
        """Seconds of each step after the first mark."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _device() -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _config(spec: dict) -> Any:
    from veomni_lightning.models import config_from_model_type

    config = config_from_model_type(spec["model_type"], overrides=spec["overrides"])
    if spec.get("experts"):  # (a)'s MoE experts implementation in transformers (grouped_mm, eager, ...)
        config._experts_implementation = spec["experts"]
    return config


def _hf_model_on(device: torch.device, spec: dict, attn: str) -> tuple[torch.nn.Module, Any]:
    """The HF model on meta and a callable that materialises it and applies the shared random init."""
    from veomni_lightning.models import TransformersAdapter, build_model_on_meta, materialize_model

    model = build_model_on_meta(_config(spec), attn_implementation=attn, dtype=torch.float32)
    init = TransformersAdapter().init_random_weights
    return model, lambda: (materialize_model(model, device), init(model, seed=spec["seed"]))


def _rank_share(stream: list[list[dict]], dp_rank: int, dp_size: int) -> list[list[dict]]:
    per_rank = len(stream[0]) // dp_size
    return [step[dp_rank * per_rank : (dp_rank + 1) * per_rank] for step in stream]


def _to(mb: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in mb.items()}


def _hf_loss(model: torch.nn.Module, mb: dict, num_items: int) -> torch.Tensor:
    # Labels arrive shifted (packing knows sample boundaries): HF takes them as shift_labels, and num_items_in_batch
    # makes its loss the step's global token mean, like ours.
    out = model(
        input_ids=mb["input_ids"],
        position_ids=mb["position_ids"],
        labels=mb["labels"],
        shift_labels=mb["labels"],
        num_items_in_batch=num_items,
        use_cache=False,
    )
    return out.loss


# --------------------------------------------------------------------------------------------------- (a) plain HF
def run_plain_hf(spec: dict, stream: list[list[dict]]) -> dict:
    device = _device()
    model, init = _hf_model_on(device, spec, "sdpa")
    init()
    if spec.get("lora"):
        model = _plain_peft(model, spec)
    if spec["ac"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=spec["lr"], betas=BETAS, eps=EPS, weight_decay=0.0, fused=device.type == "cuda"
    )
    clock = StepClock(device)
    clock.mark()
    for step in stream:
        num_items = sum(mb["num_loss_tokens"] for mb in step)
        total = torch.zeros((), device=device)
        for mb in step:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16"):
                loss = _hf_loss(model, _to(mb, device), num_items)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark(total)
    return {**_sizes(model), **_finish(clock, device)}


def _plain_peft(model: torch.nn.Module, spec: dict) -> torch.nn.Module:
    """What a PEFT user writes: the base in bf16 (``from_pretrained(..., dtype=bf16)``), ``get_peft_model`` with
    LoRA on all linear layers (PEFT keeps the adapters in fp32), autocast for the matmuls."""
    from peft import LoraConfig, get_peft_model

    from veomni_lightning.models.lora import init_lora_weights

    if spec["dtype"] == "bf16":
        model.to(torch.bfloat16)
    r = spec["lora"]
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0))
    # Our adapter init (PEFT's scheme, seeded per layer name): the same starting adapters as (c), so losses compare.
    init_lora_weights(model.get_base_model(), seed=spec["seed"])
    return model


# ------------------------------------------------------------------------------------------ Lightning data plumbing
def _lightning_parts(spec: dict, stream: list[list[dict]], per_micro_batch: bool):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    class StreamData(pl.LightningDataModule):
        """This dp rank's share of the stream, keyed on the strategy's data-parallel rank."""

        def train_dataloader(self):
            kwargs = self.trainer.strategy.distributed_sampler_kwargs or {}
            dp_rank, dp_size = int(kwargs.get("rank", 0)), int(kwargs.get("num_replicas", 1))
            share = _rank_share(stream, dp_rank, dp_size)
            if not per_micro_batch:
                return DataLoader(share, batch_size=None, collate_fn=lambda x: x)
            # One item per micro-batch, each carrying the loss normaliser that makes Lightning's 1/accumulate and
            # FSDP's 1/dp averaging come out as the global token mean.
            items = [
                dict(mb, loss_normalizer=sum(m["num_loss_tokens"] for m in full) / (dp_size * len(step)))
                for full, step in zip(stream, share)
                for mb in step
            ]
            return DataLoader(items, batch_size=None, collate_fn=lambda x: x)

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.clock: StepClock | None = None

        def on_train_start(self, trainer, pl_module) -> None:
            self.clock = StepClock(trainer.strategy.root_device)
            self.clock.mark()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if per_micro_batch and (batch_idx + 1) % spec["grad_accum"]:
                return
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.clock.mark(loss)

    def trainer(strategy, timer) -> pl.Trainer:
        return pl.Trainer(
            accelerator="gpu" if torch.cuda.is_available() else "cpu",
            devices=int(os.environ.get("WORLD_SIZE", 1)),
            strategy=strategy,
            max_steps=len(stream),
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
            callbacks=[timer],
            accumulate_grad_batches=spec["grad_accum"] if per_micro_batch else 1,
        )

    return StreamData(), Timer(), trainer


# ----------------------------------------------------------------------------------------- (b) Lightning today
def run_lightning_today(spec: dict, stream: list[list[dict]]) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = _device()

    class HFModule(pl.LightningModule):
        """What a Lightning user writes for FSDP2: fully_shard per decoder layer in configure_model."""

        def configure_model(self) -> None:
            if getattr(self, "model", None) is not None:
                return
            model, init = _hf_model_on(device, spec, "sdpa")
            if spec["ac"]:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32,
                                      reduce_dtype=torch.float32)  # fmt: skip
            mesh = self.device_mesh["data_parallel"]
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh, mp_policy=mp)
            fully_shard(model, mesh=mesh, mp_policy=mp)
            init()
            self.model = model

        def training_step(self, mb, batch_idx):
            return _hf_loss(self.model, mb, mb["loss_normalizer"])

        def on_before_optimizer_step(self, optimizer) -> None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM, foreach=True)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=spec["lr"], betas=BETAS, eps=EPS, weight_decay=0.0,
                                     fused=device.type == "cuda")  # fmt: skip

    world = int(os.environ.get("WORLD_SIZE", 1))
    data, timer, make_trainer = _lightning_parts(spec, stream, per_micro_batch=True)
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    module = HFModule()
    make_trainer(strategy, timer).fit(module, datamodule=data)
    return {**_sizes(module.model), **_finish(timer.clock, device)}


# ------------------------------------------------------------------------------------------------------ (c) ours
def run_ours(spec: dict, stream: list[list[dict]]) -> dict:
    from veomni_lightning.modules import CausalLMModule
    from veomni_lightning.parallel import ParallelConfig
    from veomni_lightning.strategies import VeOmniStrategy

    device = _device()
    module = CausalLMModule(
        model=spec["model_type"],
        pretrained=False,
        config_overrides=spec["overrides"],
        learning_rate=spec["lr"],
        weight_decay=0.0,
        betas=BETAS,
        eps=EPS,
        warmup_steps=0,
        min_lr_ratio=1.0,  # constant LR, like (a) and (b)
        max_grad_norm=MAX_GRAD_NORM,
        init_seed=spec["seed"],
        ce_chunk_size=spec["ce_chunk"],
        attn_implementation=spec["attn"],
        lora={"r": spec["lora"], "alpha": 2 * spec["lora"], "target_modules": "all-linear"} if spec.get("lora") else None,
    )
    parallel = ParallelConfig(
        sp_size=spec["sp"],
        ep_size=spec.get("ep", 1),
        param_dtype=spec["dtype"],
        reduce_dtype="fp32",
        activation_checkpointing=spec["ac"],
        checkpoint_fraction=spec["ac_frac"],
        checkpoint_policy=spec.get("ac_policy", "full"),
        activation_memory_budget=spec.get("ac_budget"),
        reshard_after_forward=spec["reshard"],
        compile_blocks=spec["compile"],
    )
    strategy = VeOmniStrategy(parallel=parallel)
    data, timer, make_trainer = _lightning_parts(spec, stream, per_micro_batch=False)
    make_trainer(strategy, timer).fit(module, datamodule=data)
    return {**_sizes(module.model.hf_model), **_finish(timer.clock, device)}


# ------------------------------------------------------------------------------------------------------ helpers
def _sizes(model: torch.nn.Module) -> dict[str, int]:
    """What MFU needs of a (sharded) HF model: its parameters, less the untied input-embedding table and, for MoE, the
    expert weights a token does not use (counted here as ``embedding_params``, the part MFU leaves out)."""
    from veomni_lightning.models.adapters import find_experts
    from veomni_lightning.modules.metrics import (
        count_parameters,
        inactive_expert_parameters,
        input_embedding_parameters,
    )

    left_out = input_embedding_parameters(model) + inactive_expert_parameters(find_experts(model))
    return {"n_params": count_parameters(model), "embedding_params": left_out,
            "adapter_params": count_parameters(model, trainable_only=True)}  # fmt: skip


def _finish(clock: StepClock, device: torch.device) -> dict:
    times = clock.step_times()
    losses = [x.item() for x in clock.losses]
    peak = torch.tensor([0.0, 0.0], device=device)
    if device.type == "cuda":
        peak = (
            torch.tensor(
                [torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)], device=device
            )
            / 2**30
        )
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"step_times": times, "losses": losses, "peak_mem_gib": peak[0].item(), "peak_reserved_gib": peak[1].item(),
            "device": name}  # fmt: skip


RUNNERS = {"a": run_plain_hf, "b": run_lightning_today, "c": run_ours}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    stream = torch.load(spec["stream"], weights_only=True)
    rank = int(os.environ.get("RANK", 0))
    try:
        if spec["mode"] == "a":
            stream = _rank_share(stream, 0, 1)
        result = {"status": "ok", **RUNNERS[spec["mode"]](spec, stream)}
    except torch.OutOfMemoryError as err:
        result = {"status": "OOM", "error": str(err).splitlines()[0][:300]}
    except Exception as err:  # reported in the table; the traceback goes to the log
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(err).__name__}: {err}"[:500]}
    if rank == 0:
        Path(spec["result"]).write_text(json.dumps(result))
    sys.exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
