"""Build a model with parameters on the meta device, materialize it (sharded or not) and fill it with weights.

The flow the training module follows::

    model = build_model_on_meta(config, attn_implementation, dtype)   # params on meta, buffers real on CPU
    ... fully_shard(...)                                              # params become DTensors on meta
    materialize_model(model, device)                                  # allocate each rank's shards
    load_pretrained_weights(model, src)  /  init_random_weights(model, fill, seed)

Both fillers work one full tensor at a time: the full tensor is built (read from safetensors, or generated) on every
rank and each rank keeps only its own shard (``distribute_tensor(..., src_data_rank=None)`` slices locally, without
communication). No rank ever holds the full model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .source import ModelSource

__all__ = [
    "build_model_on_meta",
    "materialize_model",
    "load_pretrained_weights",
    "init_random_weights",
    "params_on_meta",
]


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Within this context, every ``nn.Parameter`` registered on a module is moved to the meta device.

    Buffers are left alone, so values computed in ``__init__`` (rotary ``inv_freq``, position ids, ...) stay real.
    Building everything under ``torch.device("meta")`` would lose those values, and recomputing them afterwards
    needs per-model knowledge. Each parameter is briefly allocated (uninitialized) on CPU before moving, which costs
    no page faults; the patch is process-wide while active, so do not build models on other threads meanwhile.
    """
    original = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is None or param.device.type == "meta":
            return
        if type(param) is nn.Parameter:
            meta = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
        else:  # a Parameter subclass: rebuild it with its attributes, as accelerate's init_empty_weights does
            kwargs = dict(param.__dict__)
            kwargs["requires_grad"] = param.requires_grad
            meta = type(param)(param.data.to("meta"), **kwargs)
        meta.__dict__.update(param.__dict__)
        self._parameters[name] = meta

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_model_on_meta(
    config: Any,
    attn_implementation: str | None = None,
    dtype: torch.dtype | None = None,
    auto_class: Any = None,
) -> Any:
    """Instantiate ``auto_class.from_config(config)`` with parameters on meta and buffers real on CPU.

    ``auto_class`` defaults to ``AutoModelForCausalLM``; a VLM passes e.g. ``AutoModelForImageTextToText``.

    Use it to build large models without allocating their weights, before sharding them with FSDP2 and calling
    :func:`materialize_model`. Tied weights (``tie_word_embeddings``) are tied as usual: the output projection's
    parameter is the embedding's parameter object. ``config`` is updated in place by transformers (dtype, attention).
    """
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class

    kwargs: dict[str, Any] = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    with params_on_meta():
        model = auto_class.from_config(config, trust_remote_code=False, **kwargs)
    check_on_meta(model)
    return model


def check_on_meta(model: nn.Module) -> None:
    """Fail now, not with an out-of-memory error later, if a parameter was not created on the meta device."""
    not_meta = [n for n, p in model.named_parameters() if not p.is_meta]
    if not_meta:  # a module that bypasses register_parameter: better to fail now than to OOM later
        raise RuntimeError(f"build_model_on_meta: parameters {not_meta} were not created on the meta device.")


def materialize_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate (uninitialized) storage on ``device`` for every parameter or buffer still on meta; move the rest.

    Works on FSDP2-sharded models (DTensor parameters get their local shard allocated; FSDP2's ``_apply`` override
    re-registers its sharded views). Unlike ``model.to_empty(device=...)``, real buffers keep their values (they are
    moved, not emptied). Follow with :func:`load_pretrained_weights` or :func:`init_random_weights`.
    """
    device = torch.device(device)
    # Remember which modules share a parameter object (tied embeddings): for plain tensors, nn.Module._apply replaces
    # a meta parameter by a new Parameter per module, which would silently untie them.
    shared: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                shared.setdefault(id(param), []).append((module, name))

    def allocate_or_move(t: torch.Tensor) -> torch.Tensor:
        if t.is_meta:
            return torch.empty_like(t, device=device)
        return t.to(device)

    # _apply (not a hand-written loop) so FSDP2's override re-registers the padded local shards of DTensor params.
    model._apply(allocate_or_move)
    for users in shared.values():
        first_module, first_name = users[0]
        canonical = first_module._parameters[first_name]
        for module, name in users[1:]:
            if module._parameters[name] is not canonical:
                module._parameters[name] = canonical
    return model


def _copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full tensor ``full`` into ``target`` (a DTensor shard or a plain tensor)."""
    with torch.no_grad():
        if isinstance(target, DTensor):
            # src_data_rank=None: every rank has the same full tensor and slices its own shard, no communication.
            shard = distribute_tensor(
                full.to(dtype=target.dtype), target.device_mesh, target.placements, src_data_rank=None
            ).to_local()
            target.to_local().copy_(shard)
        else:
            target.copy_(full)


def _check_materialized(model: nn.Module, what: str) -> None:
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"{what}: {len(meta)} tensors are still on meta (e.g. {meta[:3]}); call materialize_model.")


def _weight_files(folder: Path, weights_name: str = "model") -> list[Path]:
    index = folder / f"{weights_name}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / f"{weights_name}.safetensors"
    if single.is_file():
        return [single]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    found = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".gguf"})
    hint = f" It has {found}: only safetensors are streamed (convert the checkpoint first)." if found else ""
    raise FileNotFoundError(f"no safetensors weights in {folder}.{hint}")


def _non_persistent_buffer_names(model: nn.Module) -> set[str]:
    names = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name in module._non_persistent_buffers_set:
            names.add(f"{prefix}.{name}" if prefix else name)
    return names


def _matches_any(name: str, patterns: Any) -> bool:
    return any(re.search(p, name) for p in (patterns or ()))


def load_pretrained_weights(
    model: nn.Module,
    src: ModelSource | str,
    weights_name: str = "model",
    transforms: Sequence[Any] | None = None,
) -> None:
    """Stream the safetensors weights of ``src`` into a materialized (optionally FSDP2-sharded) model.

    One tensor is read at a time; each rank copies only its shard. Tied weights are loaded once (from whichever tied
    name the file has); dtypes are cast to the parameter's. Persistent buffers found in the file are loaded too.
    Missing weights, unexpected keys and shape mismatches raise one ``KeyError``/``ValueError`` listing them all,
    before anything is copied. ``weights_name`` is the file stem: ``model`` (transformers) or
    ``diffusion_pytorch_model`` (diffusers).

    ``transforms``: transformers' checkpoint conversion for the model (``WeightRenaming`` / ``WeightConverter`` from
    ``get_model_conversion_mapping``), e.g. per-expert MoE keys (``mlp.experts.{j}.gate_proj.weight``) merged into
    fused tensors. Whether a transform applies is decided by the file's keys, so a checkpoint already in the model's
    layout loads unchanged. A converted weight is built one target tensor at a time (one layer's experts).
    """
    folder = Path(src.folder if isinstance(src, ModelSource) else src)
    _check_materialized(model, "load_pretrained_weights")
    files = _weight_files(folder, weights_name)
    if transforms:
        _load_converted(model, folder, files, list(transforms))
        return

    # name -> tensor for every parameter and persistent buffer; tied names share one tensor object.
    non_persistent = _non_persistent_buffer_names(model)
    targets = _load_targets(model, non_persistent)
    groups: dict[int, list[str]] = {}
    for name, tensor in targets.items():
        groups.setdefault(id(tensor), []).append(name)

    # Pass 1: read only the headers, so every problem is reported at once and nothing is half-loaded.
    plan: dict[Path, list[str]] = {}
    chosen: dict[int, str] = {}
    unexpected, mismatched = [], []
    ignore_unexpected = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in targets:
                    if key not in non_persistent and not _matches_any(key, ignore_unexpected):
                        unexpected.append(key)
                    continue
                tensor = targets[key]
                if id(tensor) in chosen:  # the file stores both names of a tied weight
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(tensor.shape):
                    mismatched.append(f"{key}: file {shape} vs model {tuple(tensor.shape)}")
                    continue
                chosen[id(tensor)] = key
                plan.setdefault(path, []).append(key)
    ignore_missing = getattr(model, "_keys_to_ignore_on_load_missing", None)
    missing = [
        "/".join(names)
        for tid, names in groups.items()
        if tid not in chosen and not all(_matches_any(n, ignore_missing) for n in names)
    ]
    _raise_load_problems(folder, model, missing, unexpected, mismatched)

    # Pass 2: one full tensor in memory at a time.
    for path, keys in plan.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in keys:
                _copy_full_into(targets[key], f.get_tensor(key))


def _load_targets(model: nn.Module, non_persistent: set[str]) -> dict[str, torch.Tensor]:
    """Checkpoint name -> tensor for every parameter and persistent buffer (tied names share one tensor object).

    A layer wrapped by PEFT's LoRA keeps its weight one level down (``q_proj.base_layer.weight``); the checkpoint
    holds it under the plain name (``q_proj.weight``).
    """
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update({n: b for n, b in model.named_buffers(remove_duplicate=False) if n not in non_persistent})
    return {name.replace(".base_layer.", "."): tensor for name, tensor in targets.items()}


def _load_converted(model: nn.Module, folder: Path, files: list[Path], transforms: list[Any]) -> None:
    """:func:`load_pretrained_weights` through transformers' key renamings and weight converters."""
    from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    non_persistent = _non_persistent_buffer_names(model)
    targets = _load_targets(model, non_persistent)
    prefix = getattr(model, "base_model_prefix", None)

    # Pass 1 (headers): where every model tensor comes from. direct: target -> (file, key); merged: target -> the
    # converter and its (pattern, file, key) sources in natural key order (expert 0, 1, ...).
    keys = []
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys += [(key, path) for key in f.keys()]
    keys.sort(key=lambda item: dot_natural_key(item[0]))
    direct: dict[str, tuple[Path, str]] = {}
    merged: dict[str, tuple[Any, list[tuple[str, Path, str]]]] = {}
    unexpected = []
    for key, path in keys:
        target, pattern = rename_source_key(key, renamings, converters, prefix, targets)
        if target not in targets:
            if key not in non_persistent and not _matches_any(
                key, getattr(model, "_keys_to_ignore_on_load_unexpected", None)
            ):
                unexpected.append(key)
        elif pattern is None:
            direct.setdefault(target, (path, key))
        else:
            merged.setdefault(target, (by_pattern[pattern], []))[1].append((pattern, path, key))
    loaded = {id(targets[name]) for name in (*direct, *merged)}
    ignore_missing = getattr(model, "_keys_to_ignore_on_load_missing", None)
    missing = sorted(
        name for name, t in targets.items() if id(t) not in loaded and not _matches_any(name, ignore_missing)
    )
    mismatched = []
    for name, (_, sources) in merged.items():
        per_pattern = {pattern: sum(1 for p, _, _ in sources if p == pattern) for pattern, _, _ in sources}
        if len(set(per_pattern.values())) > 1:  # e.g. one expert's up_proj missing from a per-expert checkpoint
            mismatched.append(f"{name} is merged from unequal numbers of checkpoint tensors: {per_pattern}")
    for name, (path, key) in direct.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shape = tuple(f.get_slice(key).get_shape())
        if shape != tuple(targets[name].shape):
            mismatched.append(f"{key}: file {shape} vs model {tuple(targets[name].shape)}")
    _raise_load_problems(folder, model, missing, unexpected, mismatched)

    # Pass 2: one target tensor in memory at a time (a converted one holds its sources, e.g. one layer's experts).
    for name, (path, key) in direct.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            _copy_full_into(targets[name], f.get_tensor(key))
    for name, (converter, sources) in merged.items():
        converter = copy.deepcopy(converter)
        for pattern, path, key in sources:
            converter.add_tensor(name, key, pattern, functools.partial(_read_tensor, path, key))
        try:
            converted = converter.convert(name, model=model, config=getattr(model, "config", None))
        except Exception as error:
            raise ValueError(
                f"cannot load {folder}: merging {len(sources)} checkpoint tensors ({sources[0][2]}, ...) into {name} "
                f"failed: {error}"
            ) from error
        if name not in converted:
            raise KeyError(f"converting {[s[2] for s in sources]} gave {sorted(converted)}, not {name}.")
        full = converted[name]
        if tuple(full.shape) != tuple(targets[name].shape):
            raise ValueError(
                f"cannot load {folder}: {name} converted from {len(sources)} checkpoint tensors has shape "
                f"{tuple(full.shape)}, the model's is {tuple(targets[name].shape)}."
            )
        _copy_full_into(targets[name], full)


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.get_tensor(key)


def _raise_load_problems(
    folder: Path, model: nn.Module, missing: list[str], unexpected: list[str], mismatched: list[str]
) -> None:
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {sorted(missing)}")
    if unexpected:
        problems.append(f"in the checkpoint but not in the model: {sorted(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if problems:
        raise KeyError(f"cannot load {folder} into {type(model).__name__}: " + "; ".join(problems))


def _module_seed(seed: int, name: str) -> int:
    # Stable across processes and Python runs (unlike hash()), and independent of the iteration order. A layer that
    # PEFT wrapped (``q_proj.base_layer``) gets the seed of the plain layer: LoRA on a random init adapts the same base.
    name = name.replace(".base_layer", "")
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


#: ``fill(name, module, tmp)`` initialises ``tmp``, a childless copy of ``module`` holding full-size tensors.
InitFn = Callable[[str, nn.Module, nn.Module], None]


def init_random_weights(
    model: nn.Module,
    fill: InitFn,
    seed: int = 0,
    init_device: torch.device | str | None = None,
    fallback: Callable[[torch.Tensor], None] | None = None,
    select: Callable[[str], bool] | None = None,
) -> None:
    """Randomly initialise a materialized (optionally FSDP2-sharded) model, one module at a time, layout-independent.

    For each module with its own parameters/buffers (children first, like transformers' ``initialize_weights``), a
    temporary copy holding full-size tensors is built on ``init_device``, the RNG is seeded from ``(seed, module
    name)``, ``fill`` initialises the copy (the model library's own init: transformers' ``_init_weights``, or
    ``reset_parameters``; see the adapters), and each rank copies its shard of every full tensor into the real
    parameter. All ranks generate identical full tensors: the values do not depend on the parallel layout (world
    size, FSDP/HSDP/SP), only on ``seed``, the module names and the device type the values are generated on.
    ``init_device`` defaults to the parameters' device; pass ``"cpu"`` for values identical on CPU and GPU runs.
    ``fill`` sees a module without children: an init that reaches into sub-modules from their parent (Qwen3-Omni's
    MoE block initialises its experts' weights) leaves them unset; ``fallback`` then fills each such tensor (same
    seeded RNG), and without one this raises instead of training on uninitialised memory. ``select(name)``: only the
    modules it accepts (e.g. LoRA adapters after the base weights were loaded).
    """
    _check_materialized(model, "init_random_weights")
    first = next(iter(model.parameters()), None)
    device = torch.device(init_device) if init_device is not None else (first.device if first is not None else "cpu")
    for name, module in _post_order(model):
        if select is not None and not select(name):
            continue
        params = {k: p for k, p in module._parameters.items() if p is not None}
        buffers = {k: b for k, b in module._buffers.items() if b is not None}
        if not params and not buffers:
            continue
        # A shallow copy of the module (same class, so isinstance checks in the init match) with its own dicts.
        tmp = _shallow_copy(module)
        # None entries (e.g. bias=False) are kept: inits read ``module.bias``.
        object.__setattr__(tmp, "_parameters", {k: None for k in module._parameters})
        object.__setattr__(tmp, "_buffers", {k: None for k in module._buffers})
        object.__setattr__(tmp, "_modules", {})
        object.__setattr__(tmp, "_non_persistent_buffers_set", set(module._non_persistent_buffers_set))
        for k, p in params.items():
            # NaN marks what the library's init leaves untouched (an init written on a parent module, below).
            full = torch.full(p.shape, float("nan"), dtype=p.dtype, device=device)
            tmp._parameters[k] = nn.Parameter(full, requires_grad=p.requires_grad)
        for k, b in buffers.items():
            full_b = b.full_tensor() if isinstance(b, DTensor) else b
            tmp._buffers[k] = full_b.detach().to(device).clone()
        fork_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices, device_type=device.type):
            torch.manual_seed(_module_seed(seed, name))
            try:
                fill(name, module, tmp)
            except AttributeError as exc:
                raise RuntimeError(
                    f"init_random_weights: initialising {name or 'root'} ({type(module).__name__}) failed ({exc}); "
                    f"the init probably reads sub-modules, which the temporary copy does not have."
                ) from exc
            untouched = [
                k for k in params if tmp._parameters[k].is_floating_point() and tmp._parameters[k].isnan().any()
            ]
            if untouched and fallback is None:
                raise RuntimeError(
                    f"init_random_weights: the init of {name or 'root'} ({type(module).__name__}) left {untouched} "
                    "unset (an init written on a parent module?); pass a fallback init."
                )
            for k in untouched:
                fallback(tmp._parameters[k])
        for k, p in params.items():
            _copy_full_into(p, tmp._parameters[k])
        for k, b in buffers.items():
            _copy_full_into(b, tmp._buffers[k])


def _shallow_copy(module: nn.Module) -> nn.Module:
    """``copy.copy`` of a module, as its own class even when ``fully_shard`` swapped in an ``FSDP<Name>`` class
    (whose ``__new__`` re-runs ``__init__``, which copying cannot call)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    tmp = object.__new__(cls)
    tmp.__dict__.update(module.__dict__)
    return tmp


def _post_order(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) children first, the order transformers' ``initialize_weights`` uses."""
    out: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)
        out.append((prefix, module))

    visit("", model)
    return out
