"""Feature extraction: a manifest of videos → a ragged zarr store with one row per time step.

Two kinds:

* ``clip_frames`` (the teacher): one open_clip image embedding per step (``cfg["clip"]``),
  raw ``encode_image`` output, frames in RGB or, with ``clip.channel_order: bgr``, with the
  channels swapped like the reference features.
* ``student_video``: the extractors of ``cfg["student_video"]`` (``clip`` | ``i3d`` |
  ``resnet``) concatenated along the feature axis in config order (TVR: i3d ⊕ resnet152 =
  1024 + 2048 = 3072).

Both use the same timeline (:func:`prvr.video.timeline.step_times` with ``cfg["frames"]``), so
the teacher has exactly one row per student row, at the same centre times, which the store
records per row (``timestamps``).

Jobs and resumption. ``shard=(k, n)`` handles the k-th of n **contiguous blocks** of the
manifest's ok videos (block k = ok videos ``[k*N//n, (k+1)*N//n)``), so gathering shards in
order gives manifest order. Each finished video is saved atomically under ``work_dir``
(default ``<out_store>.work``) together with its step times; a killed job started again skips
those videos. Videos that fail during extraction are recorded there too (not retried), in the
store's ``failed`` attribute and in ``<out_store>.failed.tsv``. The store itself is written
(atomically) only at the end, and then the work folder is removed.

Determinism. Every model call sees a full batch (the last one is zero-padded), so a row's
value depends only on its own input, not on which other videos shared its batch: a resumed or
sharded run gives the same values as an uninterrupted one.

Throughput. Decoding and preprocessing run in ``extract.workers`` processes ahead of the model
(:class:`prvr.video.decode.WorkerPool`), batches span videos, the device is CUDA (fp16 autocast)
when available and ``device`` is ``auto``.

``cfg["extract"]`` keys used here: ``workers`` (decode processes; 0 = in this process, no
timeout), ``timeout_s`` (limit of every decode request: opening a video plus its first chunk,
then each further chunk of steps; a hung decoder is killed and the video recorded as failed),
``dtype`` (store dtype), and optionally ``max_pixels`` (frames above are decoded scaled down,
default 3840 x 2160) and ``worker_nice`` (niceness of the decode workers, default 0).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from prvr.atomic import write_bytes
from prvr.store import FeatureStore, StoreError, StoreWriter, library_versions
from prvr.video.decode import CHUNK_BYTES, DEFAULT_MAX_PIXELS, DecodeTask, Task, WorkerPool, decode_steps
from prvr.video.probe import read_manifest
from prvr.video.timeline import step_times

log = logging.getLogger(__name__)

KINDS = ("clip_frames", "student_video")
DEFAULT_WORKER_NICE = 0  # extract.worker_nice: niceness of the decode workers
WORK_VERSION = 1
TIMELINE = "rows at step centres (k+0.5)/fps s while < duration; > max_steps: max_steps centres spread uniformly"
# attributes that must agree between shards of one store
SHARD_KEYS = ("kind", "dim", "dims", "extractors", "fps", "max_steps", "channel_order", "timeline", "versions")


class ExtractError(RuntimeError):
    """Extraction cannot run (bad config, bad manifest, shards that do not match)."""


# ------------------------------------------------------------------------------- helpers


def ok_videos(manifest: str | os.PathLike) -> list[dict]:
    """The manifest's ok rows, in order."""
    return [r for r in read_manifest(manifest) if r["status"] == "ok"]


def n_shards(manifest: str | os.PathLike, shard_size: int) -> int:
    """Number of extraction shards for ``shard_size`` videos per shard (at least 1)."""
    if shard_size < 1:
        raise ValueError(f"extract.shard_size must be >= 1, got {shard_size}")
    n = len(ok_videos(manifest))
    return max(1, -(-n // shard_size))


def shard_block(n_videos: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """``[start, stop)`` of shard ``(k, n)`` among ``n_videos`` (contiguous, sizes differ by <= 1)."""
    if shard is None:
        return 0, n_videos
    k, n = int(shard[0]), int(shard[1])
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"shard must be (k, n) with 0 <= k < n, got {shard}")
    return k * n_videos // n, (k + 1) * n_videos // n


def _safe_name(video_id: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", video_id)[:80]
    return f"{stem}-{hashlib.sha1(video_id.encode()).hexdigest()[:10]}"


def _save_npz(path: Path, **arrays) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def write_failed_tsv(path: str | os.PathLike, failed: list[dict]) -> None:
    """``video_id<TAB>reason`` lines (with a header), atomically."""
    lines = ["video_id\treason"] + [
        f"{f['video_id']}\t{str(f['reason']).replace(chr(9), ' ').replace(chr(10), ' ')}" for f in failed
    ]
    write_bytes(Path(path), ("\n".join(lines) + "\n").encode())


def failed_tsv_path(out_store: str | os.PathLike) -> Path:
    return Path(f"{out_store}.failed.tsv")


# ------------------------------------------------------------------------------- encoders


def build_encoders(kind: str, cfg: dict, device: str = "cpu", allow_random: bool = False) -> list:
    """The frame encoders of an extraction kind, from the merged dataset config.

    ``allow_random`` admits models without weights (tests and benchmarks only); otherwise
    random weights are accepted only from folders holding the demo marker file.
    """
    from prvr.encoders.image import ClipFrameEncoder

    if kind == "clip_frames":
        if "clip" not in cfg:
            raise ExtractError("config: no `clip` block for the clip_frames extraction")
        return [ClipFrameEncoder(cfg["clip"], device, allow_random, name="clip")]
    if kind != "student_video":
        raise ExtractError(f"unknown extraction kind {kind!r} (one of {', '.join(KINDS)})")
    entries = cfg.get("student_video")
    if not entries:
        raise ExtractError("config: `student_video` must list at least one extractor {kind: clip|i3d|resnet, ...}")
    encoders = []
    for i, e in enumerate(entries):
        k = e.get("kind")
        name = f"{i}_{k}"
        if k == "clip":
            encoders.append(ClipFrameEncoder(e, device, allow_random, name=name))
        elif k == "i3d":
            from prvr.encoders.i3d import I3DEncoder

            encoders.append(I3DEncoder({**e, "name": name}, device, allow_random))
        elif k == "resnet":
            from prvr.encoders.resnet import ResNetEncoder

            encoders.append(ResNetEncoder({**e, "name": name}, device, allow_random))
        else:
            raise ExtractError(f"config: student_video[{i}].kind must be clip, i3d or resnet, got {k!r}")
    return encoders


# ------------------------------------------------------------------------------- extraction


class _Video:
    __slots__ = ("vid", "row", "times", "rows", "filled", "decoded", "info", "failed")

    def __init__(self, vid, row, times, encoders):
        self.vid, self.row, self.times = vid, row, times
        self.rows = [None] * len(encoders)  # (n_steps, dim) float32 each, allocated on first use
        self.filled = [0] * len(encoders)
        self.decoded = False
        self.info: dict = {}
        self.failed = False

    def complete(self) -> bool:
        return self.decoded and all(f == len(self.times) for f in self.filled)


def extract(
    kind: str,
    manifest: str | os.PathLike,
    cfg: dict,
    out_store: str | os.PathLike,
    shard: tuple[int, int] | None = None,
    work_dir: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = True,
    allow_random: bool = False,
    on_video=None,
    log_path: str | os.PathLike | None = None,
    keep_work: bool = False,
) -> dict:
    """Extract features of the manifest's ok videos (or one shard of them) into a store.

    Args:
        kind: ``clip_frames`` or ``student_video``.
        manifest: the probe's TSV.
        cfg: merged dataset config (``clip``, ``frames``, ``student_video``, ``extract``, ``device``).
        out_store: the ``.zarr`` store to write (atomically, at the end).
        shard: ``(k, n)``: the k-th of n contiguous blocks of ok videos; None = all.
        work_dir: per-video results for resuming (default ``<out_store>.work``).
        device: ``auto`` (``cfg["device"]``, then CUDA when available), ``cpu``, ``cuda[:N]``.
        progress: show a progress bar (videos/s, frames/s).
        allow_random: accept models without weights (tests/benchmarks).
        on_video: optional callback ``(video_id, n_finished)`` after each video is saved.
        log_path: append the decode workers' stderr (FFmpeg messages) to this file.
        keep_work: keep the work folder after writing the store.

    Returns:
        ``{"videos", "steps", "frames", "decoded_frames", "seconds", "setup_seconds",
        "resumed", "failed": [{"video_id", "reason"}], "store"}`` — frames = model input frames
        (steps x frames per step, summed over extractors); videos/steps/frames count the videos
        computed in this call (not the resumed ones).
    """
    import torch
    from tqdm import tqdm

    from prvr.config import resolve_device

    t_start = time.perf_counter()
    if kind not in KINDS:
        raise ExtractError(f"unknown extraction kind {kind!r} (one of {', '.join(KINDS)})")
    frames_cfg = cfg.get("frames") or {}
    fps, max_steps = float(frames_cfg.get("fps", 1.0)), int(frames_cfg.get("max_steps", 512))
    ex = cfg.get("extract") or {}
    workers, timeout_s = int(ex.get("workers", 2)), float(ex.get("timeout_s", 120))
    dtype = ex.get("dtype", "float16")
    max_pixels = ex.get("max_pixels", DEFAULT_MAX_PIXELS)
    dev = resolve_device(cfg.get("device", "auto") if device == "auto" else device)

    rows = ok_videos(manifest)
    start, stop = shard_block(len(rows), shard)
    rows = rows[start:stop]
    encoders = build_encoders(kind, cfg, dev, allow_random)
    dims = [e.dim for e in encoders]
    identities = [e.identity for e in encoders]
    channel_order = (cfg.get("clip") or {}).get("channel_order", "rgb") if kind == "clip_frames" else [
        e.spec.channel_order for e in encoders if e.kind == "clip"
    ] or None
    # per-video results are reused only under the same configuration and device (values match)
    fingerprint = {"work_version": WORK_VERSION, "kind": kind, "extractors": identities, "fps": fps,
                   "max_steps": max_steps, "max_pixels": max_pixels, "device": dev,
                   "threads": torch.get_num_threads() if dev == "cpu" else None}

    work = Path(work_dir) if work_dir else Path(f"{out_store}.work")
    done_dir, failed_dir = work / "done", work / "failed"
    _prepare_work_dir(work, fingerprint)

    # what is left to do
    videos: list[_Video] = []
    todo: list[_Video] = []
    failed: list[dict] = []
    resumed = 0
    for r in rows:
        vid = r["video_id"]
        v = _Video(vid, r, step_times(r["duration"], fps, max_steps), encoders)
        videos.append(v)
        name = _safe_name(vid)
        if (failed_dir / f"{name}.json").exists():
            failed.append(json.loads((failed_dir / f"{name}.json").read_text()))
            v.failed = True
            resumed += 1
            continue
        done = done_dir / f"{name}.npz"
        if done.exists():
            try:
                with np.load(done) as z:
                    ok = np.array_equal(z["times"], v.times) and z["rows"].shape == (len(v.times), sum(dims))
            except Exception:  # noqa: BLE001 - an unreadable leftover is recomputed
                ok = False
            if ok:
                resumed += 1
                continue
            done.unlink()
        todo.append(v)
    if resumed:
        log.info("%s: resuming, %d of %d videos already done in %s", out_store, resumed, len(rows), work)

    specs = [e.spec for e in encoders]
    per_step_frames = sum(s.snippet for s in specs)
    tasks = []
    for i, v in enumerate(todo):
        r = v.row
        w, h = r.get("width") or 320, r.get("height") or 240
        bps = max(1, sum(s.step_bytes(w, h) for s in specs))
        chunk = int(max(1, min(256, CHUNK_BYTES // bps)))
        args = dict(path=r["path"], times=v.times, specs=specs, fps=r.get("fps") or 0.0, width=r.get("width") or 0,
                    height=r.get("height") or 0, chunk_steps=chunk, max_pixels=max_pixels)
        first = ("pyav",) if r.get("backend") == "pyav" else ("decord", "pyav")
        tasks.append(Task(i, decode_steps, (DecodeTask(backends=first, **args),),
                          fallback_args=(DecodeTask(backends=("pyav",), **args),)))
    nice = int(ex.get("worker_nice", DEFAULT_WORKER_NICE))
    pool = WorkerPool(workers, timeout_s, log_path=log_path, nice=nice).start() if tasks else WorkerPool(0)
    setup_s = time.perf_counter() - t_start

    queues = [collections.deque() for _ in encoders]  # (video index, step, input)
    stats = {"videos": 0, "steps": 0, "frames": 0, "decoded_frames": 0}
    bar = tqdm(total=len(todo), desc=f"{kind}{'' if shard is None else f' {shard[0]}/{shard[1]}'}", unit="video",
               disable=not progress, dynamic_ncols=True)
    t_run = time.perf_counter()
    n_finished = resumed

    def finish(v: _Video) -> None:
        nonlocal n_finished
        feats = np.concatenate(v.rows, axis=1) if len(v.rows) > 1 else v.rows[0]
        _save_npz(done_dir / f"{_safe_name(v.vid)}.npz", rows=feats, times=v.times,
                  backend=np.array(v.info.get("backend", "")), notes=np.array("; ".join(v.info.get("notes", []))))
        v.rows = None  # free
        stats["videos"] += 1
        stats["steps"] += len(v.times)
        stats["frames"] += len(v.times) * per_step_frames
        stats["decoded_frames"] += int(v.info.get("frames", 0))
        n_finished += 1
        bar.update(1)
        el = max(1e-9, time.perf_counter() - t_run)
        bar.set_postfix_str(f"{stats['videos'] / el:.2f} videos/s, {stats['frames'] / el:.1f} frames/s, "
                            f"{len(failed)} failed")
        if on_video is not None:
            on_video(v.vid, n_finished)

    def fail(v: _Video, reason: str) -> None:
        v.failed = True
        v.rows = None
        rec = {"video_id": v.vid, "reason": str(reason)}
        failed.append(rec)
        write_bytes(failed_dir / f"{_safe_name(v.vid)}.json", json.dumps(rec).encode())
        log.warning("extraction of %s failed: %s", v.vid, reason)
        bar.update(1)

    def run_batches(final: bool) -> None:
        for e, (enc, q) in enumerate(zip(encoders, queues)):
            while q and (len(q) >= enc.batch_size or final):
                items = []
                while q and len(items) < enc.batch_size:
                    it = q.popleft()
                    if not todo[it[0]].failed:
                        items.append(it)
                if not items:
                    continue
                x = np.stack([it[2] for it in items])
                if len(items) < enc.batch_size:  # full batches only: values independent of batching
                    x = np.concatenate([x, np.zeros((enc.batch_size - len(items), *x.shape[1:]), x.dtype)])
                y = enc.encode(x)
                touched = set()
                for (vi, step, _), row in zip(items, y):
                    v = todo[vi]
                    if v.rows[e] is None:
                        v.rows[e] = np.zeros((len(v.times), enc.dim), np.float32)
                    v.rows[e][step] = row
                    v.filled[e] += 1
                    touched.add(vi)
                for vi in sorted(touched):
                    if todo[vi].complete():
                        finish(todo[vi])

    try:
        with torch.inference_mode():
            for ev, key, payload in pool.imap(tasks):
                v = todo[key]
                if ev == "item":
                    if v.failed:
                        continue
                    for e, spec in enumerate(specs):
                        arr = payload["arrays"][spec.name]
                        for j in range(len(arr)):
                            queues[e].append((key, payload["start"] + j, arr[j]))
                    run_batches(final=False)
                elif ev == "done":
                    v.decoded, v.info = True, payload or {}
                    if v.complete():
                        finish(v)
                else:
                    fail(v, payload)
            run_batches(final=True)
    finally:
        bar.close()
    incomplete = [v.vid for v in todo if not v.failed and v.rows is not None]
    if incomplete:
        raise ExtractError(f"internal error: videos left incomplete: {incomplete[:5]}")

    # assemble the store from the work folder, in shard order
    attrs = {
        "kind": kind,
        "extractors": identities,
        "dims": dims,
        "fps": fps,
        "max_steps": max_steps,
        "timeline": TIMELINE,
        "channel_order": channel_order,
        "versions": library_versions(),
        "dtype": dtype,
        "device": dev,
        "shard": list(shard) if shard is not None else None,
        "manifest": str(manifest),
    }
    failed_ids = {f["video_id"] for f in failed}
    backends, notes = {}, {}
    with StoreWriter(out_store, sum(dims), dtype=dtype, attrs=attrs, timestamps=True) as w:
        for v in videos:
            if v.vid in failed_ids:
                continue
            with np.load(done_dir / f"{_safe_name(v.vid)}.npz") as z:
                w.append(v.vid, z["rows"], z["times"])
                b, n = str(z["backend"]), str(z["notes"])
            if b and b != "decord":
                backends[v.vid] = b
            if n:
                notes[v.vid] = n
        w.attrs.update(failed=failed, decode_backends=backends, decode_notes=notes)
    write_failed_tsv(failed_tsv_path(out_store), failed)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_start
    return {**stats, "seconds": total, "setup_seconds": setup_s, "resumed": resumed, "failed": failed,
            "store": str(out_store)}


def _prepare_work_dir(work: Path, fingerprint: dict) -> None:
    """Create the work folder; drop results of a different configuration (never mix them)."""
    meta = work / "meta.json"
    text = json.dumps(fingerprint, sort_keys=True)
    if meta.exists() and meta.read_text() != text:
        log.warning("%s holds results of another configuration: discarding them", work)
        shutil.rmtree(work)
    (work / "done").mkdir(parents=True, exist_ok=True)
    (work / "failed").mkdir(parents=True, exist_ok=True)
    if not meta.exists():
        write_bytes(meta, text.encode())


# ------------------------------------------------------------------------------- gather


def gather(shard_stores: list[str | os.PathLike], out_store: str | os.PathLike, manifest: str | os.PathLike | None = None) -> None:
    """Concatenate shard stores into one store (in manifest order when a manifest is given).

    Checks that every shard was made with the same extractors, dims, timeline, channel order and
    library versions, and that no video appears twice. Failures of all shards are merged into
    the store's ``failed`` attribute and ``<out_store>.failed.tsv``. Values are copied as
    stored (same dtype), so the result equals a single-job run value for value.

    Raises:
        ExtractError: shards that disagree, duplicate videos, or missing videos.
    """
    if not shard_stores:
        raise ExtractError("gather: no shard stores given")
    stores = [FeatureStore.open(p) for p in shard_stores]
    ref = stores[0].attrs
    for s in stores[1:]:
        for k in SHARD_KEYS:
            if s.attrs.get(k) != ref.get(k):
                raise ExtractError(f"gather: {s.path} differs from {stores[0].path} in `{k}`: "
                                   f"{s.attrs.get(k)!r} vs {ref.get(k)!r} (re-extract the odd shard)")
        if s.rows().dtype != stores[0].rows().dtype:
            raise ExtractError(f"gather: {s.path} has dtype {s.rows().dtype}, {stores[0].path} {stores[0].rows().dtype}")
    where: dict[str, FeatureStore] = {}
    for s in stores:
        for vid in s.ids:
            if vid in where:
                raise ExtractError(f"gather: video {vid!r} is in both {where[vid].path} and {s.path}")
            where[vid] = s
    failed = [f for s in stores for f in s.attrs.get("failed", [])]
    if manifest is not None:
        failed_ids = {f["video_id"] for f in failed}
        order = [r["video_id"] for r in ok_videos(manifest)]
        missing = [v for v in order if v not in where and v not in failed_ids]
        if missing:
            raise ExtractError(f"gather: {len(missing)} ok videos of {manifest} are in no shard (e.g. {missing[:3]})")
        extra = set(where) - set(order)
        if extra:
            raise ExtractError(f"gather: shards hold videos that {manifest} does not list as ok: {sorted(extra)[:3]}")
    else:
        order = [vid for s in stores for vid in s.ids]
    attrs = {k: v for k, v in ref.items()
             if k not in ("prvr_store", "ids", "dim", "n_items", "n_rows", "complete", "store_uid")}
    attrs.update(
        shard=None,
        shards=len(stores),
        device=_one_or_list(sorted({str(s.attrs.get("device")) for s in stores})),
        failed=failed,
        decode_backends={k: v for s in stores for k, v in s.attrs.get("decode_backends", {}).items()},
        decode_notes={k: v for s in stores for k, v in s.attrs.get("decode_notes", {}).items()},
    )
    if manifest is not None:
        attrs["manifest"] = str(manifest)
    dtype = str(stores[0].rows().dtype)
    try:
        with StoreWriter(out_store, int(ref["dim"]), dtype=dtype, attrs=attrs, timestamps=True) as w:
            for vid in order:
                if vid not in where:
                    continue
                s = where[vid]
                w.append(vid, s.get(vid), s.timestamps(vid))
    except StoreError as exc:
        raise ExtractError(f"gather: {exc}") from exc
    write_failed_tsv(failed_tsv_path(out_store), failed)


def _one_or_list(values: list):
    return values[0] if len(values) == 1 else values
