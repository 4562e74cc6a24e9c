"""Atomic checkpoint writes shared by the Trainer and Fabric strategies.

A checkpoint (a DCP folder or a single file) is first written next to its final path, then swapped in by rank 0
once every rank has reported a successful write. A save that fails on any rank fails on every rank at once (no
rank is left waiting for a process-group timeout) and leaves the previous checkpoint at ``path`` intact.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from veomni_lightning.models.export import apply_default_modes

__all__ = ["load_trainable_checkpoint", "write_atomically"]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _attempt(step: Callable[[], None]) -> BaseException | None:
    """Run ``step``; return what it raised instead of raising, so this rank can still take part in the vote."""
    try:
        step()
    except BaseException as e:  # recorded, not swallowed: `_vote` re-raises it once every rank knows
        return e
    return None


def _vote(
    all_ok: Callable[[bool], bool],
    error: BaseException | None,
    others: str,
    on_failure: Callable[[], None] | None = None,
) -> None:
    """Every rank reports whether its step succeeded; if any failed, every rank raises (cleaning up first).

    The rank that failed raises its own exception, the others a ``RuntimeError(others)``.
    """
    try:
        everyone_ok = all_ok(error is None)
    except BaseException:
        if error is None:
            raise
        everyone_ok = False  # the collective broke too; this rank's own failure is the one to report
    if everyone_ok:
        return
    if on_failure is not None:
        with contextlib.suppress(OSError):  # best effort: a cleanup problem must not mask the failure itself
            on_failure()
    if error is not None:
        raise error
    raise RuntimeError(others)


def write_atomically(path: Path, write: Callable[[Path], None], *, rank: int, all_ok: Callable[[bool], bool]) -> None:
    """Call ``write(tmp_path)`` on every rank, then move ``tmp_path`` to ``path`` replacing what was there.

    ``all_ok(local_ok)`` must be a collective over all ranks that returns True only if every rank passed True
    (a strategy's ``lambda ok: strategy.reduce_boolean_decision(ok, all=True)``; ``lambda ok: ok`` for one
    process). It is called three times on every rank, in the same order, and also serves as the barrier; a rank
    whose step raised still takes part, so a failure on any rank fails every rank at once:

    1. after rank 0 removed any stale temporary path and created the parent folder;
    2. after writing: each rank reports whether its ``write`` succeeded. If any failed, rank 0 removes the partial
       temporary path and every rank raises: the failing rank its own exception, the others a ``RuntimeError``
       saying another rank failed. ``path`` (the last good checkpoint) is untouched;
    3. after rank 0 swapped the temporary path in (old checkpoint moved aside, temporary renamed, old removed). If
       the swap fails, rank 0 puts the old checkpoint back and every rank raises.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")

    def prepare() -> None:
        _remove(tmp)
        path.parent.mkdir(parents=True, exist_ok=True)

    def swap() -> None:
        apply_default_modes(tmp)
        _remove(old)
        try:
            if path.exists():
                path.rename(old)
            tmp.rename(path)
        except BaseException:
            with contextlib.suppress(OSError):  # put the previous checkpoint back, drop the new one
                if not path.exists() and old.exists():
                    old.rename(path)
                _remove(tmp)
            raise
        with contextlib.suppress(OSError):  # a leftover is harmless: the next save removes it first
            _remove(old)

    _vote(
        all_ok,
        _attempt(prepare) if rank == 0 else None,
        f"rank 0 could not prepare {tmp}; checkpoint {path} was not written.",
    )
    _vote(
        all_ok,
        _attempt(lambda: write(tmp)),
        f"another rank failed to write checkpoint {path}; nothing was replaced, the previous checkpoint there "
        f"(if any) is intact.",
        on_failure=(lambda: _remove(tmp)) if rank == 0 else None,
    )
    _vote(
        all_ok, _attempt(swap) if rank == 0 else None, f"rank 0 failed to move the new checkpoint into place at {path}."
    )


def load_trainable_checkpoint(
    path: Path, model: nn.Module, optimizers: list[Any], names: set[str], weights_only: bool | None = None
) -> dict[str, Any]:
    """Load a sharded (DCP) checkpoint that holds only the ``names`` parameters (LoRA adapters) and the optimizers.

    The layout Lightning's ``ModelParallelStrategy`` writes (``state_dict``, ``optimizer_<i>``, a metadata file); the
    other parameters (the frozen base) keep what the module loaded at setup. Returns the metadata (loop state).
    """
    import torch.distributed.checkpoint as dcp
    from lightning.fabric.utilities.load import _METADATA_FILENAME
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {name: value for name, value in get_model_state_dict(model).items() if name in names}
    if not state:
        raise ValueError(f"{path}: the model has none of the parameters a trainable-only checkpoint holds.")
    dcp.load({"state_dict": state}, checkpoint_id=path)
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))
    for i, optimizer in enumerate(optimizers):
        optim_state = {f"optimizer_{i}": get_optimizer_state_dict(model, optimizer)}
        dcp.load(optim_state, checkpoint_id=path)
        set_optimizer_state_dict(
            model, optimizer, optim_state_dict=optim_state[f"optimizer_{i}"], options=StateDictOptions(cpu_offload=True)
        )
    return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
