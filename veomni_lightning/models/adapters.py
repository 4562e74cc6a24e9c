"""Model adapters: what the parallel core and the training core need to know of a model of some library.

The parallel core (``veomni_lightning.parallel``) knows no model library. It receives, from an adapter, the blocks to
shard / checkpoint / compile and a function that turns checkpointing on for chosen blocks; the training core asks the
adapter to random-init, stream pretrained weights into the shards, and export a folder the library loads back.

* :class:`ModelAdapter` serves plain ``torch.nn`` modules (the module is one block; init by ``reset_parameters``).
* :class:`TransformersAdapter`: ``PreTrainedModel`` (blocks from ``_no_split_modules``, the model's own non-reentrant
  checkpointing and ``_init_weights``, ``model.safetensors`` folders that ``from_pretrained`` loads).
* :class:`DiffusersAdapter`: diffusers ``ModelMixin`` (blocks from ``_no_split_modules`` / ``_repeated_blocks``,
  ``diffusion_pytorch_model.safetensors`` folders that ``ModelMixin.from_pretrained`` and pipelines load).

:func:`adapter_for` picks the adapter of a model by its type.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from veomni_lightning.errors import ConfigError

from .export import export_hf_folder, full_state_dict, write_folder_on_rank0, write_safetensors
from .loading import init_random_weights, load_pretrained_weights

__all__ = [
    "ModelAdapter",
    "TransformersAdapter",
    "DiffusersAdapter",
    "adapter_for",
    "blocks_by_class_name",
    "find_experts",
]


def blocks_by_class_name(model: nn.Module, class_names: Iterable[str]) -> list[nn.Module]:
    """The innermost sub-modules of ``model`` whose class name is in ``class_names``, in module order."""
    names = set(class_names)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    # A listed class may hold other listed classes: Qwen2.5-Omni's thinker lists its whole audio and vision encoders
    # beside their layers. The repeated units are the layers, so a module holding listed modules is not a block.
    outer = {id(b) for b in blocks if any(type(c).__name__ in names for c in b.modules() if c is not b)}
    return [b for b in blocks if id(b) not in outer]


def _checkpointed_forward(block: nn.Module, context_fn: Callable[[], Any] | None = None) -> None:
    """Make ``block`` recompute its forward in backward (non-reentrant), keeping its parameter names.

    An instance attribute replaces ``forward`` (a wrapper module would add a name prefix and break loading and
    export); module hooks (FSDP2's) still run around the call, as they do around torchtitan's checkpoint wrapper.
    """
    inner = block.forward

    options = {"context_fn": context_fn} if context_fn is not None else {}

    def forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(inner, *args, use_reentrant=False, **options, **kwargs)

    block.forward = forward


def find_experts(model: nn.Module) -> list[nn.Module]:
    """The experts modules of transformers MoE layers: those decorated by ``use_experts_implementation``."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "num_experts") and hasattr(m, "is_concatenated") and hasattr(m, "has_gate")
    ]


class ModelAdapter:
    """Adapter for a plain ``torch.nn`` module: the whole module is one block, random init is ``reset_parameters``.

    Subclasses answer the same questions for a model library. Every method takes the model as an argument, so one
    adapter instance serves any number of models.
    """

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The repeated units that FSDP shards one by one, checkpointing recomputes and compile compiles."""
        return [model]

    def enable_checkpointing(
        self, model: nn.Module, blocks: list[nn.Module], context_fn: Callable[[], Any] | None = None
    ) -> None:
        """Recompute each of ``blocks`` (a subset of :meth:`blocks`) in backward; ``context_fn``: torch checkpoint's
        (e.g. a selective policy, ``parallel/checkpointing.py``)."""
        for block in blocks:
            _checkpointed_forward(block, context_fn)

    def experts(self, model: nn.Module) -> list[nn.Module]:
        """The mixture-of-experts experts modules of ``model`` (split over ``ep`` ranks under EP); none here."""
        return []

    def init_random_weights(self, model: nn.Module, seed: int) -> None:
        """Random init, identical whatever the parallel layout: each module's ``reset_parameters``, seeded by name."""

        def fill(name: str, module: nn.Module, tmp: nn.Module) -> None:
            if hasattr(tmp, "reset_parameters"):
                tmp.reset_parameters()
            elif any(p is not None for p in tmp._parameters.values()):
                raise TypeError(
                    f"{name or 'root'} ({type(module).__name__}) holds parameters but has no reset_parameters(); "
                    "give it one, or load pretrained weights."
                )

        init_random_weights(model, fill, seed=seed)

    def load_weights(self, model: nn.Module, folder: str | os.PathLike) -> None:
        """Stream ``model.safetensors`` (or sharded) weights from ``folder`` into the (sharded) parameters."""
        load_pretrained_weights(model, folder)

    def export(self, model: nn.Module, out_dir: str | os.PathLike, **extras: Any) -> Path:
        """Write the full weights as ``model.safetensors`` in ``out_dir`` (collective; atomic); ``transform`` (an
        extra) maps the state dict first, e.g. LoRA adapters merged into their weights."""
        state_dict = _transformed(full_state_dict(model), extras)
        return write_folder_on_rank0(out_dir, lambda tmp: write_safetensors(tmp, state_dict, "model"))

    def export_lora(self, model: nn.Module, out_dir: str | os.PathLike, config: Any, base: str | None) -> Path:
        """Write ``model``'s LoRA adapters as a PEFT adapter folder (``PeftModel.from_pretrained(base, folder)``);
        collective, atomic. ``config`` is the ``LoraConfig``, ``base`` the base model's name or path."""
        from .lora import lora_state_dict, write_peft_adapter

        adapters = lora_state_dict(full_state_dict(model))
        return write_folder_on_rank0(out_dir, lambda tmp: write_peft_adapter(Path(tmp), adapters, config, base))


class TransformersAdapter(ModelAdapter):
    """Adapter for transformers ``PreTrainedModel`` (decoders, VLMs, omni thinkers, encoders)."""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        # transformers declares the module classes that must not be split across devices; for decoders and towers
        # those are the layers, exactly the unit FSDP should shard and checkpointing should recompute.
        # Every sub-model's list: a composite model may list only its encoders (the Qwen2.5-Omni thinker before
        # transformers 5.23), whose own lists name their layers.
        names = {n for m in model.modules() for n in (getattr(type(m), "_no_split_modules", None) or [])}
        names |= set(getattr(model, "_no_split_modules", None) or [])
        blocks = blocks_by_class_name(model, names)
        if not blocks:
            raise ValueError(
                f"{type(model).__name__} declares no _no_split_modules, so its transformer blocks cannot be found. "
                "Pass the blocks explicitly (override the family module's blocks())."
            )
        return blocks

    def enable_checkpointing(
        self, model: nn.Module, blocks: list[nn.Module], context_fn: Callable[[], Any] | None = None
    ) -> None:
        # The model's own non-reentrant checkpointing forwards every keyword argument (the SP group, packed
        # sequence metadata) into the recomputed layer and keeps parameter names.
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing.")
        options = {"use_reentrant": False, **({"context_fn": context_fn} if context_fn is not None else {})}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        chosen = {id(b) for b in blocks}
        for block in self.blocks(model):
            if id(block) not in chosen:
                if not hasattr(block, "gradient_checkpointing"):
                    raise ValueError(f"{type(block).__name__} has no per-block gradient_checkpointing switch.")
                block.gradient_checkpointing = False

    def experts(self, model: nn.Module) -> list[nn.Module]:
        """Experts modules decorated by transformers' ``use_experts_implementation`` (fused 3-D expert weights).

        Their forward is switched to the ``ep`` implementation (``veomni_lightning.parallel.experts``), which
        dispatches tokens over the EP group and, without one, groups them by expert on this rank.
        """
        from veomni_lightning.parallel.experts import EXPERTS_IMPLEMENTATION, register_experts_implementation

        found = find_experts(model)
        for module in found:
            unsupported = [
                name
                for name, bad in (
                    ("biases", module.has_bias),
                    ("transposed weights", module.is_transposed),
                    ("interleaved gate/up", not module.is_concatenated),
                    ("no gate", not module.has_gate),
                    ("a post-expert norm", getattr(module, "has_post_expert_norm", False)),
                )
                if bad
            ]
            if unsupported:
                raise ConfigError(
                    f"{type(module).__name__}'s experts have {', '.join(unsupported)}; the 'ep' experts implementation "
                    "handles fused [gate; up] weights without them (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3 "
                    "layouts). This family is not supported yet."
                )
        if found:
            register_experts_implementation()
            for module in found:
                module.config._experts_implementation = EXPERTS_IMPLEMENTATION
        return found

    def load_weights(self, model: nn.Module, folder: str | os.PathLike) -> None:
        """Stream the weights in, through transformers' checkpoint conversion for the model (e.g. MoE checkpoints
        that store one tensor per expert load into the fused expert weights)."""
        from transformers.conversion_mapping import get_model_conversion_mapping

        load_pretrained_weights(model, folder, transforms=get_model_conversion_mapping(model))

    def init_random_weights(self, model: nn.Module, seed: int) -> None:
        from transformers import PreTrainedModel

        # Composite models dispatch each sub-model's own _init_weights: the owner is the nearest PreTrainedModel.
        owners: dict[int, nn.Module] = {}

        def visit(module: nn.Module, owner: nn.Module) -> None:
            owners[id(module)] = owner
            for child in module.children():
                visit(child, child if isinstance(child, PreTrainedModel) else owner)

        visit(model, model)
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"TransformersAdapter needs a transformers PreTrainedModel, got {type(model).__name__}.")

        def fill(name: str, module: nn.Module, tmp: nn.Module) -> None:
            owners[id(module)]._init_weights(tmp)

        # What an init written on a parent module would have done (transformers' MoE blocks: normal(0, std)).
        std = getattr(model.config.get_text_config(), "initializer_range", 0.02)
        init_random_weights(model, fill, seed=seed, fallback=lambda t: torch.nn.init.normal_(t, mean=0.0, std=std))

    def export(self, model: nn.Module, out_dir: str | os.PathLike, **extras: Any) -> Path:
        """A folder ``from_pretrained`` loads; ``extras``: ``tokenizer`` (or processor) saved beside the weights."""
        return export_hf_folder(model, out_dir, tokenizer=extras.get("tokenizer"), transform=extras.get("transform"))


class DiffusersAdapter(ModelAdapter):
    """Adapter for diffusers ``ModelMixin`` models (e.g. ``WanTransformer3DModel``).

    Random init uses each module's ``reset_parameters`` (diffusers models rely on torch's default inits); a custom
    init written in a model's ``__init__`` is not reproduced, so train DiTs from pretrained weights.
    """

    weights_name = "diffusion_pytorch_model"

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        names = [*(getattr(model, "_no_split_modules", None) or []), *(getattr(model, "_repeated_blocks", None) or [])]
        blocks = blocks_by_class_name(model, names)
        if not blocks:
            raise ValueError(
                f"{type(model).__name__} declares no _no_split_modules/_repeated_blocks, so its blocks cannot be "
                "found. Pass the blocks explicitly (override the family module's blocks())."
            )
        return blocks

    def init_random_weights(self, model: nn.Module, seed: int) -> None:
        """``reset_parameters`` where a module has it; the adaptive-norm ``scale_shift_table`` parameters that DiTs
        hold directly get diffusers' own ``randn / sqrt(dim)``."""

        def fill(name: str, module: nn.Module, tmp: nn.Module) -> None:
            if hasattr(tmp, "reset_parameters"):
                tmp.reset_parameters()
                return
            for key, param in tmp._parameters.items():
                if param is None:
                    continue
                if "scale_shift_table" not in key:
                    raise TypeError(
                        f"{name or 'root'}.{key} ({type(module).__name__}) has no known random init; load pretrained "
                        "weights for this model."
                    )
                with torch.no_grad():
                    param.normal_(0.0, param.shape[-1] ** -0.5)

        init_random_weights(model, fill, seed=seed)

    def load_weights(self, model: nn.Module, folder: str | os.PathLike) -> None:
        load_pretrained_weights(model, folder, weights_name=self.weights_name)

    def export(self, model: nn.Module, out_dir: str | os.PathLike, **extras: Any) -> Path:
        """A folder ``ModelMixin.from_pretrained`` loads: ``config.json`` + ``diffusion_pytorch_model.safetensors``."""
        state_dict = _transformed(full_state_dict(model), extras)

        def write(tmp: Path) -> None:
            write_safetensors(tmp, state_dict, self.weights_name)
            model.save_config(tmp)

        return write_folder_on_rank0(out_dir, write)

    def export_lora(self, model: nn.Module, out_dir: str | os.PathLike, config: Any, base: str | None) -> Path:
        """The adapters as a diffusers LoRA folder (``pytorch_lora_weights.safetensors``, keys ``transformer.<name>``
        and the LoRA config in its metadata): ``pipe.load_lora_weights(folder)`` loads it into the pipeline's
        transformer. Written by diffusers' own ``save_lora_weights``."""
        from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

        from .lora import lora_state_dict

        prefix = "base_model.model."
        adapters = {k.removeprefix(prefix): v for k, v in lora_state_dict(full_state_dict(model)).items()}
        metadata = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules),
                    "lora_dropout": config.lora_dropout, "bias": "none"}  # fmt: skip

        def write(tmp: Path) -> None:
            WanLoraLoaderMixin.save_lora_weights(
                str(tmp), transformer_lora_layers=adapters, transformer_lora_adapter_metadata=metadata
            )

        return write_folder_on_rank0(out_dir, write)


def _transformed(state_dict: dict[str, torch.Tensor], extras: dict[str, Any]) -> dict[str, torch.Tensor]:
    transform = extras.get("transform")
    return state_dict if transform is None else transform(state_dict)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s library: transformers, diffusers, or plain torch."""
    for cls in type(model).__mro__:
        module = cls.__module__ or ""
        if module.startswith("transformers.") and cls.__name__ == "PreTrainedModel":
            return TransformersAdapter()
        if module.startswith("diffusers.") and cls.__name__ == "ModelMixin":
            return DiffusersAdapter()
    return ModelAdapter()
