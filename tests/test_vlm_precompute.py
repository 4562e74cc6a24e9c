"""The vision tower's host-side precomputed inputs equal what transformers computes from the batched grid.

``VisionLanguageAdapter.precomputed_vision_kwargs`` builds the segment offsets in plain Python and the rotary position
ids and position-table resampling (Qwen3-VL) from per-image cached tables; the batched functions of
``transformers.vision_utils`` (what the tower would run itself) are the reference. Grids mix sizes, a repeated
grid (served from the cache) and a two-frame video.
"""

from __future__ import annotations

import pytest
import torch

from veomni_lightning.models.vision_language import VisionLanguageAdapter

vision_utils = pytest.importorskip("transformers.vision_utils")

GRIDS = [[1, 4, 6], [1, 8, 8], [2, 4, 4], [1, 4, 6], [1, 2, 2]]


def _tiny_model(family: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForImageTextToText

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})  # fmt: skip
    if family == "qwen2_5_vl":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])  # fmt: skip
    else:
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])  # fmt: skip
    config = AutoConfig.for_model(family, text_config=text, vision_config=vision)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_precomputed_vision_kwargs_match_transformers(family: str) -> None:
    model = _tiny_model(family)
    adapter = VisionLanguageAdapter()
    tower = adapter.vision_tower(model)
    got = adapter.precomputed_vision_kwargs(model, GRIDS, torch.device("cpu"))
    grid = torch.tensor(GRIDS)
    cu = vision_utils.get_vision_cu_seqlens(grid)
    assert got["cu_seqlens"].dtype == cu.dtype and torch.equal(got["cu_seqlens"], cu)
    assert got["max_seqlen"] == int((cu[1:] - cu[:-1]).max())
    assert torch.equal(got["position_ids"], vision_utils.get_vision_position_ids(grid, tower.spatial_merge_size))
    if family == "qwen3_vl":
        indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
            align_corners=tower.interpolation_align_corners, spatial_merge_size=tower.spatial_merge_size,
        )  # fmt: skip
        assert torch.equal(got["interp_indices"], indices)
        assert got["interp_weights"].dtype == weights.dtype and torch.equal(got["interp_weights"], weights)
    else:
        assert "interp_indices" not in got and "window_index" in got
    # The cached per-image tables are shared read-only; the batch's tensors are fresh and writable.
    got["position_ids"].add_(1)
    again = adapter.precomputed_vision_kwargs(model, GRIDS, torch.device("cpu"))
    assert torch.equal(again["position_ids"], vision_utils.get_vision_position_ids(grid, tower.spatial_merge_size))
