"""Rule train: DL-DKD++ training via prvr.train.train (resumes from last.pt when present)."""
from prvr.logs import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821
from prvr.config import TrainConfig  # noqa: E402
from prvr.train import train  # noqa: E402

sm = snakemake  # noqa: F821
cfg = TrainConfig.from_dict({"device": sm.params.device, "threads": sm.threads, **sm.params.train})
captions = dict(zip(["train", "val", "test"], sm.input.captions))
paths = {
    "student_video": sm.input.student_video,
    "student_text": sm.input.student_text,
    "teacher_dir": str(__import__("pathlib").Path(sm.input.teacher).parent),
    "captions": captions,
}
train(paths, cfg, sm.params.out_dir)
