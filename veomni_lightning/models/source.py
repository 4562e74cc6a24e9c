"""Where a model comes from: resolve a user string to a local Hugging Face folder.

Accepted forms of ``model``:

* a local folder with ``config.json`` (+ ``*.safetensors``, single file or sharded with an index);
* ``package:<pip package>/<relative path>``: a file or folder shipped inside an installed Python package
  (located with ``importlib.util.find_spec`` so the package is never imported);
* a path to a ``.gguf`` file (or a folder plus ``gguf_file=``): converted once to a cached safetensors folder;
* anything else is treated as a Hugging Face Hub id and downloaded into the usual HF cache.

When ``torch.distributed`` is initialised, the work that writes files (GGUF conversion, hub download) is done by
global rank 0 only; the other ranks wait for its success flag and fail with its error rather than hang.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from veomni_lightning.errors import ConfigError
from veomni_lightning.paths import PACKAGE_PREFIX, resolve_path

__all__ = ["ModelSource", "resolve_model_source", "resolve_package_path", "load_config", "model_config_and_weights"]

# Bump when the conversion output changes, so stale cached folders are not reused.
_GGUF_CONVERSION_VERSION = "1"

T = TypeVar("T")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a local HF folder (or, with ``is_local=False``, a hub id used as is).

    ``folder`` is what ``from_pretrained`` / :func:`load_config` take; ``has_weights`` says whether safetensors
    weights are present (a config-only folder can still be used with random init); ``original`` is the user string;
    ``gguf_path`` is the GGUF file the folder was converted from, if any.
    """

    folder: str
    has_weights: bool
    original: str
    is_local: bool = True
    gguf_path: str | None = None


def resolve_package_path(spec: str) -> Path:
    """Turn ``package:<pkg>/<relative path>`` into an absolute path inside the installed package (see
    :func:`veomni_lightning.paths.resolve_path`)."""
    if not spec.startswith(PACKAGE_PREFIX):
        raise ValueError(f"not a package path (expected '{PACKAGE_PREFIX}<pkg>/<path>'): {spec!r}")
    return Path(resolve_path(spec))


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def run_on_rank0_then_share(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on global rank 0 only; return its result on every rank (via ``broadcast_object_list``).

    Rank 0 finishes (or fails) ``fn`` before it enters the collective, so other ranks never pass a barrier early. If
    rank 0 fails, every other rank raises a ``RuntimeError`` with rank 0's message instead of hanging; rank 0
    re-raises its own exception. Without an initialised process group this is just ``fn()``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    payload: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            payload[0] = ("ok", fn())
        except BaseException as exc:  # noqa: B036 - anything must be reported, or the others hang
            error = exc
            payload[0] = ("error", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if error is not None:
        raise error
    if status != "ok":
        raise RuntimeError(f"{what} failed on rank 0: {value}")
    return value


@contextlib.contextmanager
def allow_gguf_without_accelerate() -> Iterator[None]:
    """Let ``from_pretrained(..., gguf_file=...)`` run when ``accelerate`` is not installed.

    transformers 5.x keeps an old ``is_accelerate_available()`` guard in ``from_pretrained`` for GGUF files although
    the GGUF loader itself no longer uses accelerate; this library does not depend on accelerate, so the guard is
    bypassed for the duration of the call (a no-op when accelerate is installed).
    """
    import transformers.modeling_utils as modeling_utils

    original = modeling_utils.is_accelerate_available
    if original():
        yield
        return
    modeling_utils.is_accelerate_available = lambda *args, **kwargs: True
    try:
        yield
    finally:
        modeling_utils.is_accelerate_available = original


def default_cache_dir() -> Path:
    """``$VEOMNI_LIGHTNING_CACHE`` or ``~/.cache/veomni_lightning``."""
    env = os.environ.get("VEOMNI_LIGHTNING_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "veomni_lightning"


def gguf_cache_folder(gguf_path: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached HF folder a GGUF file converts to: ``<cache>/gguf/<name>-<hash of size, mtime, path>``."""
    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    key = f"{_GGUF_CONVERSION_VERSION}|{stat.st_size}|{stat.st_mtime_ns}|{gguf_path}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "gguf"
    return base / f"{gguf_path.stem}-{digest}"


def _is_complete_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and _has_safetensors(folder)


def convert_gguf_to_folder(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain HF safetensors folder at ``target`` (written atomically).

    Writes config.json (no ``quantization_config``), safetensors weights, generation_config.json and the tokenizer.
    Everything goes into ``<target>.tmp-<pid>`` first and is renamed into place at the end, so a crash never leaves a
    half-written folder that a later run would mistake for a finished conversion.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .export import write_hf_folder

    folder, name = str(gguf_path.parent), gguf_path.name
    with allow_gguf_without_accelerate():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception:  # a GGUF without tokenizer metadata is still a usable model
        tokenizer = None
    state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_hf_folder(
            tmp,
            state_dict,
            model.config,
            generation_config=getattr(model, "generation_config", None),
            tokenizer=tokenizer,
            tied_keys=getattr(model, "all_tied_weights_keys", None),
        )
        if target.exists():  # another process finished first: keep its folder
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _resolve_gguf(gguf_path: Path, original: str, cache_dir: str | None) -> ModelSource:
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist (from {original!r}).")
    target = gguf_cache_folder(gguf_path, cache_dir)

    def convert() -> str:
        if not _is_complete_folder(target):
            start = time.perf_counter()
            convert_gguf_to_folder(gguf_path, target)
            print(f"[veomni_lightning] converted {gguf_path.name} to {target} in {time.perf_counter() - start:.1f}s")
        return str(target)

    folder = run_on_rank0_then_share(convert, f"converting GGUF {gguf_path}")
    if not _is_complete_folder(Path(folder)):
        # Only global rank 0 converts; a rank on another node without a shared file system lands here.
        raise FileNotFoundError(
            f"rank {_rank()}: the converted GGUF folder {folder} is not visible. cache_dir must be on a file system "
            f"shared by all ranks."
        )
    return ModelSource(folder=folder, has_weights=True, original=original, gguf_path=str(gguf_path))


def resolve_hub(model: str, cache_dir: str | None, weights: bool = True) -> ModelSource:
    """Download hub repository ``model`` (configs, tokenizer files, and safetensors weights unless ``weights`` is
    False) into the HF cache: global rank 0 first, then the others (a cache hit when the cache is shared)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"] + (["*.safetensors"] if weights else [])

    def download() -> str:
        try:
            return snapshot_download(model, allow_patterns=patterns, cache_dir=cache_dir)
        except Exception as exc:
            raise FileNotFoundError(
                f"{model!r} is not a local folder, a '{PACKAGE_PREFIX}' path or a .gguf file, and fetching it from "
                f"the Hugging Face Hub failed ({type(exc).__name__}: {exc})."
            ) from exc

    folder = run_on_rank0_then_share(download, f"downloading {model}")
    if _rank() != 0:
        # A shared HF cache makes this a cache hit; on an unshared one each node downloads for itself.
        folder = download()
    return ModelSource(folder=folder, has_weights=_has_safetensors(Path(folder)), original=model)


def resolve_model_source(
    model: str, gguf_file: str | None = None, cache_dir: str | None = None, *, weights: bool = True
) -> ModelSource:
    """Resolve a model string (local folder, ``package:`` path, ``.gguf`` file or hub id) to a :class:`ModelSource`.

    ``gguf_file`` names a GGUF file inside the folder ``model`` points to. GGUF checkpoints are converted once to a
    cached safetensors folder under ``cache_dir`` (default ``~/.cache/veomni_lightning/gguf``); later calls reuse it.
    ``weights=False`` fetches a hub repository's config, tokenizer and processor files only.
    Collective-safe: every rank may call it; only global rank 0 writes.
    """
    original = model
    path = resolve_package_path(model) if model.startswith(PACKAGE_PREFIX) else Path(model).expanduser()
    if gguf_file is not None:
        return _resolve_gguf(path / gguf_file if path.is_dir() else Path(gguf_file), original, cache_dir)
    if path.suffix == ".gguf":
        return _resolve_gguf(path, original, cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" It holds GGUF files {ggufs}: pass gguf_file=... or point at one." if ggufs else ""
            raise FileNotFoundError(f"model folder {path} has no config.json.{hint}")
        return ModelSource(folder=str(path.resolve()), has_weights=_has_safetensors(path), original=original)
    if model.startswith(PACKAGE_PREFIX) or path.exists() or model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{original!r} ({path}) is neither a model folder nor a .gguf file.")
    return resolve_hub(model, cache_dir, weights)


def load_config(src: ModelSource | str, overrides: dict[str, Any] | None = None) -> Any:
    """Load the model's ``AutoConfig`` from a resolved source, applying ``overrides`` (e.g. fewer layers).

    ``trust_remote_code`` is never enabled: models needing custom code must be registered with transformers first.
    Unknown override keys raise, so a typo does not silently train the wrong model.
    """
    from transformers import AutoConfig

    folder = src.folder if isinstance(src, ModelSource) else src
    return _apply_overrides(AutoConfig.from_pretrained(folder, trust_remote_code=False), overrides)


def config_from_model_type(model_type: str, overrides: dict[str, Any] | None = None) -> Any:
    """A default config of a transformers architecture (``"qwen3"``, ``"llama"``, ...) with ``overrides`` applied.

    For random-init training of a model shape with no files at all (tests, benchmarks, pre-training from scratch).
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{model_type!r} is not a transformers model type (e.g. 'qwen3', 'llama', 'qwen2').")
    return _apply_overrides(AutoConfig.for_model(model_type), overrides)


def model_config_and_weights(
    model: str, *, pretrained: bool, overrides: dict[str, Any] | None = None, gguf_file: str | None = None
) -> tuple[Any, str | None]:
    """The config a module builds from ``model`` and the folder whose weights it streams in (None: random init).

    ``model`` is a folder, ``package:`` path, ``.gguf`` file or hub id; with ``pretrained=False`` it may also be a
    transformers model type (``"qwen3"``, ``"qwen3_vl"``) whose default config ``overrides`` reshape.
    """
    if not pretrained and is_model_type(model):
        return config_from_model_type(model, overrides=overrides), None
    source = resolve_model_source(model, gguf_file=gguf_file, weights=pretrained)
    config = load_config(source, overrides=overrides)
    if not pretrained:
        return config, None
    if not source.has_weights:
        raise ConfigError(
            f"{model!r} has a config but no safetensors weights. Fix: point model at a folder with weights, or set "
            "pretrained: false to train from a random init."
        )
    return config, source.folder


def is_model_type(name: str) -> bool:
    """True when ``name`` is a registered transformers model type rather than a path or hub id."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return name in CONFIG_MAPPING and not Path(name).expanduser().exists()


#: Config fields that some config classes leave unset unless given, and that their models read when set.
_OPTIONAL_CONFIG_KEYS = {"head_dim"}


def _apply_overrides(config: Any, overrides: dict[str, Any] | None) -> Any:
    """Rebuild ``config`` with ``overrides`` so that fields derived in ``__init__`` follow them.

    Setting attributes afterwards would leave derived fields stale: e.g. ``layer_types`` keeps the old layer count
    when ``num_hidden_layers`` changes, and building the model then fails or mis-assigns attention types.
    """
    overrides = dict(overrides or {})
    # head_dim: optional in some configs (Qwen3-MoE's), read by attention when present (Qwen3-30B-A3B sets 128).
    unknown = sorted(key for key in overrides if not hasattr(config, key) and key not in _OPTIONAL_CONFIG_KEYS)
    if unknown:
        raise AttributeError(
            f"config overrides {unknown}: {type(config).__name__} has no such attributes (check the spelling; "
            "transformers 5 keeps RoPE settings under 'rope_parameters')."
        )
    # Converted or fine-tuned folders sometimes carry a quantization section that would make transformers quantize.
    data = {k: v for k, v in config.to_dict().items() if k != "quantization_config"}
    if overrides:
        # An alias (Qwen3-MoE's num_experts for num_local_experts) must replace the canonical key that to_dict()
        # wrote, or the old value would win when the config is rebuilt.
        aliases = getattr(config, "attribute_map", {}) or {}
        overrides = {aliases.get(key, key): value for key, value in overrides.items()}
        _merge_overrides(data, overrides)
    return type(config).from_dict(data)


def _merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Update ``data`` in place; a nested section (``text_config``, ``vision_config``) is updated key by key.

    So ``{text_config: {num_hidden_layers: 4}}`` changes one field of a multimodal config and keeps the rest.
    """
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        data.pop("layer_types", None)  # re-derived by the constructor for the new depth
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            _merge_overrides(data[key], value)
        else:
            data[key] = value
