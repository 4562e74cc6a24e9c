"""Model adapters and what they are built from: sources, meta-device construction, sharded loading, export.

The adapters (``adapters.py``) are what the training core and the parallel core know of a transformers, diffusers or
plain torch model; ``causal_lm.py`` is the text family's loss head.
"""

from .adapters import DiffusersAdapter, ModelAdapter, TransformersAdapter, adapter_for, blocks_by_class_name
from .export import export_hf_folder, write_hf_folder
from .loading import build_model_on_meta, init_random_weights, load_pretrained_weights, materialize_model
from .source import (
    ModelSource,
    config_from_model_type,
    is_model_type,
    load_config,
    model_config_and_weights,
    resolve_model_source,
    resolve_package_path,
)

__all__ = [
    "DiffusersAdapter",
    "ModelAdapter",
    "ModelSource",
    "TransformersAdapter",
    "adapter_for",
    "blocks_by_class_name",
    "build_model_on_meta",
    "config_from_model_type",
    "is_model_type",
    "export_hf_folder",
    "init_random_weights",
    "load_config",
    "load_pretrained_weights",
    "materialize_model",
    "model_config_and_weights",
    "resolve_model_source",
    "resolve_package_path",
    "write_hf_folder",
]
