"""Teacher (CLIP) similarity products, precomputed once from stored CLIP features.

Training needs two teacher products per batch (method spec §5.3-5.4):

* ``raw_max[q, v] = max_l <t_q, T_{v,l}>``: raw (un-normalised) dot products of the CLIP text
  vector of query q with every aligned teacher frame of video v, maximised over the frames
  (the source of the inheritance branch's soft targets);
* ``pos_cos[q] = cos(t_q, T_{y_q,l})`` for every aligned frame l of q's own video (the
  teacher distribution of the frame-level distillation).

"Aligned" frames are the teacher rows resampled to the student's training length
``min(n_s, n_t, max_ctx_l)`` by :func:`prvr.data.dataset.align_teacher`'s rule, so the products
match the student frames the trainer sees. Both are computed for the whole training split
here (chunked float32 matmuls) and written to one zarr group, ``<out_dir>/train.zarr``:

    raw_max      (Nq, Nv) float32      rows = train queries (caption-file order), cols = train videos
    pos_cos      (sum_q L_{y_q},) float32, ragged; pos_offsets (Nq + 1,) int64
    n_student    (Nv,) int64   stored student rows; n_teacher (Nv,) stored teacher rows
    aligned_len  (Nv,) int64   min(n_s, n_t, max_ctx_l)
    attrs        prvr_teacher=1, complete, query_ids, video_ids, max_ctx_l, clip store attributes

written to a temp folder and renamed into place. :func:`teacher_metrics` scores the test split
with the teacher alone (cosine, max over all stored frames) as a baseline row.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from prvr.atomic import replace_dir, write_json
from prvr.config import resolve_device
from prvr.data.captions import Caption, read_captions, video_order
from prvr.data.dataset import (
    DataError,
    _iter_store_items,
    _missing_message,
    aligned_length,
    uniform_feature_sampling,
)
from prvr.store import FeatureStore, library_versions

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _captions(captions: str | os.PathLike | Sequence[Caption]) -> list[Caption]:
    if isinstance(captions, (str, os.PathLike)):
        return read_captions(captions)
    return list(captions)


def text_key(store: FeatureStore, cap_id: str) -> str | None:
    """The store key of a caption's CLIP text: ``cap_id``, else the reference's fallback ``video_id#n``."""
    if cap_id in store:
        return cap_id
    alt = cap_id.replace("#enc#", "#")
    return alt if alt in store else None


def _check(caps, stores, skip_missing, what):
    """Drop or report captions whose video / text is missing. Returns the kept captions."""
    clip_frames, clip_text, student_video = stores
    vids = video_order(caps)
    problems = []
    bad_v: set[str] = set()
    for store, name in ((clip_frames, "teacher video"), (student_video, "student video")):
        if store is None:
            continue
        miss = [v for v in vids if v not in store or store.lengths[store.index(v)] == 0]
        if miss:
            problems.append(_missing_message("videos (or videos with 0 rows)", miss, f"{name} store {store.path}"))
            bad_v |= set(miss)
    miss_q = [c.cap_id for c in caps if text_key(clip_text, c.cap_id) is None]
    if miss_q:
        problems.append(_missing_message("captions", miss_q, f"teacher text store {clip_text.path}"))
    if problems:
        if not skip_missing:
            raise DataError(f"{what}: " + "; ".join(problems) + " (set skip_missing to drop them)")
        log.warning("%s: dropping missing items: %s", what, "; ".join(problems))
        bad_q = set(miss_q)
        caps = [c for c in caps if c.video_id not in bad_v and c.cap_id not in bad_q]
        if not caps:
            raise DataError(f"{what}: no caption left after dropping missing items")
    return caps


def _text_matrix(clip_text: FeatureStore, caps: list[Caption]) -> np.ndarray:
    """(Nq, Dt) float32 CLIP text vectors (first row of each item)."""
    keys = [text_key(clip_text, c.cap_id) for c in caps]
    items = [clip_text.index(k) for k in keys]
    out = np.zeros((len(caps), clip_text.dim), dtype=np.float32)
    for pos, rows in _iter_store_items(clip_text, items):
        out[pos] = rows[0]
    return out


def _padded(rows: list[np.ndarray], idx: np.ndarray, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    lens = np.asarray([len(rows[i]) for i in idx])
    width = int(lens.max())
    out = np.zeros((len(idx), width, dim), dtype=np.float32)
    for j, i in enumerate(idx):
        out[j, : lens[j]] = rows[i]
    mask = np.arange(width)[None, :] < lens[:, None]
    return torch.from_numpy(out), torch.from_numpy(mask)


def _max_scores(
    text: torch.Tensor, frames: list[np.ndarray], device: str, query_chunk: int, video_chunk: int, cosine: bool, out=None
) -> np.ndarray:
    """(Nq, Nv) max over frames of text·frame (raw or cosine), chunked; videos grouped by length."""
    nq, nv = len(text), len(frames)
    res = out if out is not None else np.empty((nq, nv), dtype=np.float32)
    lens = np.asarray([len(f) for f in frames])
    order = np.argsort(lens, kind="stable")  # similar lengths together: little padding
    text = text.to(device)
    if cosine:
        text = torch.nn.functional.normalize(text, dim=-1)
    chunks = []
    for a in range(0, nv, video_chunk):
        idx = order[a : a + video_chunk]
        v, m = _padded(frames, idx, text.shape[1])
        v, m = v.to(device), m.to(device)
        if cosine:
            v = torch.nn.functional.normalize(v, dim=-1)
        chunks.append((idx, v, m))
    with torch.no_grad():
        for qa in range(0, nq, query_chunk):
            q = text[qa : qa + query_chunk]
            block = torch.empty((len(q), nv), dtype=torch.float32, device=device)
            for idx, v, m in chunks:
                s = torch.einsum("qd,vld->qvl", q, v)
                s = s.masked_fill(~m[None], float("-inf")).amax(dim=-1)
                block[:, torch.as_tensor(idx, device=device)] = s
            res[qa : qa + len(q)] = block.cpu().numpy()
    return res


def _clip_attrs(store: FeatureStore) -> dict:
    keep = ("model", "pretrained", "weights_sha256", "random_weights", "channel_order", "kind", "synthetic")
    return {k: store.attrs[k] for k in keep if k in store.attrs}


def teacher_similarity(
    clip_frames: str | os.PathLike,
    clip_text: str | os.PathLike,
    student_video: str | os.PathLike,
    captions_train: str | os.PathLike | Sequence[Caption],
    out_dir: str | os.PathLike,
    max_ctx_l: int = 128,
    device: str = "cpu",
    skip_missing: bool = False,
    query_chunk: int = 2048,
    video_chunk: int = 256,
) -> Path:
    """Write ``<out_dir>/train.zarr``: the teacher's raw max-score matrix and positive-frame cosines.

    Args:
        clip_frames: teacher frame store (one item per video, raw CLIP image vectors).
        clip_text: teacher text store (one item per caption id, first row used; raw CLIP text vectors).
        student_video: student video store (its row counts define the aligned length).
        captions_train: the training caption file (or its captions).
        out_dir: output folder.
        max_ctx_l: the trainer's row cap (128); must equal the training value.
        device: ``cpu``, ``cuda`` or ``auto``.
        skip_missing: drop captions whose features are missing (warning) instead of failing.
        query_chunk, video_chunk: chunk sizes of the (Nq, Nv, L) score computation.

    Returns:
        The path of the written group.
    """
    t0 = time.time()
    device = resolve_device(device)
    caps = _captions(captions_train)
    frames_s = FeatureStore.open(clip_frames, name="teacher video")
    text_s = FeatureStore.open(clip_text, name="teacher text")
    stud_s = FeatureStore.open(student_video, name="student video")
    if text_s.dim != frames_s.dim:
        raise DataError(f"teacher text dim {text_s.dim} ({text_s.path}) != teacher video dim {frames_s.dim} ({frames_s.path})")
    caps = _check(caps, (frames_s, text_s, stud_s), skip_missing, f"teacher targets of {captions_train}")
    video_ids = video_order(caps)
    vindex = {v: i for i, v in enumerate(video_ids)}
    qvideo = np.asarray([vindex[c.video_id] for c in caps], dtype=np.int64)
    n_s = stud_s.lengths[[stud_s.index(v) for v in video_ids]].astype(np.int64)
    f_items = [frames_s.index(v) for v in video_ids]
    n_t = frames_s.lengths[f_items].astype(np.int64)
    a_len = np.asarray([aligned_length(int(a), int(b), max_ctx_l) for a, b in zip(n_s, n_t)], dtype=np.int64)
    frames: list[np.ndarray] = [None] * len(video_ids)  # type: ignore[list-item]
    for pos, rows in _iter_store_items(frames_s, f_items):
        frames[pos] = uniform_feature_sampling(rows.astype(np.float32, copy=False), int(a_len[pos])).astype(np.float32)
    text = torch.from_numpy(_text_matrix(text_s, caps))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "train.zarr"
    tmp = out_dir / f".train.zarr.tmp-{uuid.uuid4().hex[:8]}"
    import zarr

    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        nq, nv = len(caps), len(video_ids)
        rows_per_chunk = int(max(1, min(nq, 2**24 // max(1, nv))))
        raw_z = group.create_array("raw_max", shape=(nq, nv), chunks=(rows_per_chunk, nv), dtype="float32", compressors=None)
        step = max(query_chunk, rows_per_chunk)
        step = (step // rows_per_chunk) * rows_per_chunk
        for a in range(0, nq, step):
            block = _max_scores(text[a : a + step], frames, device, query_chunk, video_chunk, cosine=False)
            raw_z[a : a + len(block)] = block
        # positive-frame cosines, per video (its queries x its aligned frames)
        pos_off = np.concatenate([[0], np.cumsum(a_len[qvideo])]).astype(np.int64)
        pos = np.zeros(int(pos_off[-1]), dtype=np.float32)
        tn = torch.nn.functional.normalize(text, dim=-1)
        order = np.argsort(qvideo, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(qvideo, minlength=nv))])
        for v in range(nv):
            qs = order[bounds[v] : bounds[v + 1]]
            fv = torch.nn.functional.normalize(torch.from_numpy(frames[v]), dim=-1)
            c = (tn[qs] @ fv.T).numpy()  # (k, L)
            for j, q in enumerate(qs):
                pos[pos_off[q] : pos_off[q + 1]] = c[j]
        group.create_array("pos_cos", data=pos, chunks=(max(1, min(len(pos), 2**22)),))
        group.create_array("pos_offsets", data=pos_off)
        group.create_array("n_student", data=n_s)
        group.create_array("n_teacher", data=n_t)
        group.create_array("aligned_len", data=a_len)
        group.attrs.update(
            {
                "prvr_teacher": FORMAT_VERSION,
                "query_ids": [c.cap_id for c in caps],
                "video_ids": video_ids,
                "max_ctx_l": int(max_ctx_l),
                "n_queries": nq,
                "n_videos": nv,
                "alignment": "teacher rows resampled (uniform_feature_sampling) to min(n_s, n_t, max_ctx_l)",
                "clip": _clip_attrs(frames_s),
                "versions": library_versions(),
                "store_uid": uuid.uuid4().hex,  # new on every write (the trainer's resume key)
                "sources": {"clip_frames": frames_s.attrs.get("store_uid"), "clip_text": text_s.attrs.get("store_uid"),
                            "student_video": stud_s.attrs.get("store_uid")},
                "complete": True,
            }
        )
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("teacher targets: %d queries x %d videos in %.1f s -> %s", len(caps), len(video_ids), time.time() - t0, final)
    return final


def teacher_scores(
    clip_frames: str | os.PathLike | FeatureStore,
    clip_text: str | os.PathLike | FeatureStore,
    captions: Sequence[Caption],
    device: str = "cpu",
    query_chunk: int = 2048,
    video_chunk: int = 256,
) -> tuple[np.ndarray, list[str]]:
    """Teacher-alone scores: cosine of CLIP text and frames, max over all stored frames.

    Returns:
        (scores (Nq, Nv) float32, gallery video ids in order of first appearance).
    """
    frames_s = clip_frames if isinstance(clip_frames, FeatureStore) else FeatureStore.open(clip_frames, name="teacher video")
    text_s = clip_text if isinstance(clip_text, FeatureStore) else FeatureStore.open(clip_text, name="teacher text")
    video_ids = video_order(captions)
    items = [frames_s.index(v) for v in video_ids]
    frames: list[np.ndarray] = [None] * len(video_ids)  # type: ignore[list-item]
    for pos, rows in _iter_store_items(frames_s, items):
        frames[pos] = np.asarray(rows, dtype=np.float32)
    text = torch.from_numpy(_text_matrix(text_s, list(captions)))
    return _max_scores(text, frames, resolve_device(device), query_chunk, video_chunk, cosine=True), video_ids


def teacher_metrics(
    clip_frames: str | os.PathLike,
    clip_text: str | os.PathLike,
    captions_test: str | os.PathLike | Sequence[Caption],
    out_json: str | os.PathLike,
    device: str = "cpu",
    skip_missing: bool = False,
) -> dict:
    """Test metrics of the teacher alone (a baseline row of the report); writes ``out_json``.

    Scores are cosines of raw CLIP text and frame vectors, max over all stored frames (no cap,
    no alignment). Returns the metrics dict (R@1, R@5, R@10, R@100, SumR, medr, meanr, mAP, ...).
    """
    from prvr.metrics import ranks_from_scores, recall_metrics

    caps = _captions(captions_test)
    frames_s = FeatureStore.open(clip_frames, name="teacher video")
    text_s = FeatureStore.open(clip_text, name="teacher text")
    caps = _check(caps, (frames_s, text_s, None), skip_missing, f"teacher metrics of {captions_test}")
    scores, video_ids = teacher_scores(frames_s, text_s, caps, device=device)
    vindex = {v: i for i, v in enumerate(video_ids)}
    gt = torch.as_tensor([vindex[c.video_id] for c in caps], dtype=torch.long)
    ranks = ranks_from_scores(torch.from_numpy(scores), gt)
    metrics = {k: float(v) for k, v in recall_metrics(ranks).items()}
    metrics.update(
        {
            "n_queries": len(caps),
            "n_videos": len(video_ids),
            "scoring": "teacher alone: cosine(CLIP text, CLIP frame), max over all stored frames",
            "clip": _clip_attrs(frames_s),
        }
    )
    if frames_s.attrs.get("random_weights") or text_s.attrs.get("random_weights"):
        metrics["random_weights"] = True
    write_json(out_json, metrics)
    return metrics

