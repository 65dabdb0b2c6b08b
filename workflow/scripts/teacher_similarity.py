"""Rule teacher_similarity: teacher score products for training + teacher-alone test metrics."""
from pathlib import Path

from prvr.logs import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821
from prvr.teacher import teacher_metrics, teacher_similarity  # noqa: E402

sm = snakemake  # noqa: F821
teacher_similarity(
    sm.input.clip_frames,
    sm.input.clip_text,
    sm.input.student_video,
    sm.input.train,
    Path(sm.output.train).parent,
    max_ctx_l=sm.params.max_ctx_l,
    device=sm.params.device,
)
# Releases extracted CLIP text for train/val only: the teacher-alone row then covers what exists.
teacher_metrics(
    sm.input.clip_frames, sm.input.clip_text, sm.input.test, sm.output.metrics, skip_missing=sm.params.skip_missing
)
