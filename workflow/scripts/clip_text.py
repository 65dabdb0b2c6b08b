"""Rule clip_text: CLIP text vectors (teacher), one row per caption."""
from prvr.logs import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821
from prvr.encoders.text import encode_clip_text  # noqa: E402

sm = snakemake  # noqa: F821
encode_clip_text(
    list(sm.input.captions), sm.params.clip, sm.output.store, device=sm.params.device, dtype=sm.params.dtype
)
