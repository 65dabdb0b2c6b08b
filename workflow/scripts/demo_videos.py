"""Rule demo_videos: generate the procedural demo dataset (prvr.demo.make_demo_dataset)."""
from pathlib import Path

from prvr.logs import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821 (injected by Snakemake)
from prvr.demo import make_demo_dataset  # noqa: E402

out = snakemake.output  # noqa: F821
make_demo_dataset(Path(out.videos).parent, **snakemake.params.demo)  # noqa: F821
