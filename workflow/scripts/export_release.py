"""Rule export_release: a prvr dataset written in the MS-SL/DL-DKD release layout."""
from prvr.logs import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821
from prvr.data.msrl import export_release  # noqa: E402

sm = snakemake  # noqa: F821
inp = sm.input
collection, visual_feature = sm.params.names
export_release(
    sm.output[0],
    collection,
    dict(zip(["train", "val", "test"], inp.captions)),
    inp.student_video,
    inp.student_text,
    clip_frames=inp.clip_frames,
    clip_text=inp.clip_text,
    visual_feature=visual_feature,
)
