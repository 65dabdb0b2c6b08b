"""The student's timeline: where each feature row sits in a video, in seconds.

One row per *step*; a step's time is its centre. Every extractor of a dataset samples at the
same centres (CLIP and ResNet: the frame shown at the centre; I3D: a snippet of frames
centred on it), so the teacher has exactly one row per student row.

Frame times are measured from the first frame's presentation time (``0.0`` = first frame).
The frame *shown at* time ``t`` is the last frame whose start is ``<= t`` (the first frame for
``t`` before it); times past the last frame map to the last frame.
"""

from __future__ import annotations

import numpy as np

TIME_DECIMALS = 4  # frame start times are rounded to 0.1 ms so backends agree on boundaries


def step_times(duration: float, fps: float, max_steps: int) -> np.ndarray:
    """Centres of the student's time steps.

    ``(k + 0.5) / fps`` for every ``k >= 0`` with a centre before ``duration``; when that gives
    more than ``max_steps`` centres, ``max_steps`` centres spread uniformly over the video
    instead (``(j + 0.5) * duration / max_steps``). A video too short for one centre (or of
    unknown length) still gets one step, at ``duration / 2``.

    Args:
        duration: video length in seconds (first frame start to last frame end).
        fps: steps per second.
        max_steps: the most steps a video may have.

    Returns:
        (n_steps,) float64 seconds, ascending, ``1 <= n_steps <= max_steps``.
    """
    if fps <= 0:
        raise ValueError(f"frames.fps must be > 0, got {fps}")
    if max_steps < 1:
        raise ValueError(f"frames.max_steps must be >= 1, got {max_steps}")
    duration = float(duration) if np.isfinite(duration) else 0.0
    if duration <= 0:
        return np.zeros(1)
    n = int(np.ceil(duration * fps - 0.5))  # number of k with (k + 0.5) / fps < duration
    while n > 0 and (n - 0.5) / fps >= duration:  # guard the float edge
        n -= 1
    while (n + 0.5) / fps < duration:
        n += 1
    if n == 0:
        return np.array([duration / 2])
    if n > max_steps:
        return (np.arange(max_steps) + 0.5) * (duration / max_steps)
    return (np.arange(n) + 0.5) / fps


def snippet_times(centres: np.ndarray, length: int, rate: float) -> np.ndarray:
    """Times of the frames of snippets centred on ``centres``.

    Frame ``j`` of a snippet of ``length`` frames sampled at ``rate`` frames/s sits at
    ``centre + (j - (length - 1) / 2) / rate``.

    Returns:
        (n_steps, length) float64 seconds (may fall outside the video: callers clamp).
    """
    offsets = (np.arange(length) - (length - 1) / 2) / float(rate)
    return np.asarray(centres, dtype=np.float64)[:, None] + offsets[None, :]


def frames_at(starts: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Index of the frame shown at each time.

    Args:
        starts: (n_frames,) frame start times in seconds, ascending, ``starts[0] == 0``.
        times: any shape, seconds.

    Returns:
        int64 indices of ``times``' shape, in ``[0, n_frames - 1]``.
    """
    starts = np.round(np.asarray(starts, dtype=np.float64), TIME_DECIMALS)
    t = np.round(np.asarray(times, dtype=np.float64), TIME_DECIMALS)
    idx = np.searchsorted(starts, t, side="right") - 1
    return np.clip(idx, 0, len(starts) - 1).astype(np.int64)
