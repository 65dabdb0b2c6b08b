"""Rule extract_shard: one shard of a feature set (clip_frames or student_video), resumable."""
from prvr.logs import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821
from prvr.extract import extract, n_shards  # noqa: E402

sm = snakemake  # noqa: F821
cfg = dict(sm.params.cfg)
cfg["extract"] = {**cfg["extract"], "workers": min(cfg["extract"]["workers"], sm.threads)}
extract(
    sm.wildcards.kind,
    sm.input.manifest,
    cfg,
    sm.output.store,
    shard=(int(sm.wildcards.shard), n_shards(sm.input.manifest, cfg["extract"]["shard_size"])),
    work_dir=sm.params.work,
    device=cfg["device"],
)
