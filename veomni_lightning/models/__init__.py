"""Model sources, meta-device construction, sharded weight loading / random init, and HF folder export."""

from .export import export_hf_folder, write_hf_folder
from .loading import build_model_on_meta, init_random_weights, load_pretrained_weights, materialize_model
from .source import (
    ModelSource,
    config_from_model_type,
    is_model_type,
    load_config,
    resolve_model_source,
    resolve_package_path,
)

__all__ = [
    "ModelSource",
    "build_model_on_meta",
    "config_from_model_type",
    "is_model_type",
    "export_hf_folder",
    "init_random_weights",
    "load_config",
    "load_pretrained_weights",
    "materialize_model",
    "resolve_model_source",
    "resolve_package_path",
    "write_hf_folder",
]
