"""A latent cache for DiT training: the frozen condition model runs once over the rows; training reads the result.

Layout of the cache folder::

    manifest.json            what the cache was built from (model, rows, clip options); a mismatch is an error
    shard-00000.safetensors  rows 0 .. rows_per_shard-1: "latents.<row>" and "text.<row>" tensors
    ...

Shards are written whole to a temporary name and renamed into place, so an interrupted write leaves no partial
shard: a later run re-encodes exactly the shards that are missing (resumable), and a complete shard is never
rewritten. Global rank ``r`` of ``w`` encodes shards ``r, r + w, ...``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from veomni_lightning.errors import ConfigError

__all__ = ["LatentCache"]


class LatentCache:
    """Read and write the cache folder (see the module doc).

    Args:
        folder: the cache folder (created when missing).
        fingerprint: what the cached tensors depend on; stored in ``manifest.json`` and checked on every open.
        num_rows: rows in the dataset.
        rows_per_shard: rows per safetensors shard.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: dict[str, Any], num_rows: int, rows_per_shard: int = 64):
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # the JSON form, as the manifest stores it
        self.num_rows, self.rows_per_shard = num_rows, rows_per_shard
        self._open: dict[int, Any] = {}

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.rows_per_shard)

    def shard_path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.safetensors"

    def check_manifest(self, create: bool) -> None:
        """Refuse a cache built from other rows or settings; write the manifest when ``create`` and it is absent."""
        manifest = self.folder / "manifest.json"
        want = {"fingerprint": self.fingerprint, "num_rows": self.num_rows, "rows_per_shard": self.rows_per_shard}
        if manifest.is_file():
            have = json.loads(manifest.read_text())
            if have != want:
                changed = sorted(k for k in {**have.get("fingerprint", {}), **self.fingerprint}
                                 if have.get("fingerprint", {}).get(k) != self.fingerprint.get(k))  # fmt: skip
                raise ConfigError(
                    f"latent cache {self.folder} was built from other data or settings (differs in {changed or 'rows'}). "
                    "Fix: point latent_cache at a new folder, or delete this one."
                )
        elif create:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = manifest.with_suffix(".tmp")
            tmp.write_text(json.dumps(want, indent=1))
            os.replace(tmp, manifest)

    def missing_shards(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.shard_path(s).is_file()]

    def fill(self, encode_row: Callable[[int], tuple[torch.Tensor, torch.Tensor]], rank: int, world: int) -> int:
        """Encode this rank's missing shards (``encode_row(row) -> (latents, text embeddings)``); returns how many
        shards it wrote."""
        from safetensors.torch import save_file

        self.check_manifest(create=False)  # rank 0 wrote it (check_manifest(create=True)) before any rank fills
        written = 0
        for shard in self.missing_shards():
            if shard % world != rank:
                continue
            tensors = {}
            for row in range(shard * self.rows_per_shard, min(self.num_rows, (shard + 1) * self.rows_per_shard)):
                latents, text = encode_row(row)
                tensors[f"latents.{row}"] = latents.detach().float().cpu().contiguous()
                tensors[f"text.{row}"] = text.detach().float().cpu().contiguous()
            tmp = self.shard_path(shard).with_name(f".{self.shard_path(shard).name}.{rank}.tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, self.shard_path(shard))  # atomic: a shard is either whole or absent
            written += 1
        return written

    def read(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents, text embeddings)`` of ``row``."""
        from safetensors import safe_open

        shard = row // self.rows_per_shard
        if shard not in self._open:
            path = self.shard_path(shard)
            if not path.is_file():
                raise ConfigError(f"latent cache {self.folder} has no {path.name}: it is incomplete. Fix: run fit "
                                  "once more with the same latent_cache (it fills the missing shards first).")  # fmt: skip
            self._open[shard] = safe_open(str(path), framework="pt")
        handle = self._open[shard]
        return handle.get_tensor(f"latents.{row}"), handle.get_tensor(f"text.{row}")
