"""Resume on a different layout: a DCP checkpoint written by one data × sequence-parallel layout resumes under
another and the loss curve continues as if nothing had changed (same global batches, same order, same optimizer
state). Down: 4 ranks (dp=2 × sp=2) → 2 ranks (dp=2) → 1 process; up: 1 process → 2 ranks (sp=2) → 4 ranks (dp=2 ×
sp=2). The global batch is 2 micro-batches per step everywhere (one process accumulates 2). A resume that would change
the global batch is refused with both sizes and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_utils import run_distributed
from e2e_helpers import fit_tiny

GLOBAL_MICRO_BATCHES = 2
STEPS = 4


def _segment(rank: int, world: int, assets: dict, sp: int, stop: int, ckpt_dir: str, resume: str | None) -> dict:
    dp = world // sp
    _, _, losses, norms = fit_tiny(
        assets["qwen3"],
        assets["tokenizer"],
        assets["data"],
        devices=world,
        sp=sp,
        grad_accum=GLOBAL_MICRO_BATCHES // dp,
        steps=STEPS,  # the schedule's horizon stays that of the uninterrupted run
        stop_after=stop,
        save_every=1,
        ckpt_dir=ckpt_dir,
        ckpt_path=resume,
    )
    return {"losses": losses, "grad_norms": norms}


def _run(world: int, *args) -> dict:
    return run_distributed(_segment, world, *args, timeout=240, init_process_group=False)[0]


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory) -> dict:
    """One process, uninterrupted."""
    return _run(1, tiny_assets, 1, STEPS, str(tmp_path_factory.mktemp("ref")), None)


@pytest.mark.parametrize(
    "chain",
    [[(4, 2), (2, 1), (1, 1)], [(1, 1), (2, 2), (4, 2)]],
    ids=["dp2xsp2_to_dp2_to_1", "1_to_sp2_to_dp2xsp2"],
)
def test_resume_on_another_layout_continues_the_loss_curve(reference, tiny_assets, tmp_path, chain):
    # Segment i runs to step i + 2 (steps 1-2, then 3, then 4), resuming from the previous segment's last checkpoint.
    ckpts = tmp_path / "ckpt"
    resume, got_losses, got_norms = None, [], []
    for i, (world, sp) in enumerate(chain):
        end = i + 2
        out = _run(world, tiny_assets, sp, end, str(ckpts), resume)
        got_losses += out["losses"]
        got_norms += out["grad_norms"]
        resume = str(ckpts / f"epoch=0-step={end}.ckpt")
        assert Path(resume).is_dir()
    assert got_losses == pytest.approx(reference["losses"], rel=1e-4)
    assert got_norms == pytest.approx(reference["grad_norms"], rel=1e-4)


def test_resume_that_changes_the_global_batch_is_refused(tiny_assets, tmp_path):
    ckpts = tmp_path / "ckpt"
    _run(1, tiny_assets, 1, 1, str(ckpts), None)

    with pytest.raises(RuntimeError, match=r"2 micro-batches per step .* 1 × 1 = 1\. Fix: set grad_accum_steps=2"):
        run_distributed(_refused, 1, tiny_assets, str(ckpts / "epoch=0-step=1.ckpt"), init_process_group=False)


def _refused(rank: int, world: int, assets: dict, resume: str) -> None:
    fit_tiny(assets["qwen3"], assets["tokenizer"], assets["data"], devices=1, grad_accum=1, steps=2, ckpt_path=resume)
