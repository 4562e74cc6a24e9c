"""``bench/vlm_throughput.py`` end to end on CPU: plain HF (a) and ours (c) on two processes (dp=2, and sp=2), pictures
and a real video clip in the stream, train identically; the 7B bench shape is the shipped recipe's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_qwen2_5_vl_7b_bench_shape_is_the_recipes():
    """The bench measures the shape the 7B recipe trains: read from the recipe, it builds the 8.29B parameters that
    test_configs checks for the recipe."""
    sys.path.insert(0, str(REPO / "bench"))
    import vlm_throughput
    from transformers import AutoConfig, AutoModelForImageTextToText

    shape = vlm_throughput.SHAPES["qwen2.5-vl-7b"]
    config = AutoConfig.for_model(shape["family"], text_config=shape["text"], vision_config=shape["vision"],
                                  tie_word_embeddings=shape["tie_word_embeddings"])  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 8_292_166_656


@pytest.mark.timeout(300)
def test_vlm_bench_two_processes_with_video_train_like_plain_hf(tmp_path):
    from e2e_helpers import lee_text_path
    from vlm_assets import media_files

    media = media_files()
    images = tmp_path / "images"
    images.mkdir()
    for name in ("cat", "coffee", "astronaut", "china"):
        (images / media[name].name).symlink_to(media[name])
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "bench" / "vlm_throughput.py"), "--shape", "qwen2.5-vl-tiny", "--gpus", "2",
           "--images", str(images), "--video", str(media["video"]), "--text", str(lee_text_path()), "--seq", "1024",
           "--image-tokens", "16", "--video-tokens", "16", "--rows", "60", "--steps", "3", "--warmup", "1",
           "--dtype", "fp32", "--lr", "1e-3", "--runs", "a", "c:compile=0", "c:compile=0:sp=2", "--out", str(out),
           "--name", "smoke"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "smoke.json").read_text())
    rows, meta = result["rows"], result["meta"]
    assert [(r["run"], r["status"], r["gpus"]) for r in rows] == [
        ("a", "ok", 1), ("c:compile=0", "ok", 2), ("c:compile=0:sp=2", "ok", 2)
    ], rows  # fmt: skip
    # Every step holds 2 micro-batches (one per dp rank) and, over the run, video rows beside pictures.
    assert meta["tokens_per_step"] == [2 * 1024] * 3 and sum(meta["videos_per_step"]) > 0
    assert all(p > v > 0 for p, v in zip(meta["patches_per_step"], meta["video_patches_per_step"]) if v)
    losses = {r["run"]: torch.tensor(r["losses"]) for r in rows}
    assert len(losses["a"]) == 3 and losses["a"][-1] < losses["a"][0]
    for run in ("c:compile=0", "c:compile=0:sp=2"):
        torch.testing.assert_close(losses[run], losses["a"], rtol=1e-4, atol=0)
    by_run = {r["run"]: r for r in rows}
    # Per GPU: (c) splits the step over its 2 processes, (a) trains all of it on 1.
    for r in rows:
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / r["gpus"])
    assert by_run["c:compile=0"]["fsdp_units"] > 1
    table = (out / "smoke.md").read_text()
    assert "| c:compile=0:sp=2 | 2 |" in table and "a video every 4 rows" in table
    assert (out / "smoke.log").read_text().count("--- smoke_") == 3  # one log of every run's processes
