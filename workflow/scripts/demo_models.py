"""Rule demo_models: tiny RANDOM-WEIGHT models for the demo (prvr.demo.make_demo_models)."""
from pathlib import Path

from prvr.logs import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821
from prvr.demo import make_demo_models  # noqa: E402

done = Path(snakemake.output.done)  # noqa: F821
make_demo_models(done.parent, seed=snakemake.params.seed)  # noqa: F821
done.write_text("demo models with RANDOM weights\n")
