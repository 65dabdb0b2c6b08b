"""Decoding frames at given times: decord first, PyAV as fallback, in killable worker processes.

Three layers:

* **Sources** (:func:`open_source`): one opened video with frame start times and
  ``get(indices)``. :class:`DecordSource` seeks (fast for sparse frames);
  :class:`PyAVSource` decodes forward and skips packets it cannot decode (it reads files
  decord refuses: truncated files with the index at the front, damage mid-file).
* **Decode tasks** (:func:`decode_steps`, run inside a worker): for a video's step centres and a
  list of :class:`FrameSpec` (what each extractor wants per step: the centre frame, or a snippet
  of frames around it, preprocessed), yield chunks of ready model inputs. Frames are decoded
  once for all extractors; a decord failure part-way switches the video to PyAV.
* **Worker pool** (:class:`WorkerPool`): persistent worker processes (fresh interpreters started
  with ``python -c``, so nothing of the parent — threads, CUDA, ``__main__`` — is inherited),
  one request at a time per worker, each request with a timeout. A worker that hangs past the
  timeout is killed; one that crashes (segfault, out of memory) is noticed; either way the task
  fails with a reason (or is retried once with its fallback arguments when it had produced
  nothing yet) and a fresh worker takes its place. Decoding runs ahead of the consumer by a
  bounded number of chunks, so it overlaps model compute.

Frames are decoded at native resolution (RGB, uint8) and preprocessed with PIL, exactly as
the model's own PIL eval transform would (see :class:`PilRecipe`); only frames above
``max_pixels`` are scaled down at decode time (aspect ratio kept) to bound memory.
"""

from __future__ import annotations

import collections
import inspect
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np

from prvr.video.timeline import frames_at, snippet_times

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 3840 * 2160  # frames larger than 4K UHD are scaled down at decode
CHUNK_BYTES = 32 << 20  # target size of one chunk of model inputs sent by a worker
STARTUP_TIMEOUT_S = 120.0  # a worker must import its modules within this time


class DecodeError(RuntimeError):
    """A video cannot be opened or decoded; the message says why (becomes a manifest reason)."""


def short_error(exc: BaseException, limit: int = 240, path: str | None = None) -> str:
    """One line describing an exception: decord's C++ traces reduced to their last message,
    FFmpeg errors to their text (and FFmpeg's last log line), the file's path left out."""
    av = sys.modules.get("av")
    if av is not None and isinstance(exc, av.error.FFmpegError) and exc.strerror:
        text = str(exc.strerror)
        logline = getattr(exc, "log", None)
        if logline and len(logline) >= 3 and logline[2]:
            text += f" ({str(logline[2]).strip()})"
    else:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        keep = []
        for ln in lines:
            if ln.startswith(("[bt]", "Stack trace")):
                break
            # decord: "[21:40:51] /src/video/x.cc:218: Check failed: ..." (possibly nested)
            ln = re.sub(r"\[\d\d:\d\d:\d\d\] \S+\.cc:\d+: ", "", ln)
            keep.append(ln)
        text = " ".join(keep) or type(exc).__name__
        if not isinstance(exc, DecodeError):
            text = f"{type(exc).__name__}: {text}"
    if path:
        text = text.replace(f"'{path}'", "the file").replace(str(path), "the file")
    text = text.replace("\t", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decode_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int] | None:
    """Size (w, h) to decode a ``width x height`` video at, or None for native.

    Native unless ``width * height > max_pixels``; then the largest even size with the same
    aspect ratio and at most ``max_pixels`` pixels.
    """
    if not max_pixels or width <= 0 or height <= 0 or width * height <= max_pixels:
        return None
    scale = (max_pixels / (width * height)) ** 0.5
    w = max(2, int(width * scale) // 2 * 2)
    h = max(2, int(height * scale) // 2 * 2)
    return w, h


# --------------------------------------------------------------------------------------------
# Sources


class VideoSource:
    """An opened video. ``starts``: (n_frames,) float64 seconds from the first frame."""

    backend = "?"
    path: str
    starts: np.ndarray
    duration: float
    fps: float
    width: int  # native size
    height: int

    @property
    def n_frames(self) -> int:
        return len(self.starts)

    def get(self, indices: np.ndarray) -> list[np.ndarray]:
        """Frames at sorted unique ``indices``: a list of (H, W, 3) uint8 RGB arrays."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class DecordSource(VideoSource):
    """decord ``VideoReader`` (single-threaded); raises :class:`DecodeError` when it cannot open."""

    backend = "decord"

    def __init__(self, path: str, size: tuple[int, int] | None = None):
        import decord

        self.path = str(path)
        kw = {"width": size[0], "height": size[1]} if size else {}
        try:
            self.vr = decord.VideoReader(self.path, ctx=decord.cpu(0), num_threads=1, **kw)
            n = len(self.vr)
            if n == 0:
                raise DecodeError("the video stream has no frames")
            ts = np.asarray(self.vr.get_frame_timestamp(np.arange(n)), dtype=np.float64).reshape(n, 2)
            self.fps = float(self.vr.get_avg_fps() or 0.0)
        except DecodeError:
            raise
        except Exception as exc:  # RuntimeError, decord.DECORDError (not a RuntimeError)
            raise DecodeError(short_error(exc, path=self.path)) from None
        t0 = ts[0, 0]
        self.starts = np.maximum.accumulate(ts[:, 0] - t0)
        self.duration = float(max(ts[-1, 1] - t0, self.starts[-1]))
        if self.duration <= 0 and self.fps > 0:
            self.duration = n / self.fps
        if not self.fps and self.duration > 0:
            self.fps = n / self.duration
        self.height, self.width = 0, 0

    def get(self, indices: np.ndarray) -> list[np.ndarray]:
        try:
            arr = self.vr.get_batch(np.asarray(indices, dtype=np.int64)).asnumpy()
        except Exception as exc:
            raise DecodeError(short_error(exc, path=self.path)) from None
        return list(arr)


class PyAVSource(VideoSource):
    """PyAV (FFmpeg) forward decoder; packets that fail to decode are skipped.

    Opening demuxes the whole stream once (no decoding) to learn every frame's time.
    :meth:`get` decodes forward; asking for an earlier frame than the last one reopens the file.
    A frame whose packet could not be decoded is replaced by the last good frame before it
    (or the first good frame after it, at the start).
    """

    backend = "pyav"

    def __init__(self, path: str, size: tuple[int, int] | None = None):
        import av

        self.path = str(path)
        self.size = size
        self.skipped = 0
        try:
            with av.open(self.path) as c:
                if not c.streams.video:
                    kinds = sorted({s.type for s in c.streams}) or ["none"]
                    raise DecodeError(f"no video stream (streams: {', '.join(kinds)})")
                st = c.streams.video[0]
                tb = float(st.time_base) if st.time_base else 0.0
                self.width, self.height = int(st.codec_context.width or 0), int(st.codec_context.height or 0)
                pts, ends = [], []
                for p in c.demux(st):
                    if p.size == 0:
                        continue
                    t = p.pts if p.pts is not None else p.dts
                    if t is None:
                        continue
                    pts.append(t)
                    ends.append(t + (p.duration or 0))
                rate = float(st.average_rate or st.guessed_rate or 0.0)
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(short_error(exc, path=self.path)) from None
        if not pts:
            raise DecodeError("the video stream has no frames")
        self.tb = tb
        self.pts = np.unique(np.asarray(pts, dtype=np.int64))
        self.t0 = int(self.pts[0])
        self.starts = (self.pts - self.t0) * tb
        end = (max(ends) - self.t0) * tb
        self.fps = rate or (len(self.pts) / end if end > 0 else 0.0)
        self.duration = float(max(end, self.starts[-1] + (1.0 / self.fps if self.fps else 0.0)))
        self._it = None
        self._pos = -1  # index of the last decoded frame
        self._last = None  # (index, array) of the last good frame
        self._container = None

    def _frames(self):
        """Yield (index, frame) for every decodable frame, in order."""
        import av

        self._container = av.open(self.path)
        st = self._container.streams.video[0]
        st.thread_type = "NONE"
        for packet in self._container.demux(st):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                self.skipped += 1
                continue
            for fr in frames:
                t = fr.pts if fr.pts is not None else None
                if t is None:
                    continue
                i = int(np.searchsorted(self.pts, t))
                if i >= len(self.pts) or self.pts[i] != t:
                    i = max(0, int(np.searchsorted(self.pts, t, side="right")) - 1)
                kw = {"width": self.size[0], "height": self.size[1]} if self.size else {}
                yield i, fr.to_ndarray(format="rgb24", **kw)

    def get(self, indices: np.ndarray) -> list[np.ndarray]:
        out = []
        indices = [int(i) for i in indices]
        if indices and self._last is not None and indices[0] < self._last[0]:
            self.close()
        if self._it is None:
            self._it, self._last, self._pending = self._frames(), None, None
        for want in indices:
            while True:
                if self._pending is None:
                    try:
                        self._pending = next(self._it)
                    except StopIteration:
                        break
                    except Exception as exc:
                        raise DecodeError(short_error(exc, path=self.path)) from None
                if self._pending[0] <= want or self._last is None:
                    self._last, self._pending = self._pending, None
                    if self._last[0] >= want:
                        break
                else:
                    break
            if self._last is None:
                raise DecodeError("no frame of the video could be decoded")
            out.append(self._last[1])
        return out

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container, self._it, self._last = None, None, None


def open_source(path: str, backend: str = "decord", size: tuple[int, int] | None = None) -> VideoSource:
    """Open ``path`` with ``backend`` (``decord`` or ``pyav``), decoding at ``size`` (w, h) or native."""
    p = Path(path)
    if not p.exists():
        raise DecodeError("file not found")
    if p.is_dir():
        raise DecodeError("is a directory")
    if p.is_file() and p.stat().st_size == 0:
        raise DecodeError("empty file (0 bytes)")
    if backend == "decord":
        return DecordSource(str(p), size)
    if backend == "pyav":
        return PyAVSource(str(p), size)
    raise ValueError(f"unknown video backend {backend!r}")


# --------------------------------------------------------------------------------------------
# Preprocessing (PIL + numpy only, so workers stay light)

_PIL_MODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class PilRecipe:
    """A PIL eval transform: resize (shorter side, or exact), centre crop, to float, normalise.

    Mirrors torchvision's ``Resize(size, interpolation)`` → ``CenterCrop`` → ``ToTensor`` →
    ``Normalize`` on PIL images operation for operation (same PIL resize call, same crop box,
    same float32 arithmetic), so its output is bit-identical to theirs; see
    :func:`recipe_from_transform` and the tests.

    Attributes:
        resize: shorter side (int), exact (h, w), or None.
        interpolation: PIL resample filter name.
        crop: (h, w) centre crop or None.
        output: ``"float"`` → (3, h, w) float32 ``(x / 255 - mean) / std``;
            ``"uint8"`` → (h, w, 3) uint8 (the model wrapper scales it).
    """

    resize: int | tuple[int, int] | None = None
    interpolation: str = "bilinear"
    crop: tuple[int, int] | None = None
    output: str = "float"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def out_shape(self, width: int, height: int) -> tuple[int, ...]:
        h, w = self._resized_hw(height, width)
        if self.crop:
            h, w = self.crop
        return (3, h, w) if self.output == "float" else (h, w, 3)

    def _resized_hw(self, h: int, w: int) -> tuple[int, int]:
        if self.resize is None:
            return h, w
        if isinstance(self.resize, int):
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.resize, int(self.resize * long / short)
            return (new_long, new_short) if w <= h else (new_short, new_long)
        return int(self.resize[0]), int(self.resize[1])

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 → the model input of one frame (see ``output``)."""
        from PIL import Image

        h, w = frame.shape[:2]
        nh, nw = self._resized_hw(h, w)
        if (nh, nw) != (h, w):
            img = Image.fromarray(np.ascontiguousarray(frame), "RGB")
            arr = np.asarray(img.resize((nw, nh), _PIL_MODES[self.interpolation]))
        else:
            arr = frame
        if self.crop:
            arr = _center_crop(arr, *self.crop)
        if self.output == "uint8":
            return np.ascontiguousarray(arr)
        x = arr.astype(np.float32) / np.float32(255)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def _center_crop(arr: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """torchvision's ``center_crop`` on an (H, W, C) array (zero padding when too small)."""
    h, w = arr.shape[:2]
    if cw > w or ch > h:
        left, top = ((cw - w) // 2 if cw > w else 0), ((ch - h) // 2 if ch > h else 0)
        right, bottom = ((cw - w + 1) // 2 if cw > w else 0), ((ch - h + 1) // 2 if ch > h else 0)
        arr = np.pad(arr, ((top, bottom), (left, right), (0, 0)))
        h, w = arr.shape[:2]
        if (h, w) == (ch, cw):
            return arr
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return arr[top : top + ch, left : left + cw]


def recipe_from_transform(transform) -> PilRecipe | None:
    """Translate a torchvision ``Compose`` eval transform into a :class:`PilRecipe`.

    Recognises ``Resize`` → ``CenterCrop`` → (RGB conversion) → ``ToTensor`` → ``Normalize``
    (each optional but ``ToTensor``), which is open_clip's and torchvision's eval transform.
    Returns None for anything else (the caller then ships the transform itself to workers).
    """
    steps = list(getattr(transform, "transforms", [transform]))
    kw: dict = {}
    seen_tensor = False
    for t in steps:
        name = type(t).__name__
        if name == "Resize" and not seen_tensor and "resize" not in kw and "crop" not in kw:
            if getattr(t, "max_size", None) is not None:
                return None
            size = t.size
            if isinstance(size, (list, tuple)):
                size = int(size[0]) if len(size) == 1 else (int(size[0]), int(size[1]))
            mode = getattr(t.interpolation, "value", t.interpolation)
            if mode not in _PIL_MODES:
                return None
            kw.update(resize=size, interpolation=mode)
        elif name == "CenterCrop" and not seen_tensor and "crop" not in kw:
            size = t.size
            size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[-1]))
            kw["crop"] = size
        elif name in ("MaybeConvertMode",) and getattr(t, "mode", "RGB") == "RGB":
            continue
        elif getattr(t, "__name__", "") == "_convert_to_rgb":
            continue
        elif name in ("ToTensor", "MaybeToTensor") and not seen_tensor:
            seen_tensor = True
        elif name == "Normalize" and seen_tensor and "mean" not in kw:
            kw.update(mean=tuple(float(m) for m in t.mean), std=tuple(float(s) for s in t.std))
        else:
            return None
    if not seen_tensor:
        return None
    return PilRecipe(output="float", **kw)


@dataclass
class FrameSpec:
    """What one extractor needs for every step.

    Attributes:
        name: extractor name (key of the chunk arrays).
        recipe: per-frame preprocessing (a :class:`PilRecipe`, or any picklable callable
            PIL image → array/tensor, e.g. an open_clip transform).
        snippet: frames per step (1: the frame shown at the step's centre).
        rate: snippet frame rate (frames/s); None = the video's own rate.
        channel_order: ``rgb`` or ``bgr`` (the frame's channels are swapped before the recipe,
            as an OpenCV-decoded frame handed to PIL would be).
    """

    name: str
    recipe: Callable
    snippet: int = 1
    rate: float | None = None
    channel_order: str = "rgb"

    def times(self, centres: np.ndarray, video_fps: float) -> np.ndarray:
        """(n, snippet) sample times of the steps at ``centres``."""
        if self.snippet == 1:
            return np.asarray(centres, dtype=np.float64)[:, None]
        rate = self.rate or video_fps or 25.0
        return snippet_times(centres, self.snippet, rate)

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        if self.channel_order == "bgr":
            frame = frame[..., ::-1]
        if isinstance(self.recipe, PilRecipe):
            return self.recipe(frame)
        from PIL import Image

        out = self.recipe(Image.fromarray(np.ascontiguousarray(frame), "RGB"))
        return np.asarray(out.numpy() if hasattr(out, "numpy") else out)

    def step_bytes(self, width: int, height: int) -> int:
        """Rough bytes of one step's model input (for chunk sizing)."""
        if isinstance(self.recipe, PilRecipe):
            shape = self.recipe.out_shape(width, height)
            per = int(np.prod(shape)) * (4 if self.recipe.output == "float" else 1)
        else:
            per = 3 * 224 * 224 * 4
        return per * self.snippet


@dataclass
class DecodeTask:
    """Everything a worker needs to decode one video's steps.

    Attributes:
        path: video file.
        times: (n_steps,) step centres in seconds.
        specs: one :class:`FrameSpec` per extractor.
        fps: the video's frame rate (manifest) for snippets at native rate.
        width, height: native size (manifest); 0 = unknown.
        backends: backends to try in order.
        chunk_steps: steps per yielded chunk.
        max_pixels: frames above this many pixels are decoded scaled down.
    """

    path: str
    times: np.ndarray
    specs: list[FrameSpec]
    fps: float = 0.0
    width: int = 0
    height: int = 0
    backends: tuple[str, ...] = ("decord", "pyav")
    chunk_steps: int = 64
    max_pixels: int | None = DEFAULT_MAX_PIXELS


def decode_steps(task: DecodeTask) -> Iterator[dict]:
    """Decode and preprocess a video's steps, chunk by chunk (runs inside a worker).

    Yields:
        ``{"start": s, "stop": e, "arrays": {spec.name: (e - s, *input_shape) array}}`` for
        consecutive step ranges covering all steps.

    Returns (as the generator's value):
        ``{"backend": "decord" | "pyav" | "decord+pyav", "frames": decoded frame count,
        "size": [w, h] decoded, "notes": [...]}``.

    Raises:
        DecodeError: no backend can open or decode the video.
    """
    size = decode_size(task.width, task.height, task.max_pixels)
    notes = []
    if size:
        notes.append(f"decoded at {size[0]}x{size[1]} (native {task.width}x{task.height} > max_pixels)")
    errors = []
    backends = list(task.backends)
    src = None
    while backends and src is None:
        b = backends.pop(0)
        try:
            src = open_source(task.path, b, size)
        except DecodeError as exc:
            errors.append(f"{b}: {exc}")
    if src is None:
        raise DecodeError("; ".join(errors))
    used = [src.backend]
    n = len(task.times)
    decoded = 0
    fps = task.fps or src.fps
    step_times = [spec.times(task.times, fps) for spec in task.specs]
    for start in range(0, n, task.chunk_steps):
        stop = min(n, start + task.chunk_steps)
        while True:
            try:
                arrays, k = _decode_chunk(src, task.specs, [st[start:stop] for st in step_times])
                break
            except DecodeError as exc:
                errors.append(f"{src.backend}: {exc}")
                src.close()
                src = None
                while backends and src is None:
                    b = backends.pop(0)
                    try:
                        src = open_source(task.path, b, size)
                    except DecodeError as exc2:
                        errors.append(f"{b}: {exc2}")
                if src is None:
                    raise DecodeError("; ".join(errors)) from None
                used.append(src.backend)
        decoded += k
        yield {"start": start, "stop": stop, "arrays": arrays}
    skipped = getattr(src, "skipped", 0)
    if skipped:
        notes.append(f"pyav skipped {skipped} undecodable packets")
    if errors:
        notes.append("; ".join(errors))
    src.close()
    return {"backend": "+".join(used), "frames": decoded, "notes": notes}


def _decode_chunk(src: VideoSource, specs: Sequence[FrameSpec], times: Sequence[np.ndarray]):
    idx = [frames_at(src.starts, t) for t in times]
    uniq = np.unique(np.concatenate([i.ravel() for i in idx]))
    frames = dict(zip(uniq.tolist(), src.get(uniq)))
    arrays = {}
    for spec, ix in zip(specs, idx):
        cache: dict[int, np.ndarray] = {}
        rows = []
        for step in ix:
            per = []
            for i in step.tolist():
                if i not in cache:
                    cache[i] = spec.prepare(frames[i])
                per.append(cache[i])
            rows.append(per[0] if spec.snippet == 1 else np.stack(per))
        arrays[spec.name] = np.stack(rows)
    return arrays, len(uniq)


# --------------------------------------------------------------------------------------------
# Worker processes


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DecodeError):
        return str(exc)
    return short_error(exc)


def _worker_main(rfd: int, wfd: int, nice: int = 0) -> None:
    """Loop of a worker process: run tasks and generator steps on request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it closes our pipe
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    conn_in, conn_out = Connection(rfd, writable=False), Connection(wfd, readable=False)
    try:
        import av
        import decord  # noqa: F401 - imported now so that start-up is not counted as decode time
        import PIL.Image  # noqa: F401

        av.logging.set_level(av.logging.ERROR)
    except Exception:  # noqa: BLE001 - a missing backend shows up as a task error later
        pass
    conn_out.send(("ready",))
    gen = None
    while True:
        try:
            msg = conn_in.recv()
        except (EOFError, OSError):
            return
        op = msg[0]
        if op == "stop":
            return
        if op == "run":
            gen = None
            try:
                res = msg[1](*msg[2])
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                conn_out.send(("error", _describe(exc)))
                continue
            if not inspect.isgenerator(res):
                conn_out.send(("end", res))
                continue
            gen = res
        if gen is None:
            conn_out.send(("error", "no running task"))
            continue
        try:
            item = next(gen)
        except StopIteration as stop:
            gen = None
            conn_out.send(("end", stop.value))
        except BaseException as exc:  # noqa: BLE001
            gen = None
            conn_out.send(("error", _describe(exc)))
        else:
            conn_out.send(("item", item))


@dataclass
class Task:
    """A unit of work for :class:`WorkerPool`.

    Attributes:
        key: the caller's identifier (returned with every event).
        fn: a picklable module-level callable; may return a generator (streamed item by item).
        args: its positional arguments.
        fallback_args: arguments for one retry after a timeout or crash, used only when the
            task had produced no item yet (e.g. the same video with PyAV only).
    """

    key: object
    fn: Callable
    args: tuple
    fallback_args: tuple | None = None
    note: str = ""  # reason of an earlier failed attempt


@dataclass
class _Slot:
    proc: subprocess.Popen | None = None
    conn_in: Connection | None = None  # parent writes
    conn_out: Connection | None = None  # parent reads
    task: Task | None = None
    busy_since: float | None = None  # a request is outstanding since then
    items: int = 0


class WorkerPool:
    """Run :class:`Task` s in ``n_workers`` killable processes; stream their events.

    Each request to a worker (start a task, or produce its next item) must answer within
    ``timeout_s`` seconds, else the worker is killed and the task fails ("timed out").
    A worker that dies fails its task ("worker crashed"). Tasks that fail before producing an
    item are retried once with ``fallback_args`` when given.

    Events, from :meth:`imap`: ``("item", key, obj)``, ``("done", key, result)``,
    ``("failed", key, reason)``. At most ``max_buffered`` items are decoded ahead of the
    consumer.

    ``n_workers=0`` runs tasks in the calling thread (no isolation, no timeout: debugging).
    ``log_path``: append the workers' stderr (FFmpeg's complaints about damaged files) to this
    file instead of the parent's stderr. ``nice``: niceness increment of the workers (a positive
    value lets the model's threads keep the CPU while decoding fills the gaps).
    """

    def __init__(
        self,
        n_workers: int = 2,
        timeout_s: float = 120.0,
        max_buffered: int | None = None,
        log_path: str | os.PathLike | None = None,
        nice: int = 0,
    ):
        self.log_path = log_path
        self.nice = int(nice)
        self.n = int(n_workers)
        self.timeout_s = float(timeout_s)
        self.max_buffered = int(max_buffered or 2 * max(1, self.n) + 1)
        self.slots = [_Slot() for _ in range(self.n)]
        self.restarts = 0

    # -- process management
    def _spawn(self, slot: _Slot) -> None:
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        paths = [p for p in sys.path if p]
        pkg_root = str(Path(__file__).resolve().parents[2])
        code = (
            "import sys, json; sys.path[:0] = json.loads(sys.argv[1]); "
            "from prvr.video.decode import _worker_main; "
            "_worker_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))"
        )
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        err = None
        if self.log_path:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            err = open(self.log_path, "ab")
        try:
            slot.proc = subprocess.Popen(
                [sys.executable, "-c", code, json.dumps([pkg_root, *paths]), str(p2c_r), str(c2p_w), str(self.nice)],
                pass_fds=(p2c_r, c2p_w),
                stdin=subprocess.DEVNULL,
                stderr=err,
                env=env,
                close_fds=True,
            )
        finally:
            os.close(p2c_r)
            os.close(c2p_w)
            if err is not None:
                err.close()
        slot.conn_in = Connection(p2c_w, readable=False)
        slot.conn_out = Connection(c2p_r, writable=False)
        slot.task, slot.busy_since, slot.items = None, None, 0
        # wait until the worker has imported its modules: start-up time is not decode time
        if not slot.conn_out.poll(STARTUP_TIMEOUT_S):
            self._kill(slot)
            raise RuntimeError(f"a decode worker did not start within {STARTUP_TIMEOUT_S} s")
        try:
            msg = slot.conn_out.recv()
        except (EOFError, OSError):
            msg = None
        if msg != ("ready",):
            code = slot.proc.wait() if slot.proc is not None else None
            self._kill(slot)
            raise RuntimeError(f"a decode worker failed to start (exit {_exit_text(code)}); see its stderr")

    def _kill(self, slot: _Slot) -> None:
        if slot.proc is not None:
            try:
                slot.proc.kill()
            except OSError:
                pass
            try:
                slot.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not exit after SIGKILL", slot.proc.pid)
        for c in (slot.conn_in, slot.conn_out):
            if c is not None:
                try:
                    c.close()
                except OSError:
                    pass
        slot.proc = slot.conn_in = slot.conn_out = None
        slot.task, slot.busy_since, slot.items = None, None, 0

    def start(self) -> WorkerPool:
        """Start every worker now (else they start on first use); returns self."""
        try:
            for s in self.slots:
                if s.proc is None:
                    self._spawn(s)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop all workers (politely, then by force)."""
        for s in self.slots:
            if s.proc is not None and s.busy_since is None:
                try:
                    s.conn_in.send(("stop",))
                except OSError:
                    pass
        deadline = time.monotonic() + 2.0
        for s in self.slots:
            if s.proc is not None and s.busy_since is None:
                try:
                    s.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            self._kill(s)

    # -- running
    def imap(self, tasks: Iterable[Task]) -> Iterator[tuple[str, object, object]]:
        """Run ``tasks``; yield their events as they come (see the class docstring)."""
        if self.n == 0:
            yield from self._inline(tasks)
            return
        events: queue.Queue = queue.Queue()
        state = {"buffered": 0, "stop": False}
        lock = threading.Lock()
        wake_r, wake_w = os.pipe()
        thread = threading.Thread(
            target=self._dispatch, args=(collections.deque(tasks), events, state, lock, wake_r), daemon=True
        )
        thread.start()
        try:
            while True:
                ev = events.get()
                if ev[0] == "_end":
                    break
                if ev[0] == "_fatal":
                    raise RuntimeError(f"decode worker pool failed: {ev[2]}")
                if ev[0] == "item":
                    with lock:
                        state["buffered"] -= 1
                    os.write(wake_w, b"x")
                yield ev
        finally:
            state["stop"] = True
            os.write(wake_w, b"x")
            thread.join(timeout=10)
            os.close(wake_r)
            os.close(wake_w)
            self.close()

    def _inline(self, tasks: Iterable[Task]):
        for task in tasks:
            try:
                res = task.fn(*task.args)
                if inspect.isgenerator(res):
                    while True:
                        try:
                            item = next(res)
                        except StopIteration as stop:
                            yield ("done", task.key, stop.value)
                            break
                        yield ("item", task.key, item)
                else:
                    yield ("done", task.key, res)
            except Exception as exc:  # noqa: BLE001 - becomes a failure event
                yield ("failed", task.key, (task.note + _describe(exc)))

    def _dispatch(self, pending: collections.deque, events: queue.Queue, state: dict, lock, wake_r: int) -> None:
        try:
            self._dispatch_loop(pending, events, state, lock, wake_r)
        except BaseException:  # noqa: BLE001 - surfaced in the consumer
            events.put(("_fatal", None, traceback.format_exc()))
        else:
            events.put(("_end", None, None))

    def _dispatch_loop(self, pending, events, state, lock, wake_r) -> None:
        outstanding = 0

        def credit() -> bool:
            with lock:
                return state["buffered"] + outstanding < self.max_buffered

        def request(slot: _Slot, msg) -> None:
            nonlocal outstanding
            slot.conn_in.send(msg)
            slot.busy_since = time.monotonic()
            outstanding += 1

        def fail(slot: _Slot, reason: str, retryable: bool) -> None:
            task = slot.task
            if retryable and slot.items == 0 and task.fallback_args is not None:
                note = f"{task.note}{reason}; retried with fallback: "
                pending.appendleft(Task(task.key, task.fn, task.fallback_args, None, note))
            else:
                events.put(("failed", task.key, task.note + reason))

        while not state["stop"]:
            # hand out work
            for slot in self.slots:
                if slot.busy_since is not None or not credit():
                    continue
                if slot.task is not None:  # a streaming task waits for permission to go on
                    try:
                        request(slot, ("next",))
                    except (OSError, ValueError) as exc:
                        fail(slot, f"decoder crashed (worker unavailable: {exc})", True)
                        self._kill(slot)
                        self.restarts += 1
                elif pending:
                    if slot.proc is None or slot.proc.poll() is not None:
                        if slot.proc is not None:
                            self._kill(slot)
                            self.restarts += 1
                        self._spawn(slot)
                    slot.task = pending.popleft()
                    slot.items = 0
                    try:
                        request(slot, ("run", slot.task.fn, slot.task.args))
                    except (OSError, ValueError) as exc:  # worker died before we could talk to it
                        fail(slot, f"decoder crashed (worker unavailable: {exc})", True)
                        self._kill(slot)
                        self.restarts += 1
            if not pending and all(s.task is None for s in self.slots):
                return
            busy = [s for s in self.slots if s.busy_since is not None]
            now = time.monotonic()
            timeout = min((s.busy_since + self.timeout_s - now for s in busy), default=None)
            ready = wait([s.conn_out for s in busy] + [wake_r], timeout=None if timeout is None else max(0.0, timeout))
            if wake_r in ready:
                os.read(wake_r, 4096)
            now = time.monotonic()
            for slot in busy:
                if slot.conn_out in ready:
                    try:
                        msg = slot.conn_out.recv()
                    except (EOFError, OSError):
                        outstanding -= 1
                        code = slot.proc.wait() if slot.proc is not None else None
                        fail(slot, f"decoder crashed (worker exit {_exit_text(code)})", True)
                        self._kill(slot)
                        self.restarts += 1
                        continue
                    outstanding -= 1
                    slot.busy_since = None
                    kind = msg[0]
                    if kind == "item":
                        slot.items += 1
                        with lock:
                            state["buffered"] += 1
                        events.put(("item", slot.task.key, msg[1]))
                    elif kind == "end":
                        events.put(("done", slot.task.key, msg[1]))
                        slot.task = None
                    else:
                        events.put(("failed", slot.task.key, slot.task.note + msg[1]))
                        slot.task = None
                elif now - slot.busy_since > self.timeout_s:
                    outstanding -= 1
                    fail(slot, f"timed out after {self.timeout_s:g} s (decoder hung; killed)", True)
                    self._kill(slot)
                    self.restarts += 1


def _exit_text(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
