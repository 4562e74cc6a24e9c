"""Atomic checkpoint writes shared by the Trainer and Fabric strategies.

A checkpoint (a DCP folder or a single file) is first written next to its final path, then swapped in by rank 0
once every rank has finished writing. A save that fails part-way leaves the previous checkpoint at ``path`` intact.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomically"]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_atomically(path: Path, write: Callable[[Path], None], *, rank: int, barrier: Callable[[], None]) -> None:
    """Call ``write(tmp_path)`` on every rank, then move ``tmp_path`` to ``path`` replacing what was there.

    ``barrier`` must synchronise all ranks; it is called so that rank 0 only swaps after every shard is written.
    If ``write`` raises on any rank, that rank removes the partial temporary path and re-raises; ``path`` is left
    untouched (the other ranks then wait at the barrier until the process group's timeout, as with any failed
    collective).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    if rank == 0:
        _remove(tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
    barrier()
    try:
        write(tmp)
    except BaseException:
        _remove(tmp)  # a partial shard folder must not linger next to the good checkpoint
        raise
    barrier()
    if rank == 0:
        _remove(old)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        _remove(old)
    barrier()
