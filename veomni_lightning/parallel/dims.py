"""Parallel sizes and the one device mesh built from them.

Every consumer asks this module for a named sub-mesh; nothing else in the library reads process-group globals.

Rank layout (outermost first): ``dp_replicate × dp_shard × sp``. Views by purpose, each an unflattening of the
1-D world mesh:

====================  =================================  ==============================================
view                  dims                               used for
====================  =================================  ==============================================
``batch``             dp_replicate × dp_shard            data loading, token counts (replicated over sp)
``fsdp``              (dp_replicate,) dp_shard × sp      FSDP2 parameter sharding (SP ranks shard weights too)
``loss``              dp_replicate × dp_shard × sp       loss-sum reduction
``sp``                sp                                 Ulysses all-to-all
``ep``                ep (innermost of dp_shard × sp)    expert-parallel all-to-all (MoE)
``efsdp``             (dp_replicate,) dp_shard·sp / ep   FSDP2 sharding of each rank's experts
====================  =================================  ==============================================
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from veomni_lightning.errors import ConfigError

__all__ = ["ParallelDims", "ParallelMesh", "ParallelLayoutError"]


class ParallelLayoutError(ConfigError):
    """An impossible parallel layout: raised on every rank before any collective."""


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of each parallel dimension; ``dp_shard=-1`` means "whatever is left of the world size".

    ``ep`` (expert parallelism) must divide ``dp_shard × sp`` because experts are
    sharded over the same ranks that shard the dense parameters.
    """

    world_size: int
    dp_replicate: int = 1
    dp_shard: int = -1
    sp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "dp_replicate", "sp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParallelLayoutError(f"{name} must be a positive integer, got {value!r}.")
        if self.dp_shard == -1:
            denom = self.dp_replicate * self.sp
            if self.world_size % denom:
                raise ParallelLayoutError(
                    f"world size {self.world_size} is not divisible by dp_replicate ({self.dp_replicate}) × "
                    f"sp ({self.sp}) = {denom}. Choose sizes whose product divides the number of processes "
                    f"(devices × nodes)."
                )
            object.__setattr__(self, "dp_shard", self.world_size // denom)
        elif not isinstance(self.dp_shard, int) or self.dp_shard < 1:
            raise ParallelLayoutError(f"dp_shard must be a positive integer or -1 (infer), got {self.dp_shard!r}.")
        product = self.dp_replicate * self.dp_shard * self.sp
        if product != self.world_size:
            raise ParallelLayoutError(
                f"dp_replicate ({self.dp_replicate}) × dp_shard ({self.dp_shard}) × sp ({self.sp}) = {product}, "
                f"but the world size is {self.world_size}. Set dp_shard=-1 to infer it, or change the sizes."
            )
        if (self.dp_shard * self.sp) % self.ep:
            raise ParallelLayoutError(
                f"ep ({self.ep}) must divide dp_shard × sp = {self.dp_shard * self.sp}; experts are sharded over the "
                f"same ranks as the dense parameters."
            )

    @property
    def dp(self) -> int:
        """Number of data-parallel replicas of the batch (ranks of one SP group count once)."""
        return self.dp_replicate * self.dp_shard

    def validate_attention(self, num_heads: int, num_kv_heads: int) -> None:
        """Check that the model's heads are consistent; raise a clear error otherwise.

        Ulysses handles any head count: key/value heads are repeated when ``num_kv_heads`` does not divide by ``sp``
        and query heads are zero-padded when ``num_heads`` does not (slower, so a divisible ``sp`` is better).
        """
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ParallelLayoutError(
                f"the model's num_attention_heads ({num_heads}) is not a positive multiple of num_key_value_heads "
                f"({num_kv_heads}); the config is inconsistent."
            )
        if self.sp > 1 and num_heads % self.sp:
            warnings.warn(
                f"sp={self.sp} does not divide the model's {num_heads} attention heads: Ulysses pads to "
                f"{-(-num_heads // self.sp) * self.sp} heads, wasting some attention work. An sp dividing {num_heads} "
                "is faster.",
                stacklevel=2,
            )

    def build_mesh(self, device_type: str) -> ParallelMesh:
        """Build the device mesh (a collective-free call on every rank after the process group is up)."""
        if dist.is_initialized() and dist.get_world_size() != self.world_size:
            raise ParallelLayoutError(
                f"ParallelDims was built for world size {self.world_size}, but the process group has "
                f"{dist.get_world_size()} ranks."
            )
        # Each view is its own unflattening of the 1-D world mesh (torchtitan's scheme) rather than a slice of
        # flattened dims of one root mesh, which DeviceMesh deprecates. Ranks are laid out
        # dp_replicate × dp_shard × sp, outermost first, in every view.
        world = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("world",))
        batch_sp = world._unflatten(0, (self.dp, self.sp), ("dp", "sp"))
        fsdp = world._unflatten(0, (self.dp_replicate, self.dp_shard * self.sp), ("dp_replicate", "dp_shard_sp"))
        views = {
            "batch": batch_sp["dp"],
            "sp": batch_sp["sp"],
            "loss": world,
            "fsdp": fsdp if self.dp_replicate > 1 else fsdp["dp_shard_sp"],
            "fsdp_shard": fsdp["dp_shard_sp"],
        }
        if self.ep > 1:
            # Experts: split over ep consecutive ranks inside dp_shard × sp; each rank's experts FSDP-sharded over
            # the efsdp = dp_shard·sp / ep ranks holding the same experts (torchtitan's layout).
            efsdp = self.dp_shard * self.sp // self.ep
            sparse = world._unflatten(0, (self.dp_replicate, efsdp, self.ep), ("dp_replicate", "efsdp", "ep"))
            views["ep"] = sparse["ep"]
            views["efsdp"] = sparse["dp_replicate", "efsdp"] if self.dp_replicate > 1 else sparse["efsdp"]
        return ParallelMesh(self, world, views=views)


class ParallelMesh:
    """The device mesh, reached only through views named by purpose; handed to modules by the strategy.

    Views (each a :class:`DeviceMesh`, or ``None`` in a single process without a process group):

    * ``batch``: ranks that read different samples (dp_replicate × dp_shard); the SP ranks of one group share a
      batch rank. Token counts, which are replicated across SP ranks, are reduced over it.
    * ``loss``: every rank holding distinct tokens of the global batch (dp × sp); loss sums are reduced over it.
    * ``fsdp``: parameter sharding (dp_shard × sp), 2-D (dp_replicate, dp_shard × sp) for HSDP.
    * ``fsdp_shard``: the shard dim of ``fsdp`` alone (the ranks that reduce-scatter together).
    * ``sp``: the Ulysses group.
    * ``ep`` / ``efsdp`` (only with ep > 1): the ranks that split the experts, and the ranks that FSDP-shard one
      rank's experts (dp_shard·sp / ep of them, 2-D with dp_replicate for HSDP).

    ``ParallelMesh.single_process(device_type)`` is the layout of one process without a process group: every size
    is 1, every view and group ``None``, so callers need no special case.
    """

    VIEW_NAMES = ("batch", "loss", "fsdp", "fsdp_shard", "sp", "ep", "efsdp")

    def __init__(
        self,
        dims: ParallelDims,
        mesh: DeviceMesh | None,
        device_type: str | None = None,
        *,
        views: dict[str, DeviceMesh] | None = None,
    ) -> None:
        self.dims = dims
        self.mesh = mesh  # the 1-D world mesh
        self._views = views or {}
        self._device_type = device_type if mesh is None else mesh.device_type

    @classmethod
    def single_process(cls, device_type: str) -> ParallelMesh:
        """One process, no process group, no sharding."""
        return cls(ParallelDims(world_size=1), None, device_type)

    def view(self, name: str) -> DeviceMesh | None:
        """The sub-mesh named by purpose (see the class docstring); ``None`` without a mesh."""
        if name not in self.VIEW_NAMES:
            raise KeyError(f"no mesh view named {name!r}; the views are {sorted(self.VIEW_NAMES)}.")
        return self._views.get(name)

    def group(self, name: str) -> dist.ProcessGroup | None:
        """The process group of a view, or ``None`` when it has a single rank (nothing to communicate)."""
        view = self.view(name)
        if view is None or view.size() == 1:
            return None
        if view.ndim > 1:  # HSDP's 2-D fsdp view: the shard group is the one that reduce-scatters
            return self.view("fsdp_shard").get_group()
        return view.get_group()

    @property
    def device_type(self) -> str:
        return self._device_type

    @property
    def fsdp_mesh(self) -> DeviceMesh | None:
        """1-D mesh for FSDP, or the 2-D (replicate, shard) mesh for HSDP; ``None`` in a single process."""
        return self.view("fsdp")

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas (the ``batch`` view)."""
        return 0 if self.mesh is None else self.view("batch").get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def sp_rank(self) -> int:
        return 0 if self.mesh is None else self.view("sp").get_local_rank()

    @property
    def sp_size(self) -> int:
        return self.dims.sp

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        """The Ulysses group, or None without sequence parallelism (attention then runs locally)."""
        return self.group("sp")

    @property
    def loss_group(self) -> dist.ProcessGroup | None:
        """All ranks that hold distinct tokens of the global batch (dp × sp); None when that is one rank."""
        return self.group("loss")

    @property
    def batch_group(self) -> dist.ProcessGroup | None:
        """The data-parallel replicas (dp); None when there is one."""
        return self.group("batch")

    def __repr__(self) -> str:
        d = self.dims
        return (
            f"ParallelMesh(dp_replicate={d.dp_replicate}, dp_shard={d.dp_shard}, sp={d.sp}, ep={d.ep}, "
            f"device={self.device_type})"
        )
