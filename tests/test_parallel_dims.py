"""ParallelDims layout validation, the named sub-meshes over 4 gloo processes, the Lightning wiring of the layout
check, and atomic checkpoint writes."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed

from veomni_lightning.parallel.dims import ParallelDims, ParallelLayoutError
from veomni_lightning.strategies.checkpoint_io import write_atomically

# ---------------------------------------------------------------------------------------------------------------------
# ParallelDims: sizes and validation (no process group)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "world, dp_replicate, sp, dp_shard",
    [(1, 1, 1, 1), (8, 1, 1, 8), (8, 2, 1, 4), (8, 1, 2, 4), (8, 2, 2, 2), (8, 1, 8, 1), (12, 3, 2, 2)],
)
def test_dp_shard_is_inferred(world, dp_replicate, sp, dp_shard):
    dims = ParallelDims(world_size=world, dp_replicate=dp_replicate, sp=sp)
    assert dims.dp_shard == dp_shard
    assert dims.dp == dp_replicate * dp_shard
    assert dims.fsdp_size == dp_shard * sp
    assert dims.dp_replicate * dims.dp_shard * dims.sp == world
    # Giving the inferred value explicitly is the same layout.
    assert ParallelDims(world_size=world, dp_replicate=dp_replicate, dp_shard=dp_shard, sp=sp) == dims


def test_layout_error_is_a_value_error():
    assert issubclass(ParallelLayoutError, ValueError)


def test_sizes_not_multiplying_to_world():
    with pytest.raises(ParallelLayoutError) as info:
        ParallelDims(world_size=8, dp_replicate=2, dp_shard=3, sp=1)
    msg = str(info.value)
    assert "dp_replicate (2) × dp_shard (3) × sp (1) = 6" in msg
    assert "world size is 8" in msg
    assert "dp_shard=-1" in msg  # the fix


@pytest.mark.parametrize("world, dp_replicate, sp", [(6, 2, 2), (2, 1, 3), (4, 3, 1), (8, 3, 2)])
def test_world_not_divisible_by_dp_replicate_times_sp(world, dp_replicate, sp):
    with pytest.raises(ParallelLayoutError) as info:
        ParallelDims(world_size=world, dp_replicate=dp_replicate, sp=sp)
    msg = str(info.value)
    assert f"world size {world} is not divisible" in msg
    assert f"dp_replicate ({dp_replicate})" in msg and f"sp ({sp})" in msg and f"= {dp_replicate * sp}" in msg
    assert "Choose sizes" in msg and "devices × nodes" in msg


@pytest.mark.parametrize("world, dp_replicate, sp, ep", [(4, 1, 2, 3), (8, 2, 1, 8), (6, 1, 1, 4)])
def test_ep_must_divide_dp_shard_times_sp(world, dp_replicate, sp, ep):
    with pytest.raises(ParallelLayoutError) as info:
        ParallelDims(world_size=world, dp_replicate=dp_replicate, sp=sp, ep=ep)
    fsdp = world // dp_replicate
    msg = str(info.value)
    assert f"ep ({ep}) must divide dp_shard × sp = {fsdp}" in msg
    assert "same ranks" in msg


def test_ep_dividing_is_accepted():
    dims = ParallelDims(world_size=8, dp_replicate=2, sp=2, ep=4)
    assert dims.ep == 4 and dims.fsdp_size == 4


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(world_size=0), "world_size"),
        (dict(world_size=-2), "world_size"),
        (dict(world_size=4, dp_replicate=0), "dp_replicate"),
        (dict(world_size=4, sp=-1), "sp"),
        (dict(world_size=4, ep=0), "ep"),
        (dict(world_size=4, dp_shard=0), "dp_shard"),
        (dict(world_size=4, dp_shard=-2), "dp_shard"),
        # not integers
        (dict(world_size=4.0), "world_size"),
        (dict(world_size="4"), "world_size"),
        (dict(world_size=4, sp=2.0), "sp"),
        (dict(world_size=4, dp_replicate="2"), "dp_replicate"),
        (dict(world_size=4, ep=None), "ep"),
        (dict(world_size=4, dp_shard=2.0), "dp_shard"),
    ],
)
def test_non_positive_or_non_int_sizes(kwargs, name):
    with pytest.raises(ParallelLayoutError) as info:
        ParallelDims(**kwargs)
    msg = str(info.value)
    assert msg.startswith(f"{name} must be a positive integer"), msg
    assert repr(kwargs[name]) in msg  # names the bad value


def test_ep_greater_than_one_is_not_implemented_at_build_mesh():
    dims = ParallelDims(world_size=2, sp=2, ep=2)  # a valid layout ...
    with pytest.raises(ParallelLayoutError, match="not implemented yet") as info:
        dims.build_mesh("cpu")  # ... that the mesh refuses before any collective
    assert "ep_size=1" in str(info.value)


def test_validate_attention_inconsistent_heads():
    dims = ParallelDims(world_size=2, sp=2)
    for heads, kv in [(6, 4), (0, 1), (4, 0), (3, 2)]:
        with pytest.raises(ParallelLayoutError) as info:
            dims.validate_attention(heads, kv)
        msg = str(info.value)
        assert f"num_attention_heads ({heads})" in msg and f"num_key_value_heads ({kv})" in msg
        assert "inconsistent" in msg


def test_validate_attention_warns_when_sp_does_not_divide_heads():
    dims = ParallelDims(world_size=2, sp=2)
    with pytest.warns(UserWarning, match=r"sp=2 does not divide the model's 9 attention heads: Ulysses pads to 10"):
        dims.validate_attention(9, 3)
    with pytest.warns(UserWarning, match="pads to 12"):
        ParallelDims(world_size=4, sp=4).validate_attention(9, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dims.validate_attention(8, 1)  # kv heads not divisible by sp: repeated silently
        dims.validate_attention(4, 2)
        ParallelDims(world_size=2).validate_attention(9, 3)  # sp=1: never warns


# ---------------------------------------------------------------------------------------------------------------------
# The mesh over 4 gloo processes
# ---------------------------------------------------------------------------------------------------------------------

LAYOUTS = [(1, 2), (2, 2), (1, 4), (2, 1), (1, 1)]  # (dp_replicate, sp) on 4 ranks


def _mesh_worker(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    out: dict = {}
    for dp_replicate, sp in LAYOUTS:
        pm = ParallelDims(world_size=world_size, dp_replicate=dp_replicate, sp=sp).build_mesh("cpu")
        info: dict = {}
        for name in ("dp", "dp_shard_sp", "dp_sp", "sp"):
            sub = pm[name]
            info[name] = {
                "size": sub.size(),
                "ranks": sorted(dist.get_process_group_ranks(sub.get_group())),
                "local_rank": sub.get_local_rank(),
            }
        fsdp = pm.fsdp_mesh
        info["fsdp_shape"] = list(fsdp.shape)
        info["fsdp_names"] = list(fsdp.mesh_dim_names)
        info["sp_group_none"] = pm.sp_group is None
        info["sp_group_ranks"] = None if pm.sp_group is None else sorted(dist.get_process_group_ranks(pm.sp_group))
        info["loss_group_ranks"] = sorted(dist.get_process_group_ranks(pm.loss_group))
        info["dp_rank"], info["dp_size"] = pm.dp_rank, pm.dp_size
        info["sp_rank"], info["sp_size"] = pm.sp_rank, pm.sp_size
        out[f"{dp_replicate}x{sp}"] = info
    # A ParallelDims built for another world size is refused by build_mesh.
    try:
        ParallelDims(world_size=2).build_mesh("cpu")
        out["wrong_world"] = ""
    except ParallelLayoutError as e:
        out["wrong_world"] = str(e)
    return out


@pytest.fixture(scope="module")
def mesh_results():
    return run_distributed(_mesh_worker, 4, timeout=180)


@pytest.mark.parametrize("dp_replicate, sp", LAYOUTS)
def test_sub_meshes_sizes_and_members(mesh_results, dp_replicate, sp):
    world = 4
    dp_shard = world // (dp_replicate * sp)
    for rank, res in enumerate(mesh_results):
        info = res[f"{dp_replicate}x{sp}"]
        # rank = r * (dp_shard * sp) + s * sp + p  (mesh dims outermost first: dp_replicate, dp_shard, sp)
        r, rem = divmod(rank, dp_shard * sp)
        s, p = divmod(rem, sp)
        coords = [(rr, ss, pp) for rr in range(dp_replicate) for ss in range(dp_shard) for pp in range(sp)]

        def flat(rr, ss, pp):
            return rr * dp_shard * sp + ss * sp + pp

        expected = {
            "dp": sorted(flat(rr, ss, p) for rr, ss, pp in coords if pp == 0),  # same SP position
            "dp_shard_sp": sorted(flat(r, ss, pp) for rr, ss, pp in coords if rr == 0),  # same replica
            "dp_sp": list(range(world)),
            "sp": sorted(flat(r, s, pp) for pp in range(sp)),  # same replica and shard
        }
        sizes = {"dp": dp_replicate * dp_shard, "dp_shard_sp": dp_shard * sp, "dp_sp": world, "sp": sp}
        for name in expected:
            assert info[name]["size"] == sizes[name], (rank, name, info[name])
            assert info[name]["ranks"] == expected[name], (rank, name, info[name])
            assert info[name]["local_rank"] == expected[name].index(rank)
        assert info["dp_size"] == dp_replicate * dp_shard and info["dp_rank"] == r * dp_shard + s
        assert info["sp_size"] == sp and info["sp_rank"] == p
        assert info["loss_group_ranks"] == list(range(world))
        # FSDP: 1-D over dp_shard × sp, or 2-D (replicate, shard) for HSDP.
        if dp_replicate > 1:
            assert info["fsdp_shape"] == [dp_replicate, dp_shard * sp]
            assert info["fsdp_names"] == ["dp_replicate", "dp_shard_sp"]
        else:
            assert info["fsdp_shape"] == [dp_shard * sp]
            assert info["fsdp_names"] == ["dp_shard_sp"]
        if sp == 1:
            assert info["sp_group_none"] and info["sp_group_ranks"] is None
        else:
            assert not info["sp_group_none"] and info["sp_group_ranks"] == expected["sp"]


def test_build_mesh_refuses_other_world_size(mesh_results):
    for res in mesh_results:
        assert "built for world size 2" in res["wrong_world"] and "has 4 ranks" in res["wrong_world"]


# ---------------------------------------------------------------------------------------------------------------------
# Through Lightning
# ---------------------------------------------------------------------------------------------------------------------


def _trainer_bad_layout_worker(rank: int, world_size: int) -> dict:
    import lightning.pytorch as pl
    import torch.distributed as dist
    from lightning.pytorch.demos.boring_classes import BoringModel

    from veomni_lightning.strategies import VeOmniStrategy

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=VeOmniStrategy(sp_size=3, param_dtype="fp32"),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    try:
        trainer.fit(BoringModel())
    except Exception as e:
        return {"type": type(e).__name__, "msg": str(e), "pg_initialized": dist.is_initialized()}
    return {"type": "", "msg": "", "pg_initialized": dist.is_initialized()}


def test_trainer_with_impossible_layout_fails_on_every_rank_before_any_collective():
    # A hang (a rank waiting in a collective) would show as a TimeoutError here, not as the layout error.
    results = run_distributed(_trainer_bad_layout_worker, 2, init_process_group=False, timeout=120)
    for rank, res in enumerate(results):
        assert res["type"] == "ParallelLayoutError", (rank, res)
        assert "world size 2 is not divisible by dp_replicate (1) × sp (3) = 3" in res["msg"], (rank, res)
        assert not res["pg_initialized"], f"rank {rank} created the process group before validating the layout"


def test_strategy_name_resolves_through_registry():
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import StrategyRegistry

    from veomni_lightning.strategies import VeOmniStrategy

    assert "veomni" in StrategyRegistry
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy="veomni", logger=False, enable_progress_bar=False)
    assert type(trainer.strategy) is VeOmniStrategy
    assert trainer.strategy.sp_size == 1 and trainer.strategy.dp_replicate_size == 1


# ---------------------------------------------------------------------------------------------------------------------
# write_atomically
# ---------------------------------------------------------------------------------------------------------------------


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _make_previous(path: Path, kind: str) -> None:
    if kind == "file":
        path.write_bytes(b"previous checkpoint \x00\x01" * 100)
    else:
        (path / "sub").mkdir(parents=True)
        (path / ".metadata").write_bytes(b"meta-old")
        (path / "__0_0.distcp").write_bytes(torch.arange(100).numpy().tobytes())
        (path / "sub" / "x.bin").write_bytes(b"x")


def _write_file(tmp: Path) -> None:
    tmp.write_bytes(b"new checkpoint")


def _write_folder(tmp: Path) -> None:
    tmp.mkdir()
    (tmp / ".metadata").write_bytes(b"meta-new")
    (tmp / "__0_0.distcp").write_bytes(b"shard-new")


def _failing(kind: str):
    def write(tmp: Path) -> None:
        if kind == "file":
            tmp.write_bytes(b"partial")
        else:
            tmp.mkdir()
            (tmp / "__0_0.distcp").write_bytes(b"partial")
        raise OSError("disk full")

    return write


def _calls():
    calls = []
    return calls, (lambda: calls.append("barrier"))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old")))


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, kind):
    path = tmp_path / "ckpts" / "last.ckpt"
    path.parent.mkdir()
    _make_previous(path, kind)
    before = _snapshot(path)
    _, barrier = _calls()
    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, _failing(kind), rank=0, barrier=barrier)
    assert path.is_file() if kind == "file" else path.is_dir()
    assert _snapshot(path) == before
    assert not path.with_name("last.ckpt.old").exists()
    # A retry after the failure succeeds and cleans up whatever the failed attempt left.
    write_atomically(path, _write_file, rank=0, barrier=barrier)
    assert path.read_bytes() == b"new checkpoint"
    assert _leftovers(path.parent) == []


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_failed_write_leaves_no_tmp_leftovers(tmp_path, kind):
    path = tmp_path / "last.ckpt"
    _make_previous(path, kind)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, _failing(kind), rank=0, barrier=lambda: None)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("old_kind", ["none", "file", "folder"])
@pytest.mark.parametrize("new_kind", ["file", "folder"])
def test_successful_write_replaces_previous(tmp_path, old_kind, new_kind):
    path = tmp_path / "nested" / "dir" / "step=2.ckpt"
    if old_kind != "none":
        path.parent.mkdir(parents=True)
        _make_previous(path, old_kind)
    # A stale tmp from a crashed earlier run is discarded before writing.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(path.name + ".tmp").write_bytes(b"stale")
    calls, barrier = _calls()
    seen = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        assert tmp == path.with_name(path.name + ".tmp") and not tmp.exists()
        (_write_file if new_kind == "file" else _write_folder)(tmp)

    write_atomically(path, write, rank=0, barrier=barrier)
    assert len(seen) == 1 and len(calls) == 3
    if new_kind == "file":
        assert path.is_file() and path.read_bytes() == b"new checkpoint"
    else:
        assert _snapshot(path) == {".metadata": b"meta-new", "__0_0.distcp": b"shard-new"}
    assert _leftovers(path.parent) == []


def test_non_zero_rank_only_writes(tmp_path):
    # Ranks > 0 write their shard into tmp and never touch the final path (rank 0 swaps after the barrier).
    path = tmp_path / "ckpt"
    _make_previous(path, "folder")
    before = _snapshot(path)
    tmp = path.with_name("ckpt.tmp")
    tmp.mkdir()

    def write(t: Path) -> None:
        (t / "__1_0.distcp").write_bytes(b"rank1")

    write_atomically(path, write, rank=1, barrier=lambda: None)
    assert _snapshot(path) == before
    assert (tmp / "__1_0.distcp").read_bytes() == b"rank1"
