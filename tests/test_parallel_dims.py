"""ParallelDims layout validation, the named sub-meshes over 4 gloo processes, the Lightning wiring of the layout
check, and atomic checkpoint writes."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed

from veomni_lightning.parallel import ParallelConfig
from veomni_lightning.parallel.dims import ParallelDims, ParallelLayoutError, ParallelMesh
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
    assert dims.dp_shard * dims.sp == dp_shard * sp
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
    assert dims.ep == 4 and dims.dp_shard * dims.sp == 4


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


def _ep_mesh_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    out = {}
    for dp_replicate, ep in [(1, 2), (1, 4), (2, 2)]:
        pm = ParallelDims(world_size=world, dp_replicate=dp_replicate, ep=ep).build_mesh("cpu")
        efsdp = pm.view("efsdp")
        out[f"{dp_replicate}x{ep}"] = {
            "ep": sorted(dist.get_process_group_ranks(pm.view("ep").get_group())),
            "efsdp_shape": list(efsdp.shape),
            "efsdp_shard": sorted(dist.get_process_group_ranks(efsdp.get_group(efsdp.ndim - 1))),
        }
    return out


def test_expert_views_split_experts_over_consecutive_ranks_inside_dp_shard():
    # ep innermost: ep groups are consecutive ranks; efsdp joins the ranks holding the same experts (same ep index)
    # within one replica; HSDP adds the replicate dim to efsdp.
    results = run_distributed(_ep_mesh_worker, 4, timeout=120)
    for rank, res in enumerate(results):
        assert res["1x2"] == {
            "ep": [rank // 2 * 2, rank // 2 * 2 + 1],
            "efsdp_shape": [2],
            "efsdp_shard": [rank % 2, rank % 2 + 2],
        }
        assert res["1x4"] == {"ep": [0, 1, 2, 3], "efsdp_shape": [1], "efsdp_shard": [rank]}
        assert res["2x2"] == {"ep": [rank // 2 * 2, rank // 2 * 2 + 1], "efsdp_shape": [2, 1], "efsdp_shard": [rank]}


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
        # The views by purpose; "dp_shard_sp" is the flattened FSDP dim, which view("fsdp") is only without HSDP.
        subs = {name: pm.view(name) for name in ("batch", "loss", "sp")}
        subs["dp_shard_sp"] = pm.view("fsdp_shard")
        for name, sub in subs.items():
            info[name] = {
                "size": sub.size(),
                "ranks": sorted(dist.get_process_group_ranks(sub.get_group())),
                "local_rank": sub.get_local_rank(),
            }
        # view("fsdp") is 2-D under HSDP (dp_replicate > 1), which has no single process group.
        for name in ("batch", "loss", "sp", *(("fsdp",) if dp_replicate == 1 else ())):
            group = pm.group(name)
            info[f"group_{name}"] = None if group is None else sorted(dist.get_process_group_ranks(group))
        info["batch_group_ranks"] = (
            None if pm.batch_group is None else sorted(dist.get_process_group_ranks(pm.batch_group))
        )
        fsdp = pm.view("fsdp")
        info["fsdp_is_fsdp_mesh"] = fsdp == pm.fsdp_mesh
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
            "batch": sorted(flat(rr, ss, p) for rr, ss, pp in coords if pp == 0),  # same SP position
            "dp_shard_sp": sorted(flat(r, ss, pp) for rr, ss, pp in coords if rr == 0),  # same replica
            "loss": list(range(world)),
            "sp": sorted(flat(r, s, pp) for pp in range(sp)),  # same replica and shard
        }
        sizes = {"batch": dp_replicate * dp_shard, "dp_shard_sp": dp_shard * sp, "loss": world, "sp": sp}
        for name in expected:
            assert info[name]["size"] == sizes[name], (rank, name, info[name])
            assert info[name]["ranks"] == expected[name], (rank, name, info[name])
            assert info[name]["local_rank"] == expected[name].index(rank)
        assert info["dp_size"] == dp_replicate * dp_shard and info["dp_rank"] == r * dp_shard + s
        assert info["sp_size"] == sp and info["sp_rank"] == p
        assert info["loss_group_ranks"] == list(range(world))
        # pm.group(view): the view's ranks, or None when the view has a single rank.
        for name in ("batch", "loss", "sp"):
            want = None if sizes[name] == 1 else expected[name]
            assert info[f"group_{name}"] == want, (rank, name, info)
        assert info["batch_group_ranks"] == info["group_batch"]
        # view("fsdp") is the FSDP mesh; without HSDP its group is the dp_shard_sp ranks.
        assert info["fsdp_is_fsdp_mesh"]
        if dp_replicate == 1:
            assert info["group_fsdp"] == (None if dp_shard * sp == 1 else expected["dp_shard_sp"])
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


def test_single_process_mesh_has_sizes_one_and_no_views_or_groups():
    pm = ParallelMesh.single_process("cpu")
    assert pm.mesh is None and pm.device_type == "cpu"
    assert pm.dims == ParallelDims(world_size=1)
    assert (pm.dims.dp_replicate, pm.dims.dp_shard, pm.dims.sp, pm.dims.ep) == (1, 1, 1, 1)
    assert pm.dp_size == 1 and pm.sp_size == 1
    assert pm.dp_rank == 0 and pm.sp_rank == 0
    for name in ("batch", "fsdp", "loss", "sp"):
        assert pm.view(name) is None, name
        assert pm.group(name) is None, name
    assert pm.fsdp_mesh is None
    assert pm.sp_group is None and pm.loss_group is None and pm.batch_group is None
    with pytest.raises(KeyError, match="no mesh view named 'dp'"):
        pm.view("dp")  # the old dim names are not views


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
        strategy=VeOmniStrategy(parallel=ParallelConfig(sp_size=3, param_dtype="fp32")),
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
    config = trainer.strategy.parallel_config
    assert config.sp_size == 1 and config.dp_replicate_size == 1


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
    """A single-process ``all_ok`` that records what each call reported."""
    calls = []

    def all_ok(ok: bool) -> bool:
        calls.append(ok)
        return ok

    return calls, all_ok


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old")))


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, kind):
    path = tmp_path / "ckpts" / "last.ckpt"
    path.parent.mkdir()
    _make_previous(path, kind)
    before = _snapshot(path)
    calls, all_ok = _calls()
    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, _failing(kind), rank=0, all_ok=all_ok)
    assert calls == [True, False]  # the failing rank still took part in the post-write collective
    assert path.is_file() if kind == "file" else path.is_dir()
    assert _snapshot(path) == before
    assert not path.with_name("last.ckpt.old").exists()
    # A retry after the failure succeeds and cleans up whatever the failed attempt left.
    write_atomically(path, _write_file, rank=0, all_ok=all_ok)
    assert path.read_bytes() == b"new checkpoint"
    assert _leftovers(path.parent) == []


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_failed_write_leaves_no_tmp_leftovers(tmp_path, kind):
    path = tmp_path / "last.ckpt"
    _make_previous(path, kind)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, _failing(kind), rank=0, all_ok=lambda ok: ok)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("rank", [0, 1])
def test_failure_on_another_rank_fails_this_one(tmp_path, rank):
    # This rank's write succeeds, but the post-write collective says another rank's failed.
    path = tmp_path / "ckpt"
    _make_previous(path, "folder")
    before = _snapshot(path)
    reports = []

    def all_ok(ok: bool) -> bool:
        reports.append(ok)
        return ok and len(reports) != 2

    with pytest.raises(RuntimeError, match=rf"another rank failed to write checkpoint {path}.*previous checkpoint"):
        write_atomically(path, _write_folder, rank=rank, all_ok=all_ok)
    assert reports == [True, True]
    assert _snapshot(path) == before
    # Rank 0 removes the partial temporary folder; the other ranks leave it to rank 0.
    assert _leftovers(tmp_path) == ([] if rank == 0 else ["ckpt.tmp"])


def test_failed_preparation_fails_every_rank_before_writing(tmp_path):
    (tmp_path / "a_file").write_text("x")
    path = tmp_path / "a_file" / "ckpt"  # its parent cannot be created
    written = []
    calls, all_ok = _calls()
    with pytest.raises(OSError):
        write_atomically(path, written.append, rank=0, all_ok=all_ok)
    assert calls == [False] and written == []  # rank 0 voted "failed" before anyone wrote
    with pytest.raises(RuntimeError, match="rank 0 could not prepare"):
        write_atomically(tmp_path / "other", written.append, rank=1, all_ok=lambda ok: False)
    assert written == []


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
    calls, all_ok = _calls()
    seen = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        assert tmp == path.with_name(path.name + ".tmp") and not tmp.exists()
        (_write_file if new_kind == "file" else _write_folder)(tmp)

    write_atomically(path, write, rank=0, all_ok=all_ok)
    assert len(seen) == 1 and calls == [True, True, True]
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

    write_atomically(path, write, rank=1, all_ok=lambda ok: ok)
    assert _snapshot(path) == before
    assert (tmp / "__1_0.distcp").read_bytes() == b"rank1"


def test_failed_swap_restores_previous_and_reports(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    _make_previous(path, "folder")
    before = _snapshot(path)
    rename = Path.rename

    def failing_rename(self, target):
        if self.name == "ckpt.tmp":
            raise OSError("rename failed")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    calls, all_ok = _calls()
    with pytest.raises(OSError, match="rename failed"):
        write_atomically(path, _write_folder, rank=0, all_ok=all_ok)
    assert calls == [True, True, False]  # rank 0 reports the failed swap, so the other ranks raise too
    assert _snapshot(path) == before
    assert _leftovers(tmp_path) == []
    # Another rank learns of it from the last collective.
    reports = []

    def all_ok(ok: bool) -> bool:
        reports.append(ok)
        return ok and len(reports) != 3

    other = tmp_path / "other"
    with pytest.raises(RuntimeError, match=f"rank 0 failed to move the new checkpoint into place at {other}"):
        write_atomically(other, _write_folder, rank=1, all_ok=all_ok)
    assert reports == [True, True, True]


def _all_ok_gloo(ok: bool) -> bool:
    """What the strategies pass: ``reduce_boolean_decision(ok, all=True)``, i.e. an all-reduced vote."""
    import torch.distributed as dist

    votes = torch.tensor(int(ok))
    dist.all_reduce(votes)
    return int(votes) == dist.get_world_size()


def _atomic_write_worker(rank: int, world_size: int, root: str, fail_in: str) -> dict:
    """Save a good checkpoint, then a second one that fails on rank 1 only, then a third (a retry) that works.

    ``fail_in="write"``: rank 1's own write raises after writing a partial shard, outside any collective.
    ``fail_in="dcp"``: a real ``dcp.save`` whose ``FileSystemWriter.write_data`` raises on rank 1 (DCP's write stage).
    Every rank catches what the failing save raised and goes on, so a rank left waiting would show as a hang.
    """
    import time

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    path = Path(root) / "step=1.ckpt"

    def state(version: int) -> dict:
        return {"w": torch.arange(6.0) + 10 * version, "b": torch.full((3,), float(version))}

    def writer(version: int, fail: bool):
        def write(tmp: Path) -> None:
            if fail_in == "dcp":
                dcp.save(state(version), storage_writer=FileSystemWriter(tmp))
                return
            tmp.mkdir(exist_ok=True)
            (tmp / f"__{rank}_0.distcp").write_bytes(f"v{version} rank{rank}".encode())
            if fail:
                raise OSError(f"disk full on rank {rank}")
            if rank == 0:
                (tmp / ".metadata").write_bytes(f"v{version}".encode())

        return write

    write_atomically(path, writer(1, False), rank=rank, all_ok=_all_ok_gloo)
    good = _snapshot(path) if rank == 0 else {}

    original_write_data = FileSystemWriter.write_data

    def write_data(self, plan, planner):
        if rank == 1:
            raise OSError("disk full on rank 1")
        return original_write_data(self, plan, planner)

    FileSystemWriter.write_data = write_data
    start = time.monotonic()
    try:
        write_atomically(path, writer(2, rank == 1), rank=rank, all_ok=_all_ok_gloo)
        error_type, error = "", ""
    except BaseException as e:  # DCP's CheckpointException is a BaseException, not an Exception
        error_type, error = type(e).__name__, str(e)
    seconds = time.monotonic() - start
    FileSystemWriter.write_data = original_write_data
    _all_ok_gloo(True)  # every rank has finished the failed save before rank 0 looks at the folder
    result = {"error_type": error_type, "error": error[:2000], "seconds": seconds}
    if rank == 0:
        result["intact"] = _snapshot(path) == good
        result["leftovers"] = _leftovers(path.parent)
    if fail_in == "dcp":
        loaded = {"w": torch.zeros(6), "b": torch.zeros(3)}
        dcp.load(loaded, storage_reader=FileSystemReader(path))
        result["loaded_is_v1"] = all(torch.equal(loaded[k], v) for k, v in state(1).items())
    # A retry works on every rank and replaces the good checkpoint.
    write_atomically(path, writer(3, False), rank=rank, all_ok=_all_ok_gloo)
    _all_ok_gloo(True)
    if rank == 0:
        result["retry_leftovers"] = _leftovers(path.parent)
        result["retry_replaced"] = _snapshot(path) != good
    return result


@pytest.mark.parametrize("fail_in", ["write", "dcp"])
def test_write_failing_on_one_rank_fails_every_rank_promptly(tmp_path, fail_in):
    import time

    start = time.monotonic()
    # A rank left waiting would sit in gloo's 30-minute timeout: run_distributed kills it at 120 s (TimeoutError).
    results = run_distributed(_atomic_write_worker, 2, str(tmp_path), fail_in, timeout=120)
    assert time.monotonic() - start < 60, "the run took most of the timeout (spawning takes ~20 s on 2 busy cores)"
    r0, r1 = results
    # The failing save itself, on each rank, from entering write_atomically to raising: milliseconds here.
    assert r0["seconds"] < 5 and r1["seconds"] < 5, (r0["seconds"], r1["seconds"])
    if fail_in == "write":
        assert (r1["error_type"], r1["error"]) == ("OSError", "disk full on rank 1")
        assert r0["error_type"] == "RuntimeError"
        assert f"another rank failed to write checkpoint {tmp_path / 'step=1.ckpt'}" in r0["error"]
        assert "previous checkpoint there (if any) is intact" in r0["error"]
    else:
        # DCP gathers the write results itself: every rank gets its CheckpointException naming the failing rank.
        for r in results:
            assert r["error_type"] == "CheckpointException" and "disk full on rank 1" in r["error"], r["error"]
            assert r["loaded_is_v1"]
    assert r0["intact"] and r0["leftovers"] == []
    assert r0["retry_replaced"] and r0["retry_leftovers"] == []
