"""Rule evaluate: test metrics of the best checkpoint (fused and per branch) + markdown table."""
from prvr.logs import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821
from prvr.evaluate import evaluate  # noqa: E402

sm = snakemake  # noqa: F821
evaluate(
    sm.params.train_dir,
    sm.input.student_video,
    sm.input.student_text,
    sm.input.test,
    sm.output.metrics,
    out_md=sm.output.table,
    device=sm.params.device,
    expected=sm.params.expected,
    teacher_json=sm.input.teacher,
)
