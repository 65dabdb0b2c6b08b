"""Videos: listing and probing (manifest), decoding in killable workers, the step timeline."""

from prvr.video.decode import DecodeError, FrameSpec, PilRecipe, WorkerPool, open_source
from prvr.video.probe import ProbeError, list_videos, probe_videos, read_manifest, write_manifest
from prvr.video.timeline import frames_at, snippet_times, step_times

__all__ = [
    "DecodeError",
    "FrameSpec",
    "PilRecipe",
    "ProbeError",
    "WorkerPool",
    "frames_at",
    "list_videos",
    "open_source",
    "probe_videos",
    "read_manifest",
    "snippet_times",
    "step_times",
    "write_manifest",
]
