"""Ragged feature stores on zarr v3.

One store holds one feature set of one dataset: every item's rows (video frames or
caption tokens) concatenated along axis 0, plus a per-item offsets array.

Layout of ``<name>.zarr`` (a zarr v3 group)::

    rows        (N_rows, D)  float16/float32, chunked along rows
    offsets     (N_items + 1,) int64; item i owns rows[offsets[i]:offsets[i+1]]
    timestamps  (N_rows,) float32, optional: seconds of each row's centre (video stores)
    attrs       {"prvr_store": 1, "complete": true, "ids": [...], "dim": D, "kind": ...,
                 "model": ..., "weights": ..., "versions": {...}, ...}

Writes are atomic: a :class:`StoreWriter` writes to a sibling temp folder and renames it
into place in :meth:`StoreWriter.close`, after setting ``complete``. A writer killed
mid-way leaves only the temp folder (zarr would otherwise read missing chunks back as
zeros, silently). Readers refuse stores that are not marked complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from prvr.atomic import replace_dir

FORMAT_VERSION = 1
ROW_CHUNK = 8192
CHUNK_BYTES = 4 << 20


def default_chunk_rows(dim: int, itemsize: int) -> int:
    """Rows per chunk for about CHUNK_BYTES per chunk (256..ROW_CHUNK rows)."""
    return int(max(256, min(ROW_CHUNK, CHUNK_BYTES // max(1, dim * itemsize))))


class StoreError(ValueError):
    """A feature store is missing, incomplete or does not match what the caller expects."""


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape feature values (recorded in store attributes)."""
    import importlib.metadata as md

    out = {}
    for name in ("prvr", "torch", "open_clip_torch", "transformers", "decord", "av", "numpy", "zarr"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


class StoreWriter:
    """Append items (one 2-D array each) to a new store; atomic on :meth:`close`.

    Args:
        path: the final ``.zarr`` folder.
        dim: feature dimension D.
        dtype: on-disk dtype (``float16`` halves the size; ``float32`` is exact).
        attrs: metadata recorded with the store (model name, weights identity, rate...).
        timestamps: whether every row carries a timestamp (seconds).
        chunk_rows: rows per chunk (default: about CHUNK_BYTES per chunk, within 256..ROW_CHUNK rows;
            a read of one item reads its whole chunk).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dim: int,
        dtype: str = "float32",
        attrs: dict | None = None,
        timestamps: bool = False,
        chunk_rows: int | None = None,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.chunk_rows = int(chunk_rows or default_chunk_rows(self.dim, self.dtype.itemsize))
        self.attrs = dict(attrs or {})
        self.group = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        self.rows = self.group.create_array(
            "rows", shape=(0, self.dim), chunks=(self.chunk_rows, self.dim), dtype=self.dtype, compressors=None
        )
        self.ts = (
            self.group.create_array("timestamps", shape=(0,), chunks=(self.chunk_rows * 8,), dtype="float32")
            if timestamps
            else None
        )
        self.ids: list[str] = []
        self._seen: set[str] = set()
        self.offsets = [0]
        self._buf: list[np.ndarray] = []
        self._buf_ts: list[np.ndarray] = []
        self._buf_n = 0
        self._written = 0
        self._closed = False

    def append(self, item_id: str, rows: np.ndarray, timestamps: Sequence[float] | None = None) -> None:
        """Add one item's rows, shape (n, D) with n >= 0."""
        item_id = str(item_id)
        if item_id in self._seen:
            raise StoreError(f"{self.path}: duplicate id {item_id!r}")
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise StoreError(f"{self.path}: item {item_id!r} has shape {rows.shape}, expected (n, {self.dim})")
        if self.ts is not None:
            if timestamps is None or len(timestamps) != len(rows):
                raise StoreError(f"{self.path}: item {item_id!r} needs one timestamp per row")
            self._buf_ts.append(np.asarray(timestamps, dtype=np.float32))
        self._seen.add(item_id)
        self.ids.append(item_id)
        self.offsets.append(self.offsets[-1] + len(rows))
        self._buf.append(rows.astype(self.dtype, copy=False))
        self._buf_n += len(rows)
        if self._buf_n >= self.chunk_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._buf_n:
            return
        block = np.concatenate(self._buf, axis=0)
        n = len(block) if final else (len(block) // self.chunk_rows) * self.chunk_rows
        start = self._written
        self.rows.resize((start + n, self.dim))
        self.rows[start : start + n] = block[:n]
        rest = block[n:]
        self._buf = [rest] if len(rest) else []
        if self.ts is not None:
            tblock = np.concatenate(self._buf_ts)
            self.ts.resize((start + n,))
            self.ts[start : start + n] = tblock[:n]
            self._buf_ts = [tblock[n:]] if len(rest) else []
        self._buf_n = len(rest)
        self._written += n

    def close(self) -> Path:
        """Flush, mark complete and move the store into place. Returns the final path."""
        if self._closed:
            return self.path
        self._flush(final=True)
        self.group.create_array("offsets", data=np.asarray(self.offsets, dtype=np.int64))
        self.group.attrs.update(
            {
                **self.attrs,
                "prvr_store": FORMAT_VERSION,
                "ids": self.ids,
                "dim": self.dim,
                "n_items": len(self.ids),
                "n_rows": int(self.offsets[-1]),
                "store_uid": uuid.uuid4().hex,  # new on every write: consumers key caches/resumes on it
                "complete": True,
            }
        )
        replace_dir(self.tmp, self.path)
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop the temp folder; the final path is left untouched."""
        self._closed = True
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_store(
    path: str | os.PathLike,
    items: Iterable[tuple[str, np.ndarray]],
    dim: int,
    dtype: str = "float32",
    attrs: dict | None = None,
) -> Path:
    """Write ``(id, rows)`` pairs to a new store atomically."""
    with StoreWriter(path, dim, dtype=dtype, attrs=attrs) as w:
        for item_id, rows in items:
            w.append(item_id, rows)
    return Path(path)


@dataclass
class FeatureStore:
    """Read side of a store. Cheap to open; rows are read lazily or all at once.

    Args:
        path: the ``.zarr`` folder.
        expect_dim: fail with a clear message unless the store's dimension is this.
        name: what the store is, for error messages (e.g. ``"clip_frames"``).
    """

    path: Path
    ids: list[str]
    offsets: np.ndarray
    dim: int
    attrs: dict

    @classmethod
    def open(cls, path: str | os.PathLike, expect_dim: int | None = None, name: str | None = None) -> FeatureStore:
        path = Path(path)
        what = f"{name} store {path}" if name else f"feature store {path}"
        if not path.exists():
            raise StoreError(f"{what} does not exist")
        try:
            group = zarr.open_group(str(path), mode="r")
        except Exception as exc:  # zarr raises several types for a non-group folder
            raise StoreError(f"{what} is not a zarr group: {exc}") from exc
        attrs = dict(group.attrs)
        if attrs.get("prvr_store") != FORMAT_VERSION or not attrs.get("complete"):
            raise StoreError(f"{what} is not a complete prvr store (interrupted write?); rebuild it")
        offsets = np.asarray(group["offsets"][:], dtype=np.int64)
        ids = list(attrs["ids"])
        if len(offsets) != len(ids) + 1:
            raise StoreError(f"{what}: {len(ids)} ids but {len(offsets) - 1} offsets")
        dim = int(attrs["dim"])
        if expect_dim is not None and dim != int(expect_dim):
            raise StoreError(f"{what} has dimension {dim}, but {expect_dim} is expected (check the config)")
        store = cls(path=path, ids=ids, offsets=offsets, dim=dim, attrs=attrs)
        store._group = group
        store._index = {k: i for i, k in enumerate(ids)}
        return store

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def uid(self) -> str:
        """Identity of this write of the store (changes whenever the store is rewritten)."""
        return str(self.attrs.get("store_uid", ""))

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._index

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def index(self, item_id: str) -> int:
        try:
            return self._index[item_id]
        except KeyError:
            raise StoreError(f"{self.path}: no item {item_id!r}") from None

    def get(self, item_id: str) -> np.ndarray:
        """Rows of one item, shape (n, D), on-disk dtype."""
        i = self.index(item_id)
        return self._group["rows"][int(self.offsets[i]) : int(self.offsets[i + 1])]

    def __getitem__(self, item_id: str) -> np.ndarray:
        return self.get(item_id)

    def rows(self) -> zarr.Array:
        """The lazy zarr array of all rows (slice it to read)."""
        return self._group["rows"]

    def load(self, dtype: str | None = "float32") -> np.ndarray:
        """All rows in memory, shape (N_rows, D)."""
        arr = self._group["rows"][:]
        return arr.astype(dtype, copy=False) if dtype else arr

    def timestamps(self, item_id: str | None = None) -> np.ndarray | None:
        if "timestamps" not in self._group:
            return None
        if item_id is None:
            return self._group["timestamps"][:]
        i = self.index(item_id)
        return self._group["timestamps"][int(self.offsets[i]) : int(self.offsets[i + 1])]

    def check_ids(self, wanted: Iterable[str], what: str = "ids") -> list[str]:
        """Return the ids of ``wanted`` that the store lacks (in order)."""
        return [w for w in wanted if w not in self._index]


def read_attrs(path: str | os.PathLike) -> dict:
    """Attributes of a store without opening the arrays (for reports)."""
    meta = Path(path) / "zarr.json"
    return json.loads(meta.read_text()).get("attributes", {})
