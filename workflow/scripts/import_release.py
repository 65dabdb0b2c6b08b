"""Rules import_release / import_release_students: the MS-SL/DL-DKD feature release -> prvr stores."""
from prvr.logs import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821
from prvr.data.msrl import import_release  # noqa: E402

sm = snakemake  # noqa: F821
out = sm.output
import_release(
    sm.params.source,
    dict(zip(["train", "val", "test"], out.captions)),
    out.student_video,
    out.student_text,
    clip_frames=getattr(out, "clip_frames", None),
    clip_text=getattr(out, "clip_text", None),
    summary=out.summary,
    dataset=sm.wildcards.dataset,
    threads=sm.threads,
)
