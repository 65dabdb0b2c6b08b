"""Rule student_text: token-level text features of the student (RoBERTa-style)."""
from prvr.logs import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821
from prvr.encoders.text import encode_student_text  # noqa: E402

sm = snakemake  # noqa: F821
encode_student_text(
    list(sm.input.captions), sm.params.student_text, sm.output.store, device=sm.params.device, dtype=sm.params.dtype
)
