"""Listing and probing videos: the manifest every extraction job starts from.

The manifest is a TSV with one row per video, in the order of :func:`list_videos`::

    video_id  path  status  reason  backend  duration  fps  n_frames  width  height

``status`` is ``ok`` or ``error``; ``reason`` says why a video is quarantined (or, for an ok
video, what was unusual: e.g. that decord failed and PyAV read it). ``duration`` is in seconds
from the first frame's start to the last frame's end, ``width``/``height`` are native.
Every video is opened in a killable worker process with a timeout (decord first, PyAV as
fallback; after a hang or crash the video is retried once with PyAV alone).
"""

from __future__ import annotations

import csv
import os
import uuid
from pathlib import Path

import numpy as np

from prvr.video.decode import DecodeError, Task, WorkerPool, open_source

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mkv .webm .avi .mov .mpg .mpeg .flv .wmv .ts .mts .m2ts .3gp .ogv .gif".split()
)
MANIFEST_COLUMNS = ("video_id", "path", "status", "reason", "backend", "duration", "fps", "n_frames", "width", "height")
_TYPES = {"duration": float, "fps": float, "n_frames": int, "width": int, "height": int}


class ProbeError(RuntimeError):
    """Raised by a strict probe when some videos are unreadable (after the manifest is written)."""


def list_videos(videos: str | os.PathLike) -> list[tuple[str, str]]:
    """The ``(video_id, path)`` pairs of a folder or of a TSV list.

    Args:
        videos: a folder (every file with a video extension, id = file name without extension,
            sorted by id; sub-folders are not searched) or a TSV file with a header
            ``video_id<TAB>path`` (relative paths are resolved against the TSV's folder).

    Raises:
        FileNotFoundError: ``videos`` does not exist.
        ValueError: duplicate ids, a bad header or row (named with its line number), no videos.
    """
    src = Path(videos)
    if not src.exists():
        raise FileNotFoundError(f"videos: {src} does not exist")
    out: list[tuple[str, str]] = []
    if src.is_dir():
        for p in sorted(src.iterdir()):
            if p.suffix.lower() in VIDEO_EXTENSIONS and not p.is_dir() and not p.name.startswith("."):
                out.append((p.stem, str(p)))
        out.sort(key=lambda r: r[0])
        where = {}
        for vid, path in out:
            if vid in where:
                raise ValueError(f"videos: {src}: two files give the video id {vid!r}: {where[vid]} and {path}")
            where[vid] = path
    else:
        with open(src, encoding="utf-8", newline="") as f:
            lines = f.read().splitlines()
        if not lines or [c.strip() for c in lines[0].split("\t")][:2] != ["video_id", "path"]:
            raise ValueError(f"{src}:1: expected a header 'video_id<TAB>path'")
        seen: dict[str, int] = {}
        for n, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) < 2 or not cols[0].strip() or not cols[1].strip():
                raise ValueError(f"{src}:{n}: expected 'video_id<TAB>path', got {line!r}")
            vid, path = cols[0].strip(), cols[1].strip()
            if vid in seen:
                raise ValueError(f"{src}:{n}: duplicate video id {vid!r} (first on line {seen[vid]})")
            seen[vid] = n
            p = Path(path)
            out.append((vid, str(p if p.is_absolute() else src.parent / p)))
    if not out:
        raise ValueError(f"videos: no videos in {src} (extensions: {' '.join(sorted(VIDEO_EXTENSIONS))})")
    for vid, path in out:
        if any(c in vid + path for c in "\t\n\r"):
            raise ValueError(f"videos: id or path with a tab or newline: {vid!r} {path!r}")
    return out


def probe_one(path: str, backends: tuple[str, ...] = ("decord", "pyav")) -> dict:
    """Open one video and decode a frame or two (runs inside a worker).

    decord must decode the first and the last frame; PyAV (forward decoding) the first.

    Returns:
        dict with backend, duration, fps, n_frames, width, height, reason (notes).

    Raises:
        DecodeError: no backend can read it (the message lists each backend's error).
    """
    p = Path(path)
    if not p.exists():
        raise DecodeError("file not found")
    if p.is_file() and p.stat().st_size == 0:
        raise DecodeError("empty file (0 bytes)")
    errors = []
    for backend in backends:
        try:
            src = open_source(path, backend)
            idx = np.unique([0, src.n_frames - 1]) if backend == "decord" else np.array([0])
            frames = src.get(idx)
            height, width = frames[0].shape[:2]
            if backend == "pyav" and src.width and src.height:
                width, height = src.width, src.height
            src.close()
        except DecodeError as exc:
            errors.append(f"{backend}: {exc}")
            continue
        return {
            "backend": backend,
            "duration": round(float(src.duration), 6),
            "fps": round(float(src.fps), 6),
            "n_frames": int(src.n_frames),
            "width": int(width),
            "height": int(height),
            "reason": "; ".join(errors),
        }
    raise DecodeError("; ".join(errors))


def probe_videos(
    videos: list[tuple[str, str]],
    out_tsv: str | os.PathLike,
    timeout_s: float = 120,
    workers: int = 2,
    strict: bool = False,
    progress: bool = True,
    log_path: str | os.PathLike | None = None,
) -> list[dict]:
    """Probe every video in killable workers and write the manifest atomically.

    Args:
        videos: ``(video_id, path)`` pairs (see :func:`list_videos`).
        out_tsv: manifest path.
        timeout_s: a video whose probe takes longer is killed and quarantined (after one
            retry with PyAV alone).
        workers: worker processes (0 = in this process, no timeout).
        strict: raise :class:`ProbeError` listing the bad videos (after writing the manifest).
        progress: show a progress bar.
        log_path: append the decoders' stderr to this file (default: this process's stderr).

    Returns:
        The manifest rows (dicts with the :data:`MANIFEST_COLUMNS` keys), typed.
    """
    from tqdm import tqdm

    rows: list[dict] = [
        {"video_id": vid, "path": path, "status": "error", "reason": "not probed", "backend": ""} for vid, path in videos
    ]
    tasks = [Task(i, probe_one, (path,), fallback_args=(path, ("pyav",))) for i, (_, path) in enumerate(videos)]
    pool = WorkerPool(workers, timeout_s, log_path=log_path)
    bar = tqdm(total=len(tasks), desc="probe", unit="video", disable=not progress, dynamic_ncols=True)
    n_bad = 0
    for kind, key, payload in pool.imap(tasks):
        row = rows[key]
        if kind == "done":
            row.update(payload, status="ok")
        elif kind == "failed":
            row.update(status="error", reason=str(payload), backend="")
            n_bad += 1
        bar.update(1)
        bar.set_postfix(errors=n_bad)
    bar.close()
    write_manifest(rows, out_tsv)
    if strict and n_bad:
        bad = [f"  {r['video_id']} ({r['path']}): {r['reason']}" for r in rows if r["status"] != "ok"]
        raise ProbeError(f"{n_bad} of {len(rows)} videos are unreadable (manifest: {out_tsv}):\n" + "\n".join(bad))
    return [_typed(r) for r in rows]


def _clean(v) -> str:
    if v is None:
        return ""
    return str(v).replace("\t", " ").replace("\r", " ").replace("\n", " ")


def write_manifest(rows: list[dict], path: str | os.PathLike) -> None:
    """Write manifest rows as TSV atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write("\t".join(MANIFEST_COLUMNS) + "\n")
        for r in rows:
            f.write("\t".join(_clean(r.get(c)) for c in MANIFEST_COLUMNS) + "\n")
    os.replace(tmp, path)


def _typed(row: dict) -> dict:
    out = {c: row.get(c, "") for c in MANIFEST_COLUMNS}
    for c, t in _TYPES.items():
        v = out[c]
        out[c] = None if v in ("", None) else t(v)
    out["reason"] = out["reason"] or ""
    out["backend"] = out["backend"] or ""
    return out


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Rows of a manifest (ok and error), typed: numbers are int/float, missing ones None.

    Raises:
        FileNotFoundError, ValueError: missing file, wrong header, or a bad row (named by line).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} does not exist (run the probe first)")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or tuple(header) != MANIFEST_COLUMNS:
            raise ValueError(f"{path}:1: not a prvr manifest (expected columns {', '.join(MANIFEST_COLUMNS)})")
        rows = []
        for n, cols in enumerate(reader, start=2):
            if not cols:
                continue
            if len(cols) != len(MANIFEST_COLUMNS):
                raise ValueError(f"{path}:{n}: expected {len(MANIFEST_COLUMNS)} columns, got {len(cols)}")
            row = dict(zip(MANIFEST_COLUMNS, cols))
            if row["status"] not in ("ok", "error"):
                raise ValueError(f"{path}:{n}: status must be ok or error, got {row['status']!r}")
            try:
                row = _typed(row)
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: {exc}") from None
            if row["status"] == "ok" and (row["duration"] is None or row["n_frames"] is None):
                raise ValueError(f"{path}:{n}: ok row without duration/n_frames")
            rows.append(row)
    return rows
