"""Training and evaluation data of DL-DKD++: feature loading, resampling, alignment, batching.

A split is read ONCE from the prvr feature stores into contiguous ragged arrays (one
row block per video / caption, plus offsets), already resampled, in the store's dtype
(float16 stores stay float16 in memory: half the RAM); batches are then gathered with a few
vectorised index operations and L2-normalised in float32 (no per-sample disk reads, no
DataLoader workers). Splits larger than ``memory_budget_gb`` are written once to a
memory-mapped cache file instead of RAM.

Normalising per batch instead of at load time gives the same float32 rows as normalising
first, except that rows averaged by the resampling are rounded once to the store's dtype
(float16 stores only; a relative change below 1e-3).

Processing rules (method spec §2.3-2.6, §9 item 1, §11.1-11.3):

* Student video rows, **training** (teacher present): if ``n_s > n_t`` the student is first
  averaged down to ``n_t`` rows, then capped at ``max_ctx_l`` (two passes, as the reference
  loader), then every row is L2-normalised with ``x / (||x|| + 1e-5)``. Final length
  ``L = min(n_s, n_t, max_ctx_l)``.
* Teacher video rows, **training**: resampled straight from the stored ``n_t`` rows to the
  student's final length ``L`` with :func:`uniform_feature_sampling`. When ``n_t <= n_s`` this
  is exactly the reference's cap at ``max_ctx_l``; when the teacher is longer than the
  student (``n_t > n_s`` and ``n_s < max_ctx_l``, where the reference either crashes or hides
  teacher frames behind the student mask) prvr averages the teacher onto the student's
  time steps instead, in one pass, so row ``l`` of both covers the same part of the video.
  Teacher rows are never normalised here (raw CLIP vectors).
* Student video rows, **evaluation**: capped at ``max_ctx_l`` and L2-normalised; no teacher.
* Student text tokens: every token L2-normalised (eps 1e-5), then the first ``max_desc_l``
  kept.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prvr.data.captions import Caption, video_order
from prvr.store import FeatureStore, StoreError

log = logging.getLogger(__name__)

L2_EPS = 1e-5
READ_BLOCK_BYTES = 64 * 2**20  # bytes read from a store in one slice while loading


class DataError(ValueError):
    """Features and captions do not fit together; the message names ids and files."""


# --------------------------------------------------------------------------------------
# resampling and normalisation (pure numpy)
# --------------------------------------------------------------------------------------


def _segment_boundaries(n: int, length: int) -> np.ndarray:
    """Boundaries b_0..b_L of the reference: round_half_even((i / L) * n) in float64, clipped to n-1."""
    b = np.round(np.arange(length + 1, dtype=np.float64) / length * n).astype(np.int64)
    np.minimum(b, n - 1, out=b)
    return b


def _segment_means(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row i = mean(x[b_i:b_{i+1}]) when b_i < b_{i+1}, else x[b_i]. Accumulates in float64."""
    starts, ends = b[:-1], b[1:]
    counts = ends - starts
    csum = np.zeros((len(x) + 1, x.shape[1]), dtype=np.float64)
    np.cumsum(x, axis=0, dtype=np.float64, out=csum[1:])
    safe = np.maximum(counts, 1)[:, None]
    out = (csum[ends] - csum[starts]) / safe
    single = counts <= 0
    if single.any():
        out[single] = x[starts[single]]
    return out.astype(x.dtype if x.dtype in (np.float32, np.float64) else np.float32, copy=False)


def uniform_feature_sampling(x: np.ndarray, max_len: int) -> np.ndarray:
    """Cap a sequence at ``max_len`` rows by averaging uniform segments (§2.5, §11.3).

    ``n <= max_len`` returns ``x`` unchanged (no upsampling). Otherwise, with boundaries
    ``b_i = round_half_even((i / max_len) * n)`` (float64, clipped to ``n - 1``), output row i
    is the mean of ``x[b_i:b_{i+1}]`` if that range is non-empty, else ``x[b_i]``. As in the
    reference, the clip to ``n - 1`` leaves the very last input row out of the last segment.

    Args:
        x: (n, D) rows.
        max_len: maximum number of output rows (>= 1).

    Returns:
        (min(n, max_len), D) array.
    """
    x = np.asarray(x)
    if max_len < 1:
        raise ValueError(f"uniform_feature_sampling: max_len must be >= 1, got {max_len}")
    n = len(x)
    if n <= max_len:
        return x
    return _segment_means(x, _segment_boundaries(n, max_len))


def average_to_fixed_length(x: np.ndarray, length: int) -> np.ndarray:
    """Resample a sequence to exactly ``length`` rows (MS-SL clip branch, §2.5).

    Same boundaries as :func:`uniform_feature_sampling` but always applied: averages when
    ``n > length`` and repeats rows when ``n < length``.

    Args:
        x: (n, D) rows, n >= 1.
        length: number of output rows M.

    Returns:
        (M, D) array.
    """
    x = np.asarray(x)
    if length < 1 or len(x) < 1:
        raise ValueError(f"average_to_fixed_length: need n >= 1 and length >= 1, got n={len(x)}, length={length}")
    return _segment_means(x, _segment_boundaries(len(x), length))


def l2_normalize(x: np.ndarray, eps: float = L2_EPS) -> np.ndarray:
    """Row-wise ``x / (||x|| + eps)`` (the reference's ``l2_normalize_np_array``); float32 out."""
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + eps)


def aligned_length(n_s: int, n_t: int | None, max_ctx_l: int) -> int:
    """Final number of rows of a training video: ``min(n_s, n_t, max_ctx_l)`` (no teacher: ``min(n_s, max_ctx_l)``)."""
    return int(min(n_s, max_ctx_l) if n_t is None else min(n_s, n_t, max_ctx_l))


def align_student(student: np.ndarray, n_t: int | None, max_ctx_l: int) -> np.ndarray:
    """Student rows of a training video: average down to ``n_t`` if longer, then cap at ``max_ctx_l``.

    Args:
        student: (n_s, Dv) raw student rows.
        n_t: number of stored teacher rows of the video, or None (no teacher).
        max_ctx_l: row cap (128).

    Returns:
        (min(n_s, n_t, max_ctx_l), Dv), not normalised.
    """
    x = np.asarray(student)
    if n_t is not None and len(x) > n_t:
        x = uniform_feature_sampling(x, n_t)
    return uniform_feature_sampling(x, max_ctx_l)


def align_teacher(student: np.ndarray, teacher: np.ndarray, max_ctx_l: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Align the student and teacher rows of one training video (§9 item 1, §11.1-11.2).

    Student: averaged down to ``n_t`` when ``n_s > n_t``, then capped at ``max_ctx_l``.
    Teacher: resampled from its ``n_t`` stored rows to the student's final length ``L``
    (identical to the reference's cap when ``n_t <= n_s``; prvr's own rule when the teacher
    is longer). Never fails for any ``n_s, n_t >= 1``.

    Args:
        student: (n_s, Dv) raw student rows.
        teacher: (n_t, Dt) raw teacher rows.
        max_ctx_l: row cap.

    Returns:
        (student (L, Dv), teacher (L, Dt)), both not normalised; L = min(n_s, n_t, max_ctx_l).
    """
    if len(student) < 1 or len(teacher) < 1:
        raise DataError(f"align_teacher: empty sequence (student {len(student)} rows, teacher {len(teacher)} rows)")
    s = align_student(student, len(teacher), max_ctx_l)
    t = uniform_feature_sampling(np.asarray(teacher), len(s))
    return s, t


# --------------------------------------------------------------------------------------
# ragged storage
# --------------------------------------------------------------------------------------


@dataclass
class Ragged:
    """Rows of many items in one (N_rows + 1, D) array; item i owns ``values[offsets[i]:offsets[i+1]]``.

    The extra last row is all zeros and serves as the padding source, so a padded batch is
    one ``index_select``. ``values`` is a CPU torch tensor or a read-only numpy memmap
    (float32 or float16). With ``normalize`` every gathered row is L2-normalised
    (``x / (||x|| + 1e-5)``, float32); padding rows stay zero.
    """

    values: torch.Tensor | np.ndarray
    offsets: np.ndarray
    normalize: bool = False

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def dim(self) -> int:
        return int(self.values.shape[1]) if self.values.ndim == 2 else 0

    @property
    def pad_row(self) -> int:
        return int(self.offsets[-1])

    def padded_index(self, items: np.ndarray, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Row indices (n, L) for ``items`` padded with the zero row, and the mask (n, L) bool."""
        items = np.asarray(items, dtype=np.int64)
        lens = self.lengths[items]
        width = int(lens.max()) if len(lens) else 0
        if pad_to is not None:
            if pad_to < width:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest item ({width})")
            width = pad_to
        pos = np.arange(width, dtype=np.int64)
        mask = pos[None, :] < lens[:, None]
        index = np.where(mask, self.offsets[items][:, None] + pos[None, :], self.pad_row)
        return index, mask

    def take_rows(self, index: np.ndarray, device: str | torch.device | None = None) -> torch.Tensor:
        """Rows at ``index`` (any shape) as a float32 tensor of shape index.shape + (D,).

        Rows are gathered where ``values`` live, moved to ``device`` (default: there) in the
        storage dtype, then converted and normalised on ``device``.
        """
        flat = np.ascontiguousarray(index.reshape(-1))
        if isinstance(self.values, torch.Tensor):
            out = self.values.index_select(0, torch.from_numpy(flat).to(self.values.device))
        else:
            out = torch.from_numpy(np.asarray(self.values[flat]))
        if device is not None and out.device != torch.device(device):
            out = out.pin_memory().to(device, non_blocking=True) if out.device.type == "cpu" and _cuda(device) else out.to(device)
        out = out.float()
        if self.normalize:
            out = out / (torch.linalg.vector_norm(out, dim=-1, keepdim=True) + L2_EPS)
        return out.reshape(*index.shape, *self.values.shape[1:])

    def padded(self, items: np.ndarray, pad_to: int | None = None,
               device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Zero-padded rows (n, L, D) and mask (n, L) (float32 1/0) of ``items``, on ``device``."""
        index, mask = self.padded_index(items, pad_to)
        rows = self.take_rows(index, device)
        return rows, torch.from_numpy(mask.astype(np.float32)).to(rows.device)

    def to(self, device: str | torch.device) -> Ragged:
        """Move in-memory values to ``device`` (memory-mapped values stay on the host)."""
        if isinstance(self.values, torch.Tensor):
            self.values = self.values.to(device)
        return self

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() if isinstance(self.values, torch.Tensor) else 0


class _Allocator:
    """Puts arrays in RAM while the budget lasts, else in memory-mapped files under ``cache_dir``."""

    def __init__(self, budget_bytes: float, cache_dir: str | os.PathLike | None):
        self.left = float(budget_bytes)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._owned_tmp: str | None = None
        self.mapped: list[Path] = []

    def zeros(self, shape: tuple[int, ...], what: str, dtype=np.float32) -> torch.Tensor | np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = dtype.itemsize * math.prod(shape)
        if nbytes <= self.left:
            self.left -= nbytes
            return torch.zeros(shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
        if self.cache_dir is None:
            self._owned_tmp = self._owned_tmp or tempfile.mkdtemp(prefix="prvr-cache-")
            self.cache_dir = Path(self._owned_tmp)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self.cache_dir / f"{what}-{uuid.uuid4().hex[:8]}.npy"
        log.info("%s: %.2f GB above the memory budget, memory-mapped at %s", what, nbytes / 1e9, path)
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        self.mapped.append(path)
        return arr

    @staticmethod
    def finish(arr: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        if isinstance(arr, np.memmap):
            arr.flush()
            return np.load(arr.filename, mmap_mode="r")
        return arr


def _iter_store_items(store: FeatureStore, rows_idx: Sequence[int], block_rows: int | None = None):
    """Yield ``(position, rows)`` for store items ``rows_idx`` (store indices), reading in big slices."""
    if block_rows is None:
        itemsize = np.dtype(store.rows().dtype).itemsize
        block_rows = max(1, READ_BLOCK_BYTES // max(1, store.dim * itemsize))
    order = np.argsort(np.asarray(rows_idx, dtype=np.int64), kind="stable")
    arr = store.rows()
    off = store.offsets
    k = 0
    while k < len(order):
        first = rows_idx[order[k]]
        lo = int(off[first])
        j = k
        hi = int(off[first + 1])
        while j + 1 < len(order) and int(off[rows_idx[order[j + 1]] + 1]) - lo <= block_rows:
            j += 1
            hi = int(off[rows_idx[order[j]] + 1])
        block = arr[lo:hi] if hi > lo else np.zeros((0, store.dim), dtype=np.float32)
        for t in range(k, j + 1):
            pos = int(order[t])
            i = rows_idx[pos]
            yield pos, block[int(off[i]) - lo : int(off[i + 1]) - lo]
        k = j + 1


def _cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _memory_dtype(store: FeatureStore, storage: str) -> np.dtype:
    """float16 for a float16 store under ``storage="auto"``, else float32."""
    on_disk = np.dtype(store.rows().dtype)
    return np.dtype(np.float16) if storage == "auto" and on_disk == np.float16 else np.dtype(np.float32)


def _missing_message(what: str, missing: list[str], where: str) -> str:
    head = ", ".join(missing[:10])
    more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
    return f"{len(missing)} {what} missing from {where}: {head}{more}"


# --------------------------------------------------------------------------------------
# teacher products of the training split (written by prvr.teacher)
# --------------------------------------------------------------------------------------


@dataclass
class TeacherTargets:
    """Precomputed teacher products of the training split (see :mod:`prvr.teacher`).

    Attributes:
        raw_max: (Nq_t, Nv_t) float32 tensor or memmap: max over aligned teacher frames of raw dot products.
        pos_cos: ragged per teacher query (rows of width 1): cosine with each aligned frame of its positive video.
        query_ids, video_ids: row / column ids of ``raw_max``.
        n_teacher: (Nv_t,) stored teacher rows per video; aligned_len: (Nv_t,) final aligned length.
    """

    raw_max: torch.Tensor | np.ndarray
    pos_cos: Ragged
    query_ids: list[str]
    video_ids: list[str]
    n_teacher: np.ndarray
    aligned_len: np.ndarray
    max_ctx_l: int
    path: Path | None = None
    uid: str | None = None

    @classmethod
    def load(cls, teacher_dir: str | os.PathLike, allocator: _Allocator | None = None) -> TeacherTargets:
        """Read ``<teacher_dir>/train.zarr`` (a complete group written by :func:`prvr.teacher.teacher_similarity`)."""
        import zarr

        path = Path(teacher_dir)
        if path.suffix != ".zarr":
            path = path / "train.zarr"
        if not path.exists():
            raise StoreError(f"teacher targets {path} do not exist (run the teacher stage)")
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        if attrs.get("prvr_teacher") != 1 or not attrs.get("complete"):
            raise StoreError(f"teacher targets {path} are not complete (interrupted write?); rebuild them")
        alloc = allocator or _Allocator(float("inf"), None)
        raw_z = group["raw_max"]
        raw = alloc.zeros(tuple(raw_z.shape), "teacher_raw_max")
        step = max(1, int(2**26 // max(1, raw_z.shape[1])))  # ~256 MB slices
        for a in range(0, raw_z.shape[0], step):
            block = raw_z[a : a + step]
            raw[a : a + len(block)] = torch.from_numpy(block) if isinstance(raw, torch.Tensor) else block
        raw = alloc.finish(raw)
        pos_vals = np.asarray(group["pos_cos"][:], dtype=np.float32)
        pos_off = np.asarray(group["pos_offsets"][:], dtype=np.int64)
        pos = Ragged(torch.from_numpy(np.concatenate([pos_vals, [0.0]]).astype(np.float32)[:, None]), pos_off)
        return cls(
            raw_max=raw,
            pos_cos=pos,
            query_ids=list(attrs["query_ids"]),
            video_ids=list(attrs["video_ids"]),
            n_teacher=np.asarray(group["n_teacher"][:], dtype=np.int64),
            aligned_len=np.asarray(group["aligned_len"][:], dtype=np.int64),
            max_ctx_l=int(attrs["max_ctx_l"]),
            path=path,
            uid=attrs.get("store_uid"),
        )

    def raw_block(self, rows: np.ndarray, cols: np.ndarray, device: str | torch.device | None = None) -> torch.Tensor:
        """``raw_max[rows][:, cols]`` as a float32 tensor (len(rows), len(cols)) on ``device``."""
        if isinstance(self.raw_max, torch.Tensor):
            dev = self.raw_max.device
            r = torch.from_numpy(np.ascontiguousarray(rows)).to(dev)
            c = torch.from_numpy(np.ascontiguousarray(cols)).to(dev)
            out = self.raw_max.index_select(0, r).index_select(1, c)
        else:
            out = torch.from_numpy(np.asarray(self.raw_max[np.asarray(rows)][:, np.asarray(cols)], dtype=np.float32))
        return out if device is None else out.to(device)

    def to(self, device: str | torch.device) -> TeacherTargets:
        if isinstance(self.raw_max, torch.Tensor):
            self.raw_max = self.raw_max.to(device)
        self.pos_cos.to(device)
        return self

    @property
    def nbytes(self) -> int:
        raw = self.raw_max.numel() * 4 if isinstance(self.raw_max, torch.Tensor) else 0
        return raw + self.pos_cos.nbytes


# --------------------------------------------------------------------------------------
# one split in memory
# --------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One training batch (§2.6, §5.1). Shapes: B videos, Nq queries, L frames, Lq tokens.

    Attributes:
        video: (B, L, Dv) L2-normalised rows, zero padded; video_mask: (B, L) 1/0 float.
        query: (Nq, Lq, Dq) L2-normalised tokens, zero padded; query_mask: (Nq, Lq).
        labels: (Nq,) int64, index in 0..B-1 of each query's video.
        teacher_raw: (Nq, B) teacher raw max scores or None.
        teacher_pos_cos: (Nq, L) teacher cosine of each query with the frames of its own video
            (zeros beyond that video's length) or None.
        video_idx, query_idx: split indices of the batch's videos and queries (numpy).
    """

    video: torch.Tensor
    video_mask: torch.Tensor
    query: torch.Tensor
    query_mask: torch.Tensor
    labels: torch.Tensor
    teacher_raw: torch.Tensor | None
    teacher_pos_cos: torch.Tensor | None
    video_idx: np.ndarray = field(repr=False)
    query_idx: np.ndarray = field(repr=False)

    def to(self, device: str | torch.device, non_blocking: bool = False) -> Batch:
        def mv(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(
            mv(self.video), mv(self.video_mask), mv(self.query), mv(self.query_mask), mv(self.labels),
            mv(self.teacher_raw), mv(self.teacher_pos_cos), self.video_idx, self.query_idx,
        )  # fmt: skip


class PRVRData:
    """One split (train, val or test) loaded once into contiguous ragged arrays.

    Videos are the unique video ids of the caption list in order of first appearance (the
    evaluation gallery order, §1.2); queries are the captions in file order. Use
    :meth:`load` to build one.

    Attributes:
        video_ids: (Nv) ids; query_ids: (Nq) caption ids.
        query_video: (Nq,) int64 video index of every query.
        video_queries: Ragged index: queries of video v are ``vq_index[vq_offsets[v]:vq_offsets[v+1]]``
            (caption-file order).
        videos: Ragged (Nv items, Dv) processed student rows; texts: Ragged (Nq items, Dq) tokens.
        teacher: TeacherTargets or None; teacher_q / teacher_v map split indices to its rows / columns.
    """

    def __init__(self, video_ids, query_ids, query_video, videos, texts, teacher=None, teacher_q=None, teacher_v=None,
                 allocator=None):  # fmt: skip
        self.video_ids: list[str] = list(video_ids)
        self.query_ids: list[str] = list(query_ids)
        self.query_video = np.asarray(query_video, dtype=np.int64)
        self.videos: Ragged = videos
        self.texts: Ragged = texts
        self.teacher: TeacherTargets | None = teacher
        self.teacher_q = teacher_q
        self.teacher_v = teacher_v
        self._allocator = allocator
        self.sources: dict[str, str | None] = {}  # write uids of the stores read (cache/resume keys)
        order = np.argsort(self.query_video, kind="stable")
        counts = np.bincount(self.query_video, minlength=len(self.video_ids))
        self.n_captions = counts.astype(np.int64)
        self.vq_index = order.astype(np.int64)
        self.vq_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    # ---------------------------------------------------------------- construction
    @classmethod
    def load(
        cls,
        captions: Sequence[Caption],
        student_video: str | os.PathLike | FeatureStore,
        student_text: str | os.PathLike | FeatureStore,
        *,
        teacher: str | os.PathLike | TeacherTargets | None = None,
        max_ctx_l: int = 128,
        max_desc_l: int = 30,
        skip_missing: bool = False,
        memory_budget_gb: float = 8.0,
        cache_dir: str | os.PathLike | None = None,
        split: str = "split",
        storage: str = "auto",
    ) -> PRVRData:
        """Read one split's features into memory (or a memory-mapped cache above the budget).

        Args:
            captions: the split's captions (``prvr.data.captions.read_captions``).
            student_video: store of student video rows (one item per video id).
            student_text: store of student token rows (one item per caption id).
            teacher: training only: the teacher folder / ``train.zarr`` of
                :func:`prvr.teacher.teacher_similarity` (or loaded targets). With a teacher the
                student rows are aligned to the teacher's length (module docstring).
            max_ctx_l, max_desc_l: row caps of videos (128) and queries (30).
            skip_missing: drop (with a warning) captions whose video, tokens or teacher rows
                are missing instead of failing.
            memory_budget_gb: arrays beyond this total are memory-mapped under ``cache_dir``.
            cache_dir: folder for memory-mapped caches (default: a temp folder).
            split: name used in messages.
            storage: in-memory dtype of the rows: ``auto`` (the store's: float16 or float32) or
                ``float32``. Rows are L2-normalised per batch, in float32.
        """
        if storage not in ("auto", "float32"):
            raise ValueError(f"storage must be 'auto' or 'float32', got {storage!r}")
        vstore = student_video if isinstance(student_video, FeatureStore) else FeatureStore.open(student_video, name="student video")
        tstore = student_text if isinstance(student_text, FeatureStore) else FeatureStore.open(student_text, name="student text")
        alloc = _Allocator(memory_budget_gb * 1e9, cache_dir)
        targets = None
        if teacher is not None:
            targets = teacher if isinstance(teacher, TeacherTargets) else TeacherTargets.load(teacher, alloc)
            if targets.max_ctx_l != max_ctx_l:
                raise DataError(
                    f"teacher targets {targets.path} were computed with max_ctx_l={targets.max_ctx_l}, "
                    f"training uses {max_ctx_l}; rebuild the teacher stage"
                )
        caps = list(captions)
        problems: list[tuple[str, list[str], str]] = []
        vids_all = video_order(caps)
        miss_v = vstore.check_ids(vids_all)
        if miss_v:
            problems.append(("videos", miss_v, f"student video store {vstore.path}"))
        empty_v = [v for v in vids_all if v in vstore and vstore.lengths[vstore.index(v)] == 0]
        if empty_v:
            problems.append(("videos with 0 rows", empty_v, f"student video store {vstore.path}"))
        miss_t = tstore.check_ids(c.cap_id for c in caps)
        if miss_t:
            problems.append(("captions", miss_t, f"student text store {tstore.path}"))
        empty_t = [c.cap_id for c in caps if c.cap_id in tstore and tstore.lengths[tstore.index(c.cap_id)] == 0]
        if empty_t:
            problems.append(("captions with 0 tokens", empty_t, f"student text store {tstore.path}"))
        if targets is not None:
            tq = {q: i for i, q in enumerate(targets.query_ids)}
            tv = {v: i for i, v in enumerate(targets.video_ids)}
            miss_tq = [c.cap_id for c in caps if c.cap_id not in tq]
            if miss_tq:
                problems.append(("captions", miss_tq, f"teacher targets {targets.path}"))
            miss_tv = [v for v in vids_all if v not in tv]
            if miss_tv:
                problems.append(("videos", miss_tv, f"teacher targets {targets.path}"))
        if problems:
            msgs = [_missing_message(w, m, where) for w, m, where in problems]
            if not skip_missing:
                raise DataError(f"{split}: " + "; ".join(msgs) + " (set skip_missing to drop them)")
            bad_v = set(miss_v) | set(empty_v)
            bad_q = set(miss_t) | set(empty_t)
            if targets is not None:
                bad_q |= set(miss_tq)
                bad_v |= set(miss_tv)
            n0 = len(caps)
            caps = [c for c in caps if c.video_id not in bad_v and c.cap_id not in bad_q]
            log.warning("%s: dropped %d of %d captions: %s", split, n0 - len(caps), n0, "; ".join(msgs))
            if not caps:
                raise DataError(f"{split}: no caption left after dropping missing items")
        video_ids = video_order(caps)
        vindex = {v: i for i, v in enumerate(video_ids)}
        query_ids = [c.cap_id for c in caps]
        query_video = np.asarray([vindex[c.video_id] for c in caps], dtype=np.int64)

        # ---- videos
        v_items = [vstore.index(v) for v in video_ids]
        n_s = vstore.lengths[v_items]
        teacher_q = teacher_v = None
        if targets is not None:
            tq = {q: i for i, q in enumerate(targets.query_ids)}
            tv = {v: i for i, v in enumerate(targets.video_ids)}
            teacher_q = np.asarray([tq[q] for q in query_ids], dtype=np.int64)
            teacher_v = np.asarray([tv[v] for v in video_ids], dtype=np.int64)
            n_t = targets.n_teacher[teacher_v]
            out_len = np.minimum(np.minimum(n_s, n_t), max_ctx_l)
            stale = np.nonzero(out_len != targets.aligned_len[teacher_v])[0]
            if len(stale):
                ids = [video_ids[i] for i in stale]
                raise DataError(
                    f"{split}: teacher targets {targets.path} do not match the student video store {vstore.path} "
                    f"({len(ids)} videos with another aligned length, e.g. {ids[:5]}); rebuild the teacher stage"
                )
            pos_len = targets.pos_cos.lengths[teacher_q]
            bad = np.nonzero(pos_len != out_len[query_video])[0]
            if len(bad):
                raise DataError(f"{split}: teacher pos_cos lengths do not match aligned video lengths (e.g. {query_ids[bad[0]]})")
        else:
            n_t = None
            out_len = np.minimum(n_s, max_ctx_l)
        v_off = np.concatenate([[0], np.cumsum(out_len)]).astype(np.int64)
        vdtype = _memory_dtype(vstore, storage)
        vvals = alloc.zeros((int(v_off[-1]) + 1, vstore.dim), "student_video", vdtype)
        for pos, rows in _iter_store_items(vstore, v_items):
            x = align_student(rows, None if n_t is None else int(n_t[pos]), max_ctx_l).astype(vdtype, copy=False)
            dst = vvals[int(v_off[pos]) : int(v_off[pos + 1])]
            if isinstance(dst, torch.Tensor):
                dst.copy_(torch.from_numpy(x))
            else:
                dst[:] = x
        videos = Ragged(alloc.finish(vvals), v_off, normalize=True)

        # ---- texts
        t_items = [tstore.index(q) for q in query_ids]
        q_len = np.minimum(tstore.lengths[t_items], max_desc_l)
        q_off = np.concatenate([[0], np.cumsum(q_len)]).astype(np.int64)
        tdtype = _memory_dtype(tstore, storage)
        tvals = alloc.zeros((int(q_off[-1]) + 1, tstore.dim), "student_text", tdtype)
        for pos, rows in _iter_store_items(tstore, t_items):
            x = np.asarray(rows[:max_desc_l]).astype(tdtype, copy=False)
            dst = tvals[int(q_off[pos]) : int(q_off[pos + 1])]
            if isinstance(dst, torch.Tensor):
                dst.copy_(torch.from_numpy(x))
            else:
                dst[:] = x
        texts = Ragged(alloc.finish(tvals), q_off, normalize=True)
        data = cls(video_ids, query_ids, query_video, videos, texts, targets, teacher_q, teacher_v, alloc)
        data.sources = {
            "student_video": vstore.attrs.get("store_uid"),
            "student_text": tstore.attrs.get("store_uid"),
            "teacher": None if targets is None else targets.uid,
        }
        return data

    def close(self) -> None:
        """Delete memory-mapped cache files this object created."""
        if self._allocator is None:
            return
        for p in self._allocator.mapped:
            try:
                p.unlink()
            except OSError:
                pass
        if self._allocator._owned_tmp:
            shutil.rmtree(self._allocator._owned_tmp, ignore_errors=True)
        self._allocator.mapped = []

    # ---------------------------------------------------------------- properties
    @property
    def memory_left_gb(self) -> float:
        """What is left of ``memory_budget_gb`` after this split's in-memory arrays."""
        return float("inf") if self._allocator is None else self._allocator.left / 1e9

    @property
    def n_videos(self) -> int:
        return len(self.video_ids)

    @property
    def n_queries(self) -> int:
        return len(self.query_ids)

    @property
    def video_dim(self) -> int:
        return self.videos.dim

    @property
    def query_dim(self) -> int:
        return self.texts.dim

    # ---------------------------------------------------------------- batches
    def collate(self, video_idx: np.ndarray, device: str | torch.device | None = None) -> Batch:
        """Build the training batch of the videos ``video_idx`` (§2.6), on ``device`` (default: the data's).

        Videos are stably sorted by caption count (descending); their queries are concatenated
        video by video in caption-file order; ``labels[j]`` is the batch position of query j's video.
        """
        vb = np.asarray(video_idx, dtype=np.int64)
        vb = vb[np.argsort(-self.n_captions[vb], kind="stable")]
        counts = self.n_captions[vb]
        starts = self.vq_offsets[vb]
        total = int(counts.sum())
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        qidx = self.vq_index[np.repeat(starts, counts) + within]
        video, vmask = self.videos.padded(vb, device=device)
        query, qmask = self.texts.padded(qidx, device=video.device)
        labels = torch.from_numpy(np.repeat(np.arange(len(vb), dtype=np.int64), counts)).to(video.device)
        t_raw = t_pos = None
        if self.teacher is not None:
            t_raw = self.teacher.raw_block(self.teacher_q[qidx], self.teacher_v[vb], device=video.device)
            pos, _ = self.teacher.pos_cos.padded(self.teacher_q[qidx], pad_to=video.shape[1], device=video.device)
            t_pos = pos[..., 0]
        return Batch(video, vmask, query, qmask, labels, t_raw, t_pos, vb, qidx)

    def n_batches(self, batch_size: int) -> int:
        return -(-self.n_videos // batch_size)

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """Video permutation of one epoch: ``torch.randperm`` with a generator seeded from (seed, epoch)."""
        state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]).generate_state(2, dtype=np.uint32)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return torch.randperm(self.n_videos, generator=gen).numpy()

    def train_batches(self, batch_size: int, seed: int, epoch: int, start: int = 0,
                      device: str | torch.device | None = None) -> Iterator[Batch]:  # fmt: skip
        """Yield the epoch's batches (shuffled videos, ``batch_size`` per batch, last one smaller), from batch ``start``."""
        order = self.epoch_order(seed, epoch)
        for b in range(start, self.n_batches(batch_size)):
            yield self.collate(order[b * batch_size : (b + 1) * batch_size], device=device)

    def video_batches(self, batch_size: int, device=None) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """Gallery order: yield (indices, rows (b, L, Dv), mask (b, L))."""
        for a in range(0, self.n_videos, batch_size):
            idx = np.arange(a, min(a + batch_size, self.n_videos))
            v, m = self.videos.padded(idx, device=device)
            yield idx, v, m

    def query_batches(self, batch_size: int, device=None) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """Caption order: yield (indices, tokens (b, Lq, Dq), mask (b, Lq))."""
        for a in range(0, self.n_queries, batch_size):
            idx = np.arange(a, min(a + batch_size, self.n_queries))
            q, m = self.texts.padded(idx, device=device)
            yield idx, q, m

    @property
    def nbytes(self) -> int:
        """Bytes of the in-memory (not memory-mapped) arrays."""
        return self.videos.nbytes + self.texts.nbytes + (self.teacher.nbytes if self.teacher is not None else 0)

    def to(self, device: str | torch.device) -> PRVRData:
        """Move the in-memory arrays to ``device`` (batches are then gathered there)."""
        self.videos.to(device)
        self.texts.to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        return self
