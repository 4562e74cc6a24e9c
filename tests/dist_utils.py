"""Run a function on N CPU processes over gloo and collect what each rank returns.

Used by the multi-process tests. Each worker gets the environment variables that torchrun would set
(so Lightning's ``LightningEnvironment`` sees externally created processes), one intra-op thread, and a
result file; a failure in any rank is re-raised in the test with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world_size: int, port: int, args: tuple, out_dir: str, init_pg: bool) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        if init_pg:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"{rank}.pt")
        if dist.is_initialized():
            # No rank tears its process group down while a peer is still finishing its last collective: under load,
            # gloo aborts (SIGABRT) a rank whose peer closed the connection early.
            dist.barrier()
    except BaseException:
        (Path(out_dir) / f"{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0, init_process_group: bool = True
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return the per-rank results.

    ``fn`` must be a module-level function (it is pickled by name). With ``init_process_group=False`` the
    function sets up distribution itself (e.g. a Lightning Trainer, which reads the torchrun-style variables).
    Results travel through ``torch.save`` files, so return tensors, numbers, lists and dicts of them.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, port, args, out_dir, init_process_group))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = {r: (Path(out_dir) / f"{r}.err") for r in range(world_size)}
        messages = [f"--- rank {r} ---\n{path.read_text()}" for r, path in errors.items() if path.exists()]
        if messages:
            raise RuntimeError("distributed worker failed:\n" + "\n".join(messages))
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout}s (a hung collective?)")
        bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"ranks {bad} exited with codes {[procs[r].exitcode for r in bad]}")
        return [torch.load(Path(out_dir) / f"{r}.pt", weights_only=True) for r in range(world_size)]
