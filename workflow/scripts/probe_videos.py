"""Checkpoint probe_videos: open every video (decord, PyAV fallback) and write the manifest."""
from prvr.logs import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821
from prvr.video.probe import list_videos, probe_videos  # noqa: E402

sm = snakemake  # noqa: F821
probe_videos(
    list_videos(sm.input.videos),
    sm.output.manifest,
    timeout_s=sm.params.extract["timeout_s"],
    workers=sm.threads,
    strict=sm.params.strict,
)
