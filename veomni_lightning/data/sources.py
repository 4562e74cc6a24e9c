"""Reading raw rows from files: path resolution, format dispatch, streaming and seeded shuffling.

Everything here streams: a file is never loaded whole (JSON lines are read line by line, parquet row group by
row group), so a corpus larger than memory works. Each row carries its location (file and line, or parquet row)
so that a bad row can be reported precisely later, after shuffling has moved it around.
"""

from __future__ import annotations

import glob
import json
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from veomni_lightning.errors import ConfigError
from veomni_lightning.paths import resolve_path as _resolve_path

JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".cor")
SUPPORTED_SUFFIXES = JSON_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES


class DataError(ConfigError):
    """A problem with the input data (a malformed row, a missing file, ...), always naming where and how to fix it."""


@dataclass(frozen=True)
class RowLocation:
    """Where a row came from: ``unit`` is "line" for text/JSON files and "row" for parquet (both 1-based)."""

    path: str
    index: int
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.path} {self.unit} {self.index}"


def resolve_path(path: str) -> str:
    """:func:`veomni_lightning.paths.resolve_path`, raising :class:`DataError` (with the fix) for a bad path."""
    try:
        return _resolve_path(path)
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as exc:
        raise DataError(str(exc)) from exc


def expand_files(paths: Iterable[str], what: str) -> list[str]:
    """Resolve ``package:`` paths, expand globs and directories, and check every file exists and has a known suffix.

    Raises ``DataError`` up front (at setup) rather than deep inside a worker later.
    """
    out: list[str] = []
    for raw in paths:
        path = resolve_path(raw)
        if any(ch in path for ch in "*?["):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise DataError(f"{what}: pattern {raw!r} matched no files. Fix: check the path/pattern.")
        elif os.path.isdir(path):
            matches = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(SUPPORTED_SUFFIXES))
            if not matches:
                raise DataError(f"{what}: folder {raw!r} holds no {'/'.join(SUPPORTED_SUFFIXES)} files.")
        elif os.path.isfile(path):
            matches = [path]
        else:
            raise DataError(f"{what}: file {raw!r} does not exist (resolved to {path}). Fix: check the path.")
        for m in matches:
            if not m.lower().endswith(SUPPORTED_SUFFIXES):
                raise DataError(
                    f"{what}: {m} has an unsupported suffix. Fix: use one of {', '.join(SUPPORTED_SUFFIXES)} "
                    f"(JSON lines, parquet, or plain text with one sample per line)."
                )
            out.append(m)
    if not out:
        raise DataError(f"{what}: no files given.")
    return out


def _decoded_lines(path: str) -> Iterator[tuple[str | DataError, RowLocation]]:
    """Non-blank lines with their location; a line that is not UTF-8 becomes a DataError at that line.

    Binary read + per-line decode so that a bad byte is reported at its line instead of killing the whole file.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            loc = RowLocation(path, lineno)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield DataError(f"{loc}: not valid UTF-8 ({e}). Fix: re-encode the file as UTF-8."), loc
                continue
            if line.strip():  # blank lines (often a trailing newline) are not rows
                yield line, loc


def _iter_json_lines(path: str) -> Iterator[tuple[Any, RowLocation]]:
    for line, loc in _decoded_lines(path):
        if isinstance(line, DataError):
            yield line, loc
            continue
        try:
            yield json.loads(line), loc
        except json.JSONDecodeError as e:
            yield (
                DataError(
                    f"{loc}: invalid JSON ({e.msg}, column {e.colno}). Fix: each line must be one complete "
                    f"JSON object (JSON Lines); a pretty-printed or array-style .json file must be converted."
                ),
                loc,
            )


def _iter_text_lines(path: str, text_key: str) -> Iterator[tuple[Any, RowLocation]]:
    for line, loc in _decoded_lines(path):
        yield (line if isinstance(line, DataError) else {text_key: line.strip()}), loc


def _iter_parquet(path: str) -> Iterator[tuple[Any, RowLocation]]:
    import pyarrow.parquet as pq  # local: pyarrow is only needed when parquet files are used

    pf = pq.ParquetFile(path)
    row = 0
    for rg in range(pf.num_row_groups):
        # One row group at a time bounds memory by the row-group size, not the file size.
        for rec in pf.read_row_group(rg).to_pylist():
            row += 1
            yield rec, RowLocation(path, row, unit="row")


def iter_file_rows(path: str, text_key: str = "text") -> Iterator[tuple[Any, RowLocation]]:
    """Stream ``(row, location)`` pairs from one file, picked by suffix.

    A row that cannot even be parsed is yielded as a ``DataError`` instance in place of the row, so the caller can
    decide (error or skip) with the same policy as for rows that parse but are malformed.
    """
    low = path.lower()
    if low.endswith(JSON_SUFFIXES):
        yield from _iter_json_lines(path)
    elif low.endswith(PARQUET_SUFFIXES):
        yield from _iter_parquet(path)
    elif low.endswith(TEXT_SUFFIXES):
        yield from _iter_text_lines(path, text_key)
    else:
        raise DataError(f"{path}: unsupported suffix; use one of {', '.join(SUPPORTED_SUFFIXES)}.")


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Approximately shuffle a stream with a bounded buffer: deterministic for a given ``rng`` state.

    Each incoming item replaces a uniformly chosen buffered one, which is emitted; the remainder is shuffled at the
    end. ``size <= 1`` passes the stream through unchanged.
    """
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        out, buf[i] = buf[i], item
        yield out
    rng.shuffle(buf)
    yield from buf


def iter_epoch_rows(
    files: list[str], *, epoch: int, seed: int, shuffle: bool, buffer_size: int, text_key: str
) -> Iterator[tuple[Any, RowLocation]]:
    """All rows of all ``files`` for one epoch, in a deterministic order for ``(seed, epoch)``.

    With ``shuffle`` the file order is permuted and rows pass through a seeded shuffle buffer; otherwise files and
    rows come in the given order.
    """
    # A string seed is hashed with SHA-512 by `random`, so it is stable across processes and Python versions.
    rng = random.Random(f"veomni-data:{seed}:{epoch}")
    order = list(files)
    if shuffle:
        rng.shuffle(order)

    def rows() -> Iterator[tuple[Any, RowLocation]]:
        for path in order:
            yield from iter_file_rows(path, text_key)

    if shuffle:
        yield from shuffle_buffer(rows(), buffer_size, rng)
    else:
        yield from rows()
