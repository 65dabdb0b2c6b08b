"""Rule captions: validate a split's caption file and store it in the MS-SL format."""
from prvr.logs import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821
from prvr.data.captions import read_captions, write_captions  # noqa: E402

write_captions(snakemake.output[0], read_captions(snakemake.input.src))  # noqa: F821
