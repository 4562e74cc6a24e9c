"""The recipe notebooks (``recipes/**/*.ipynb``) are stored without outputs and run top to bottom.

Every notebook found is executed with ``nbclient`` in a fresh ``python3`` kernel (this interpreter), in a temporary
working directory, with ``VEOMNI_RECIPE_OUT`` pointing at a temporary output folder it must write to. A cell error
fails the test with that cell's source and traceback; the executed copy (with outputs) is kept next to the outputs.
Notebooks with an entry in ``RESULT_CHECKS`` also have their results checked (loss went down, the export loads, ...).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
NOTEBOOKS = sorted(p for p in RECIPES.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
CELL_TIMEOUT_S = 900  # one cell; the training cell of finetune_smollm2_news takes ~1-3 minutes on 2 CPU cores
KERNEL = "python3"  # jupyter_client maps it to ipykernel in this interpreter when ipykernel is installed
STRIP_FIX = (
    "Fix: `jupyter nbconvert --clear-output --inplace {path}` (or `nbstripout {path}`) before committing; "
    "also make sure the output is not saved by your editor."
)


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(RECIPES)) for p in paths]


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no *.ipynb under {RECIPES}"


# ------------------------------------------------------------------------------------------ stored without outputs
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_without_outputs(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))  # plain json: this check needs no jupyter package
    dirty = [
        i
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    rel = path.relative_to(RECIPES.parent)
    assert not dirty, f"{rel} is stored with outputs or execution counts (cells {dirty}). " + STRIP_FIX.format(path=rel)


# ------------------------------------------------------------------------------------------ execution
def _execute(path: Path, workdir: Path, out: Path, monkeypatch: pytest.MonkeyPatch):
    """Run ``path`` in a fresh kernel with cwd ``workdir``; return the executed notebook (outputs included)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel", reason="the notebooks run in an ipykernel kernel: pip install -e '.[dev]'")
    from nbclient.exceptions import CellExecutionError

    # The kernel inherits this environment: offline hub, headless matplotlib, and where to write.
    monkeypatch.setenv("VEOMNI_RECIPE_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # silence debugpy's frozen-modules note
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL, resources={"metadata": {"path": str(workdir)}}
    )
    executed = out.parent / f"{path.stem}.executed.ipynb"  # kept for inspection, outputs included
    executed.parent.mkdir(parents=True, exist_ok=True)
    error = None
    try:
        client.execute()
    except CellExecutionError as err:
        error = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # the kernel's traceback comes with ANSI colours
    finally:
        nbformat.write(nb, executed)
    if error is not None:  # failed outside the except block: the report shows the cell, not nbclient's internals
        failing = [
            i for i, c in enumerate(nb.cells) if any(o.get("output_type") == "error" for o in c.get("outputs", []))
        ]
        pytest.fail(
            f"{path.relative_to(RECIPES.parent)}: cell {failing[0] if failing else '?'} raised "
            f"(executed copy: {executed}):\n{error}",
            pytrace=False,
        )
    return nb


def _outputs(nb, output_type: str | None = None) -> list[dict]:
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return [o for o in outs if output_type is None or o.get("output_type") == output_type]


def _check_finetune_smollm2_news(nb, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = json.loads((out / "summary.json").read_text())
    train, val = summary["train_losses"], summary["val_losses"]
    assert len(train) == summary["steps"] and all(math.isfinite(x) for x in train), train
    # The held-out loss (same unseen articles each time, step 0 = before training) must go down: a run that did
    # not train (same loss) or was broken by the update (higher loss) fails here. Train losses are per-batch noisy.
    assert summary["val_steps"][0] == 0 and summary["val_steps"][-1] == summary["steps"], summary["val_steps"]
    assert all(math.isfinite(x) for x in val), val
    assert val[-1] < val[0] - 0.02, f"held-out loss did not go down: {val}"
    assert summary["generated"].strip(), "the export generated nothing"

    # The loss curve is shown inline as a PNG and saved.
    assert any("image/png" in o.get("data", {}) for o in _outputs(nb, "display_data")), "no inline PNG plot"
    assert (out / "loss.png").stat().st_size > 0

    # The export is a plain Hugging Face folder.
    hf = out / "hf"
    assert Path(summary["hf_dir"]) == hf and (hf / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok("Firefighters are battling a blaze in the Blue Mountains west of Sydney.", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert math.isfinite(float(loss))


def _check_train_tiny_moe(nb, out: Path) -> None:
    summary = json.loads((out / "summary.json").read_text())
    losses, aux = summary["losses"], summary["aux"]
    assert len(losses) == len(aux) == summary["steps"] == len(summary["ep2_losses"]), summary
    assert all(math.isfinite(x) for x in losses + aux + summary["ep2_losses"])
    assert losses[-1] < losses[0] - 1.0, f"the tiny MoE did not learn: {losses}"
    # aux is E · Σ f·P per layer: top_k (2) when balanced, at most E (8).
    assert all(1.9 < a < 8.0 for a in aux), aux
    ratios = summary["max_over_mean"]
    assert sorted(ratios) == ["layer_0", "layer_1"] and all(r >= 1.0 for v in ratios.values() for r in v), ratios
    # The 2-process ep=2 CLI run follows the same curve (its balancing statistics span 2 micro-batches at once).
    assert summary["cross_entropy_max_relative_difference"] < 1e-3, summary
    assert any("image/png" in o.get("data", {}) for o in _outputs(nb, "display_data")), "no inline PNG plot"


def _check_train_tiny_vlm(nb, out: Path) -> None:
    summary = json.loads((out / "summary.json").read_text())
    losses = summary["losses"]
    assert len(losses) == summary["steps"] and all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, f"the tiny VLM did not learn: {losses}"
    assert summary["export_weight_difference"] == 0.0, summary
    pngs = [o for o in _outputs(nb, "display_data") if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3, "expected the rows, the positions and the loss curve as inline pictures"
    assert (out / "hf" / "config.json").is_file() and (out / "rows.png").stat().st_size > 0


def _check_train_tiny_omni(nb, out: Path) -> None:
    summary = json.loads((out / "summary.json").read_text())
    losses = summary["losses"]
    assert len(losses) == summary["steps"] and all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, f"the tiny omni model did not learn: {losses}"
    assert summary["export_weight_difference"] == 0.0, summary
    assert 10 < summary["speech_seconds"] < 12, summary  # codec2's speech_orig_16k.wav, decoded whole
    pngs = [o for o in _outputs(nb, "display_data") if "image/png" in o.get("data", {})]
    assert len(pngs) >= 4, "expected the rows, the speech, the positions and the loss curve as inline pictures"
    assert (out / "hf" / "config.json").is_file() and (out / "speech.png").stat().st_size > 0


def _check_train_tiny_wan(nb, out: Path) -> None:
    summary = json.loads((out / "summary.json").read_text())
    losses = summary["losses"]
    assert len(losses) == summary["steps"] and all(math.isfinite(x) and x > 0 for x in losses), losses
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, f"the tiny DiT did not learn: {losses}"
    assert summary["sample_shape"] == [5, 48, 80, 3], summary
    assert "manifest.json" in summary["cache_files"] and any(f.startswith("shard-") for f in summary["cache_files"])
    pngs = [o for o in _outputs(nb, "display_data") if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3, "expected the clip's frames, the loss curve and the sampled clip as inline pictures"
    assert (out / "transformer" / "config.json").is_file()


def _check_lora_smollm2_news(nb, out: Path) -> None:
    summary = json.loads((out / "summary.json").read_text())
    val = summary["val_losses"]
    assert len(summary["train_losses"]) == summary["steps"] and val[-1] < val[0] - 0.02, summary
    assert 0 < summary["trainable_params"] < 0.1 * summary["total_params"], summary
    assert summary["adapter_files"] == ["adapter_config.json", "adapter_model.safetensors"], summary
    assert summary["adapter_mib"] < 20, summary  # the adapters only, not the 135M-parameter model
    assert summary["peft_vs_merged_max_logit_difference"] < 1e-3 < summary["adapter_effect"], summary
    assert summary["after"] == summary["after_merged"] and all(summary["before"] + summary["after"]), summary
    assert any("image/png" in o.get("data", {}) for o in _outputs(nb, "display_data")), "no inline PNG plot"


RESULT_CHECKS: dict[str, Callable] = {
    "lora_smollm2_news": _check_lora_smollm2_news,
    "train_tiny_wan": _check_train_tiny_wan,
    "train_tiny_vlm": _check_train_tiny_vlm,
    "train_tiny_omni": _check_train_tiny_omni,
    "finetune_smollm2_news": _check_finetune_smollm2_news,
    "train_tiny_moe": _check_train_tiny_moe,
}


@pytest.mark.slow
@pytest.mark.timeout(2 * CELL_TIMEOUT_S)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    workdir, out = tmp_path / "cwd", tmp_path / "out" / path.stem
    workdir.mkdir()
    nb = _execute(path, workdir, out, monkeypatch)
    check = RESULT_CHECKS.get(path.stem)
    if check is not None:
        check(nb, out)
    stray = sorted(p.name for p in workdir.iterdir())
    assert not stray, f"the notebook wrote {stray} into its working directory; write under $VEOMNI_RECIPE_OUT"


def test_kernel_is_this_python(tmp_path: Path):
    """The ``python3`` kernel nbclient starts runs this interpreter (not another Python on PATH)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name=KERNEL, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    printed = "".join(o.get("text", "") for o in nb.cells[0].outputs).strip()
    assert os.path.realpath(printed) == os.path.realpath(sys.executable), (
        f"the {KERNEL!r} kernel runs {printed}, not {sys.executable}: a {KERNEL} kernelspec elsewhere "
        "(`jupyter kernelspec list`) points at another Python. Fix: remove it, or run "
        "`python -m ipykernel install --sys-prefix` with this Python."
    )
