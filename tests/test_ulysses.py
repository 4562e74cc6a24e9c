"""Ulysses primitives: values and gradients against a single-process reference on the full tensor."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from veomni_lightning.parallel.ulysses import heads_to_seq, seq_to_heads


def _full(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _check_all_to_all(rank: int, world: int, seq_dim: int, head_dim: int) -> None:
    """seq_to_heads / heads_to_seq on one layout: forward values, round trip and gradients."""
    group = dist.group.WORLD
    shape = [2, 2, 2, 3]
    shape[seq_dim], shape[head_dim] = 4 * world, 2 * world  # 4 tokens and 2 heads per rank
    x, w = _full(0, tuple(shape)), _full(1, tuple(shape))
    s, h = shape[seq_dim] // world, shape[head_dim] // world
    seq_r, heads_r = slice(rank * s, (rank + 1) * s), slice(rank * h, (rank + 1) * h)

    def sl(t: torch.Tensor, dim: int, idx: slice) -> torch.Tensor:
        return t.narrow(dim, idx.start, idx.stop - idx.start)

    # seq_to_heads: local sequence, all heads -> full sequence, local heads.
    local = sl(x, seq_dim, seq_r).clone().requires_grad_()
    y = seq_to_heads(local, group, seq_dim, head_dim)
    torch.testing.assert_close(y, sl(x, head_dim, heads_r), rtol=0, atol=0)
    torch.testing.assert_close(heads_to_seq(y, group, seq_dim, head_dim), local, rtol=0, atol=0)
    # Loss summed over ranks = sum(sin(x) * w) on the full tensor, whose gradient is cos(x) * w.
    (torch.sin(y) * sl(w, head_dim, heads_r)).sum().backward()
    torch.testing.assert_close(local.grad, sl(torch.cos(x) * w, seq_dim, seq_r))

    # heads_to_seq: full sequence, local heads -> local sequence, all heads.
    heads = sl(x, head_dim, heads_r).clone().requires_grad_()
    z = heads_to_seq(heads, group, seq_dim, head_dim)
    torch.testing.assert_close(z, sl(x, seq_dim, seq_r), rtol=0, atol=0)
    (torch.sin(z) * sl(w, seq_dim, seq_r)).sum().backward()
    torch.testing.assert_close(heads.grad, sl(torch.cos(x) * w, head_dim, heads_r))


def _primitives_worker(rank: int, world: int) -> None:
    group = dist.group.WORLD
    _check_all_to_all(rank, world, seq_dim=1, head_dim=2)  # [B, S, H, D], the layout attention uses
    _check_all_to_all(rank, world, seq_dim=2, head_dim=1)  # [B, H, S, D], HF's layout
    _check_all_to_all(rank, world, seq_dim=-3, head_dim=-2)  # negative dims

    with pytest.raises(ValueError, match="split evenly"):
        seq_to_heads(torch.zeros(1, 4, world + 1, 2), group, seq_dim=1, head_dim=2)


@pytest.mark.parametrize("world", [2, 4])
def test_primitives_match_single_process(world: int) -> None:
    run_distributed(_primitives_worker, world)


def test_identity_without_group() -> None:
    x = torch.randn(2, 6, 4, 3)
    for fn in (seq_to_heads, heads_to_seq):
        assert fn(x, None, 1, 2) is x
