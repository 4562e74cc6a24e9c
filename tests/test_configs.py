"""Every shipped LightningCLI config names a model whose config builds, with override keys that exist."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForImageTextToText

from veomni_lightning.models import config_from_model_type, is_model_type, load_config
from veomni_lightning.models.loading import build_model_on_meta
from veomni_lightning.modules.metrics import count_parameters

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))
# Parameter counts (incl. lm_head, tied embeddings once) of the shapes the GPU recipes name, within 2%.
EXPECTED_PARAMS = {
    "qwen3_0.6b_sft": 0.596e9,
    "qwen3_1.7b_sft": 1.72e9,
    "qwen3_8b_sft": 8.19e9,
    "llama3_8b_sft": 8.03e9,
    "qwen3_30b_a3b_sft": 30.5e9,  # Qwen3-30B-A3B: 30.5B in all, 3.3B active
    "qwen2_5_vl_7b_sft": 8.29e9,  # Qwen2.5-VL-7B-Instruct (language model + vision tower)
    "qwen3_vl_2b_sft": 2.13e9,
    "qwen3_vl_8b_sft": 8.77e9,
    "qwen2_5_omni_7b_sft": 8.93e9,  # the Qwen2.5-Omni-7B thinker (language model + vision and audio towers)
    "qwen2_5_omni_3b_sft": 4.39e9,
}


def test_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"tiny_qwen3_cpu", "smollm2_135m_cpu", "qwen2_5_omni_tiny_cpu", *EXPECTED_PARAMS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_model_shape_builds(path: Path):
    cfg = yaml.safe_load(path.read_text())
    args = cfg["model"]["init_args"]
    assert cfg["trainer"]["strategy"]["class_path"] == "veomni_lightning.strategies.VeOmniStrategy"
    if cfg["model"]["class_path"].endswith("DiTModule"):
        # A diffusers folder (or hub id) whose transformer config must build with the overrides.
        _check_dit_config(args)
        return
    if args.get("pretrained", True) or not is_model_type(args["model"]):
        # Shipped configs only use artifacts that ship in packages, or a tiny model folder in this repository.
        folder = Path(__file__).parent.parent / args["model"]
        assert args["model"].startswith("package:") or (folder / "config.json").is_file(), args["model"]
        return
    config = config_from_model_type(args["model"], args.get("config_overrides"))
    auto_class = AutoModelForImageTextToText if hasattr(config, "vision_config") else None
    model = build_model_on_meta(config, attn_implementation="ulysses", auto_class=auto_class)
    if path.stem in EXPECTED_PARAMS:
        assert count_parameters(model) == pytest.approx(EXPECTED_PARAMS[path.stem], rel=0.02)


def test_nested_overrides_change_one_field():
    """``{text_config: {num_hidden_layers: 1}}`` changes that field of a VLM config and keeps its other fields."""
    folder = Path(__file__).parent.parent / "configs/vlm/tiny_qwen3_vl"
    base = load_config(str(folder))
    config = load_config(str(folder), {"text_config": {"num_hidden_layers": 1}})
    assert config.text_config.num_hidden_layers == 1
    assert config.text_config.hidden_size == base.text_config.hidden_size
    assert config.text_config.rope_parameters == base.text_config.rope_parameters
    assert config.vision_config.to_dict() == base.vision_config.to_dict()


def _check_dit_config(args: dict) -> None:
    from diffusers import WanTransformer3DModel

    from veomni_lightning.models.loading import params_on_meta

    folder = Path(__file__).parent.parent / args["model"]
    if not folder.is_dir():  # a GPU recipe names a hub folder: org/name, nothing local to check
        assert args["model"].count("/") == 1 and not args["model"].startswith((".", "/")), args["model"]
        return
    config = dict(WanTransformer3DModel.load_config(folder / "transformer"))
    config.update(args.get("config_overrides") or {})
    with params_on_meta():
        WanTransformer3DModel.from_config(config)
    assert (folder / "vae" / "config.json").is_file() and (folder / "text_encoder" / "config.json").is_file()
