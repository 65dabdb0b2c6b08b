"""Rules clip_frames / student_video: gather the shard stores into the dataset's store."""
from prvr.logs import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821
from prvr.extract import gather  # noqa: E402

sm = snakemake  # noqa: F821
gather(list(sm.input.shards), sm.output.store, manifest=sm.input.manifest)
