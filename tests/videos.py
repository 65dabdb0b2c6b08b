"""Test videos made with PyAV: good clips and a corpus of broken or awkward files.

Every frame of a generated clip carries its own index, drawn as black/white bands in its top
half (``decode_index(frame)`` reads it back from a decoded frame); the bottom half is a colour
gradient (so resizes and crops are visible). Other helpers may reuse these generators.

Corpus (:func:`make_corpus`) — name: what it is (expected probe outcome):

* ``good``: 64x48, 25 fps, 3 s, H.264 (ok, decord)
* ``good_faststart``: the same with the index at the front (ok)
* ``wide``: 96x40 (ok; aspect ratio other than 4:3)
* ``vfr``: variable frame rate, frame durations alternating 20 ms / 60 ms (ok)
* ``large``: 4096x2304, 3 frames (ok; decoded downscaled when above ``max_pixels``)
* ``truncated_faststart``: index at the front, media data cut at 50 % (ok through PyAV, shorter)
* ``damaged``: 4 s clip with garbage written over a block in the middle of the media data
  (ok: a decoder conceals or skips the bad part)
* ``empty``: 0 bytes (error)
* ``garbage``: random bytes (error)
* ``truncated``: index at the end, file cut at 50 % (error: no index)
* ``audio_only``: AAC audio only (error: no video stream)
* ``zero_frames``: an AVI with a video stream and no frames (error)
* ``text``: a text file named ``.mp4`` (error)
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

FPS = 25
SIZE = (64, 48)  # width, height
BITS = 8  # frame index bits drawn in every frame


def decode_index(frame: np.ndarray) -> int:
    """Index of a decoded (H, W, 3) RGB frame made by :func:`frame_image` (bits in the top half)."""
    h, w = frame.shape[:2]
    band = w / BITS
    luma = frame[h // 8 : 3 * h // 8].astype(np.float32).mean(axis=(0, 2))
    bits = [luma[int(b * band + band / 4) : int((b + 1) * band - band / 4) + 1].mean() > 128 for b in range(BITS)]
    return int(sum(1 << b for b, on in enumerate(bits) if on))


def frame_image(i: int, width: int, height: int) -> np.ndarray:
    """The (height, width, 3) uint8 RGB picture of frame ``i``.

    Top half: ``BITS`` vertical bands, white where the bit of ``i`` is set (the frame's index);
    bottom half: a colour gradient.
    """
    img = np.empty((height, width, 3), np.uint8)
    band = width / BITS
    cols = np.arange(width)
    on = ((i >> np.minimum((cols / band).astype(int), BITS - 1)) & 1).astype(bool)
    img[: height // 2] = np.where(on, 235, 16)[None, :, None]
    img[height // 2 :, :, 0] = 128
    img[height // 2 :, :, 1] = np.linspace(0, 255, width, dtype=np.float32).astype(np.uint8)[None, :]
    img[height // 2 :, :, 2] = np.linspace(255, 0, height - height // 2, dtype=np.float32).astype(np.uint8)[:, None]
    return img


def write_video(
    path: str | os.PathLike,
    n_frames: int = 75,
    fps: int = FPS,
    size: tuple[int, int] = SIZE,
    faststart: bool = False,
    gop: int = 12,
    pts_ms: list[int] | None = None,
    audio: bool = False,
) -> Path:
    """Write an H.264 MP4 whose frame ``i`` is :func:`frame_image` ``(i)``.

    Args:
        path: output file.
        n_frames: number of frames.
        fps: nominal frame rate.
        size: (width, height); both even.
        faststart: put the index (moov) at the front.
        gop: keyframe interval.
        pts_ms: presentation times in milliseconds (variable frame rate); default i/fps.
        audio: add a silent AAC track.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height = size
        st.pix_fmt = "yuv420p"
        st.options = {"crf": "12", "g": str(gop), "bf": "2", "preset": "ultrafast"}
        if pts_ms is not None:
            st.codec_context.time_base = Fraction(1, 1000)
        ast = out.add_stream("aac", rate=16000) if audio else None
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_image(i, *size), format="rgb24")
            if pts_ms is not None:
                frame.pts = pts_ms[i]
                frame.time_base = Fraction(1, 1000)
            for packet in st.encode(frame):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)
        if ast is not None:
            _write_silence(out, ast, n_frames / fps)
    return path


def _write_silence(out, ast, seconds: float) -> None:
    import av

    rate = ast.codec_context.sample_rate or 16000
    n = 1024
    for k in range(int(seconds * rate) // n + 1):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, n), np.float32), format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = k * n
        for packet in ast.encode(frame):
            out.mux(packet)
    for packet in ast.encode():
        out.mux(packet)


def write_audio_only(path: str | os.PathLike, seconds: float = 1.0) -> Path:
    import av

    path = Path(path)
    with av.open(str(path), "w", format="mp4") as out:
        ast = out.add_stream("aac", rate=16000)
        _write_silence(out, ast, seconds)
    return path


def write_zero_frames(path: str | os.PathLike) -> Path:
    """A container with a video stream that holds no frames (AVI: MP4 drops an empty track)."""
    import av

    path = Path(path)
    with av.open(str(path), "w", format="avi") as out:
        st = out.add_stream("mpeg4", rate=FPS)
        st.width, st.height = SIZE
        st.pix_fmt = "yuv420p"
        out.start_encoding()
        for packet in st.encode():
            out.mux(packet)
    return path


def _mdat_span(data: bytes) -> tuple[int, int]:
    """(start, end) of the payload of the top-level ``mdat`` box of an MP4."""
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        header = 8
        if size == 1:
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
            header = 16
        elif size == 0:
            size = len(data) - pos
        if kind == b"mdat":
            return pos + header, pos + size
        pos += size
    raise ValueError("no mdat box")


def make_corpus(folder: str | os.PathLike, large: bool = True) -> dict[str, str]:
    """Write the corpus described in the module docstring into ``folder``.

    Returns:
        ``{video_id: "ok" | "error"}``, the expected probe status of each file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    expect = {}

    write_video(folder / "good.mp4")
    expect["good"] = "ok"
    write_video(folder / "good_faststart.mp4", faststart=True)
    expect["good_faststart"] = "ok"
    write_video(folder / "wide.mp4", n_frames=50, size=(96, 40))
    expect["wide"] = "ok"
    steps = [20 if i % 2 == 0 else 60 for i in range(60)]
    write_video(folder / "vfr.mp4", n_frames=60, pts_ms=list(np.cumsum([0] + steps[:-1])))
    expect["vfr"] = "ok"
    if large:
        write_video(folder / "large.mp4", n_frames=3, size=(4096, 2304))
        expect["large"] = "ok"

    full = write_video(folder / "_tmp_fs.mp4", n_frames=100, faststart=True).read_bytes()
    (folder / "truncated_faststart.mp4").write_bytes(full[: len(full) // 2])
    expect["truncated_faststart"] = "ok"
    plain = write_video(folder / "_tmp_plain.mp4", n_frames=100, gop=10).read_bytes()
    (folder / "truncated.mp4").write_bytes(plain[: len(plain) // 2])
    expect["truncated"] = "error"
    lo, hi = _mdat_span(plain)
    bad = bytearray(plain)
    mid = lo + (hi - lo) // 2
    bad[mid : mid + (hi - lo) // 10] = rng.integers(0, 256, (hi - lo) // 10, dtype=np.uint8).tobytes()
    (folder / "damaged.mp4").write_bytes(bytes(bad))
    expect["damaged"] = "ok"
    (folder / "_tmp_fs.mp4").unlink()
    (folder / "_tmp_plain.mp4").unlink()

    (folder / "empty.mp4").write_bytes(b"")
    expect["empty"] = "error"
    (folder / "garbage.mp4").write_bytes(rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    expect["garbage"] = "error"
    write_audio_only(folder / "audio_only.mp4")
    expect["audio_only"] = "error"
    write_zero_frames(folder / "zero_frames.avi")
    expect["zero_frames"] = "error"
    (folder / "text.mp4").write_text("this is not a video\n")
    expect["text"] = "error"
    return expect


def make_fifo(path: str | os.PathLike) -> Path:
    """A named pipe with no writer: opening it for reading blocks forever (a hung decoder)."""
    path = Path(path)
    os.mkfifo(path)
    return path


def crash(*_args):
    """A task that kills its own process with SIGSEGV (a decoder crash)."""
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


def sleep_forever(*_args):
    """A task that never returns (a decoder hang)."""
    import time

    while True:
        time.sleep(1)


def count_to(n, *_args):
    """A streaming task: yields 0..n-1, returns n."""
    for i in range(n):
        yield i
    return n
