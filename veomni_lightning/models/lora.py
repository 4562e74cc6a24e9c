"""LoRA adapters through PEFT, added to a meta-built model before FSDP2 wraps its blocks.

:func:`add_lora` injects PEFT's LoRA layers (``peft.inject_adapter_in_model``) into the model the family module
built, freezes everything else, and tells the weight loader that the adapters are not in the checkpoint. The
adapters live inside the same blocks, so FSDP2, Ulysses SP and the layout-independent init apply unchanged;
:func:`init_lora_weights` gives them PEFT's initial values (A: Kaiming-uniform, B: zero, so training starts from
the base model exactly). :func:`lora_state_dict` / :func:`write_peft_adapter` write a folder
``peft.PeftModel.from_pretrained(base, folder)`` loads; :func:`load_peft_adapter` reads one back (the ``adapter``
option: continue training an existing adapter, whose ``adapter_config.json`` then sets rank, alpha and targets).

The frozen base weights are stored in the compute dtype (bf16 on GPU): no fp32 master copy and no optimizer state
for them; the adapters stay fp32 and are the only parameters the optimizer sees.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from veomni_lightning.errors import ConfigError
from veomni_lightning.models.adapters import find_experts
from veomni_lightning.models.loading import _copy_full_into, init_random_weights

__all__ = [
    "add_lora",
    "init_lora_weights",
    "is_lora_parameter",
    "load_peft_adapter",
    "lora_config",
    "lora_state_dict",
    "merge_lora",
    "write_peft_adapter",
]

_OPTIONS = {"r", "alpha", "target_modules", "dropout", "exclude_modules", "adapter"}
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter."""
    return ".lora_A." in name or ".lora_B." in name


def lora_config(options: dict[str, Any]) -> Any:
    """A ``peft.LoraConfig`` from the module's ``lora`` option (``r``, ``alpha``, ``target_modules``, ...).

    With ``adapter: <folder>`` (a PEFT adapter folder) the folder's ``adapter_config.json`` gives the settings; an
    option that contradicts it is a ``ConfigError``.
    """
    from peft import LoraConfig

    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ConfigError(f"lora options {unknown} are unknown. Fix: use {sorted(_OPTIONS)}.")
    if options.get("adapter") is not None:
        return _saved_adapter_config(Path(options["adapter"]), options)
    r = options.get("r", 16)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"lora r must be a positive integer (the adapter rank, e.g. 16), got {r!r}.")
    return LoraConfig(r=r, lora_alpha=options.get("alpha", 2 * r), target_modules=options.get("target_modules", "all-linear"),
                      lora_dropout=options.get("dropout", 0.0), exclude_modules=options.get("exclude_modules"),
                      bias="none")  # fmt: skip


def _saved_adapter_config(folder: Path, options: dict[str, Any]) -> Any:
    from peft import LoraConfig

    if not (folder / "adapter_config.json").is_file() or not (folder / _ADAPTER_WEIGHTS).is_file():
        raise ConfigError(
            f"lora adapter {str(folder)!r} is not a PEFT adapter folder (needs adapter_config.json and "
            f"{_ADAPTER_WEIGHTS}). Fix: point it at a folder written by PeftModel.save_pretrained or export_lora."
        )
    config = LoraConfig.from_pretrained(str(folder))
    saved = {"r": config.r, "alpha": config.lora_alpha, "target_modules": config.target_modules,
             "dropout": config.lora_dropout, "exclude_modules": config.exclude_modules}  # fmt: skip
    for key, value in options.items():
        want = set(value) if isinstance(value, list | tuple | set) else value
        have = set(saved[key]) if isinstance(saved.get(key), list | tuple | set) else saved.get(key)
        if key != "adapter" and want != have:
            raise ConfigError(
                f"lora {key}={value!r} contradicts the adapter in {str(folder)!r} ({key}={saved[key]!r}). Fix: "
                "leave it out; the adapter's own settings are used."
            )
    if config.bias != "none" or config.use_dora or getattr(config, "modules_to_save", None):
        raise ConfigError(
            f"lora adapter {str(folder)!r} uses bias/DoRA/modules_to_save, which this trainer does not train. Fix: "
            "start a plain LoRA adapter."
        )
    return config


def add_lora(model: nn.Module, options: dict[str, Any], frozen_dtype: torch.dtype | None = None) -> Any:
    """Inject LoRA adapters into ``model`` (on meta or materialised) and freeze every other parameter.

    ``frozen_dtype`` (the compute dtype) is what the frozen floating-point parameters are stored in from here on;
    call this before FSDP2 shards the model, so the shards, the all-gathers and the loaded weights are in it.
    Returns the ``LoraConfig``. Target modules that match nothing are a ``ConfigError``.
    """
    from peft import inject_adapter_in_model

    config = lora_config(options)
    if find_experts(model):
        _leave_experts_and_routers_alone(config, model)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as error:  # PEFT: "Target modules ... not found in the base model"
        raise ConfigError(f"lora target_modules {config.target_modules!r}: {error}".split("\n")[0]) from None
    names = [n for n, _ in model.named_parameters() if is_lora_parameter(n)]
    if not names:
        raise ConfigError(f"lora target_modules {config.target_modules!r} matched no layer of {type(model).__name__}.")
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_parameter(name))
    if frozen_dtype is not None:
        _store_frozen_in(model, frozen_dtype)
    # The checkpoint holds the base model only: the loader must not ask for the adapters.
    ignore = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    model._keys_to_ignore_on_load_missing = [*ignore, r".*\.lora_[AB]\..*"]
    return config


def _leave_experts_and_routers_alone(config: Any, model: nn.Module) -> None:
    """Keep LoRA off the fused MoE experts and the routers: adapters on attention and dense / shared-expert layers.

    For transformers v5 MoE models PEFT turns ``all-linear`` (and v4 expert names) into ``target_parameters`` on
    the fused expert weights and the router (a ``ParamWrapper`` adding ``B·A`` to every expert each step). That
    wrapper replaces the experts module our expert-parallel split and grouped-GEMM experts function work on, and a
    router adapter would move the routing the balancing loss watches. The conversion is run here first (PEFT runs
    it again on injection, with nothing left to convert) and its parameter targets are dropped.
    """
    from peft.utils.transformers_weight_conversion import (
        convert_peft_config_for_transformers,
        get_model_conversion_mapping,
    )

    if hasattr(getattr(model, "config", None), "model_type"):
        convert_peft_config_for_transformers(config, model=model, conversions=get_model_conversion_mapping(model))
    config.target_parameters = []


def _store_frozen_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Re-create every frozen floating-point parameter in ``dtype`` (tied parameters stay one object)."""
    converted: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.requires_grad or not param.is_floating_point() or param.dtype == dtype:
                continue
            if id(param) not in converted:
                converted[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
            module._parameters[name] = converted[id(param)]


def init_lora_weights(model: nn.Module, seed: int) -> None:
    """PEFT's initial adapter values, layout-independent: A Kaiming-uniform (``a = √5``), B zero."""

    def fill(name: str, module: nn.Module, tmp: nn.Module) -> None:
        weight = tmp._parameters["weight"]
        with torch.no_grad():
            if ".lora_B." in f"{name}.":
                weight.zero_()
            else:
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    init_random_weights(
        model, fill, seed=seed, select=lambda name: ".lora_A." in f"{name}." or ".lora_B." in f"{name}."
    )


def load_peft_adapter(model: nn.Module, folder: str | Path, adapter: str = "default") -> None:
    """Copy a PEFT adapter folder's weights into the injected (possibly sharded) adapters of ``model``.

    Every adapter of the model must be in the file and every tensor of the file must have a place, with its shape.
    """
    from safetensors import safe_open

    folder = Path(folder)
    params = {name: p for name, p in model.named_parameters() if is_lora_parameter(name)}
    wanted = {"base_model.model." + name.replace(f".{adapter}.", "."): name for name in params}
    with safe_open(str(folder / _ADAPTER_WEIGHTS), framework="pt") as f:
        saved = set(f.keys())
        missing, unexpected = sorted(set(wanted) - saved), sorted(saved - set(wanted))
        if missing or unexpected:
            raise ConfigError(
                f"lora adapter {str(folder)!r} does not fit this model: {len(missing)} adapters missing from the file "
                f"(e.g. {missing[:2]}), {len(unexpected)} tensors with no place (e.g. {unexpected[:2]}). Fix: use the "
                "adapter trained for this base model (same architecture and target modules)."
            )
        for key, name in wanted.items():
            tensor, target = f.get_tensor(key), params[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ConfigError(f"lora adapter {str(folder)!r}: {key} has shape {tuple(tensor.shape)}, the model "
                                  f"{tuple(target.shape)}. Fix: use the adapter trained for this base model.")  # fmt: skip
            _copy_full_into(target, tensor)


def lora_state_dict(full_state: dict[str, torch.Tensor], adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapters of a full state dict under PEFT's saved names (``base_model.model.<name>``, no adapter name)."""
    return {
        "base_model.model." + name.replace(f".{adapter}.", "."): tensor
        for name, tensor in full_state.items()
        if is_lora_parameter(name)
    }


def write_peft_adapter(folder: Path, adapters: dict[str, torch.Tensor], config: Any, base_name: str | None) -> None:
    """``adapter_model.safetensors`` + ``adapter_config.json`` in ``folder`` (the layout ``PeftModel`` reads)."""
    from safetensors.torch import save_file

    config.base_model_name_or_path = base_name
    config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in adapters.items()}, str(folder / "adapter_model.safetensors"))


def merge_lora(state: dict[str, torch.Tensor], config: Any, adapter: str = "default") -> dict[str, torch.Tensor]:
    """A full state dict with every adapter merged into the weight it adapts (``W + α/r · B·A``) under the plain
    model's names (PEFT's ``base_layer`` level removed): what ``from_pretrained`` without PEFT loads."""
    scale = config.lora_alpha / config.r
    merged = {name.replace(".base_layer.", "."): t for name, t in state.items() if not is_lora_parameter(name)}
    suffix = f".lora_A.{adapter}.weight"
    for name, a in state.items():
        if name.endswith(suffix):
            prefix = name[: -len(suffix)]
            b = state[f"{prefix}.lora_B.{adapter}.weight"]
            weight = merged[f"{prefix}.weight"]
            merged[f"{prefix}.weight"] = (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)
    return merged
