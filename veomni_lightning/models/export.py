"""Write a (possibly FSDP2-sharded) model as a plain Hugging Face folder that ``from_pretrained`` loads.

The folder is written to ``<out_dir>.tmp-<pid>`` and renamed into place; an existing export is moved aside first and
deleted only after the rename succeeded, so a failed export never destroys the last good one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from .source import run_on_rank0_then_share

__all__ = [
    "apply_default_modes",
    "export_hf_folder",
    "full_state_dict",
    "replace_folder_atomically",
    "write_folder_on_rank0",
    "write_hf_folder",
    "write_safetensors",
]

# Attention implementations every transformers install knows; custom ones (e.g. "ulysses") are reset on export.
_STANDARD_ATTENTION = {"eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"}


def _hf_class_name(model: nn.Module) -> str:
    """The model's transformers class name, skipping the ``FSDP<Name>`` class that ``fully_shard`` swaps in."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import PreTrainedModel

    for cls in type(model).__mro__:
        if issubclass(cls, PreTrainedModel) and not issubclass(cls, FSDPModule):
            return cls.__name__
    return type(model).__name__


def _export_config(config: Any, architectures: list[str] | None, dtype: torch.dtype | None) -> Any:
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(config, "_attn_implementation", None) not in _STANDARD_ATTENTION:
        config._attn_implementation = "sdpa"
    if architectures:
        config.architectures = architectures
    if dtype is not None:
        config.dtype = dtype
    return config


def write_safetensors(
    folder: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    weights_name: str = "model",
    tied_keys: dict[str, str] | None = None,
    max_shard_size: int | str = "5GB",
) -> torch.dtype | None:
    """Write ``<weights_name>.safetensors`` (sharded by size, with an index when sharded) into ``folder``.

    ``tied_keys`` maps tied parameter names to their source (``model.all_tied_weights_keys``); the tied copies are
    left out of the file, as ``save_pretrained`` does. Returns the floating dtype when all weights share one.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = dict(state_dict)
    for target, source in (tied_keys or {}).items():
        if target in state_dict and source in state_dict:
            del state_dict[target]
    # safetensors refuses tensors sharing storage; untied duplicates (rare) get their own copy.
    seen: set[tuple[int, int]] = set()
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen:
            tensor = tensor.clone()
        seen.add(ident)
        state_dict[key] = tensor.contiguous()
    float_dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}

    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern=weights_name + "{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state_dict[k] for k in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / f"{weights_name}.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )
    return next(iter(float_dtypes)) if len(float_dtypes) == 1 else None


def write_hf_folder(
    folder: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    config: Any,
    generation_config: Any = None,
    tokenizer: Any = None,
    tied_keys: dict[str, str] | None = None,
    architectures: list[str] | None = None,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write config, safetensors weights (:func:`write_safetensors`), generation config and tokenizer.

    Not atomic by itself: callers write into a temporary folder.
    """
    dtype = write_safetensors(folder, state_dict, "model", tied_keys=tied_keys, max_shard_size=max_shard_size)
    _export_config(config, architectures, dtype).save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def replace_folder_atomically(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside and removed only once ``tmp`` is in place."""
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    moved = False
    if out.exists():
        os.rename(out, old)
        moved = True
    try:
        os.rename(tmp, out)
    except BaseException:
        if moved:
            os.rename(old, out)
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All ranks take part; rank 0 gets full CPU tensors, the others an empty dict."""
    if dist.is_available() and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def apply_default_modes(folder: str | os.PathLike) -> None:
    """Give ``folder`` (a folder or a file) and everything in it the modes the user's umask gives new files (0644 / 0755 usually).

    Some writers (safetensors' ``save_file`` among them) create files through ``mkstemp``, which makes them 0600:
    an export or checkpoint that other users, or a serving container running as another user, cannot read.
    """
    umask = os.umask(0)
    os.umask(umask)
    if not os.path.isdir(folder):
        os.chmod(folder, 0o666 & ~umask)
        return
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def write_folder_on_rank0(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Collective: rank 0 runs ``write(tmp)`` into a temporary folder and swaps it in for ``out_dir`` atomically.

    The other ranks wait and raise with rank 0's message if it failed; a failure leaves the previous ``out_dir``
    untouched.
    """
    out = Path(out_dir)

    def run() -> None:
        tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            write(tmp)
            apply_default_modes(tmp)
            replace_folder_atomically(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    run_on_rank0_then_share(run, f"exporting to {out}")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out


def export_hf_folder(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Export a transformers model (plain or FSDP2-sharded) to ``out_dir`` as a folder ``from_pretrained`` loads.

    Collective when ``torch.distributed`` is initialised: every rank must call it (the full state dict is gathered
    one tensor at a time to rank 0's CPU memory); rank 0 writes, the others wait and raise if rank 0 failed. Custom
    attention implementations are reset to ``"sdpa"`` in config.json and any ``quantization_config`` is dropped.
    Writing is atomic: a failure leaves the previous ``out_dir`` untouched. Returns ``out_dir``. ``transform`` maps
    the gathered full state dict before it is written (rank 0).

    The weights are written in the checkpoint layout ``save_pretrained`` writes (transformers' weight conversion
    reverted: e.g. fused MoE experts back to one tensor per expert, the layout the hub and inference engines use).
    """
    from transformers.core_model_loading import revert_weight_conversion

    state_dict = full_state_dict(model)
    if transform is not None:  # e.g. LoRA adapters merged into the weights they adapt
        state_dict = transform(state_dict)
    state_dict = revert_weight_conversion(model, state_dict)

    def write(tmp: Path) -> None:
        write_hf_folder(
            tmp,
            state_dict,
            model.config,
            generation_config=getattr(model, "generation_config", None),
            tokenizer=tokenizer,
            tied_keys=getattr(model, "all_tied_weights_keys", None),
            architectures=[_hf_class_name(model)],
            max_shard_size=max_shard_size,
        )

    return write_folder_on_rank0(out_dir, write)
