"""CPU smoke test of ``bench/nccl_equivalence.py``: ``prepare`` one VLM family, then ``run --device cpu`` (gloo, fp32)
with dp=2 and sp=2 against one process; the files the GPU run will write say pass, with the plan's media per rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "nccl_equivalence.py"


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_prepare_then_run_on_cpu_passes_and_writes_the_report(tmp_path):
    assets, out = tmp_path / "assets", tmp_path / "out"
    proc = _script("prepare", "--dir", str(assets), "--families", "qwen2_5_vl", timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((assets / "qwen2_5_vl" / "manifest.json").read_text())
    assert manifest["module_cls"] == "VLMModule" and (assets / "qwen2_5_vl" / "model" / "config.json").is_file()

    proc = _script("run", "--dir", str(assets), "--out", str(out), "--name", "smoke", "--device", "cpu",
                   "--families", "qwen2_5_vl", "--layouts", "dp2", "sp2", "--timeout", "120", timeout=280)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "smoke.json").read_text())
    assert report["passed"] and report["tolerance"] == {"losses": 1e-4, "grad_norms": 1e-4}
    (family,) = report["families"]
    assert family["passed"] and set(family["layouts"]) == {"dp2", "sp2"}
    for layout in family["layouts"].values():
        assert layout["passed"] and layout["max_rel_losses"] <= 1e-4 and layout["max_rel_grad_norms"] <= 1e-4
        assert all(len(rank["losses"]) == 3 for rank in layout["ranks"])
    step0 = family["plan"]["steps"][0]
    assert step0[0]["media"] == ["image", "video"] and step0[1]["media"] == []  # rank 0 media, rank 1 text only
    assert family["plan"]["check"] == {"rank_asymmetric": True}
    md = (out / "smoke.md").read_text()
    assert "| qwen2_5_vl | dp2 |" in md and "| qwen2_5_vl | 0 | 3 samples: image + video | 3 samples: text only |" in md
    assert "Overall: PASS" in md
