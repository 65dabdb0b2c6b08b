"""Rule report: one markdown page per dataset (runs, teacher, expected, manifest, stage times)."""
from prvr.logs import setup_logging

setup_logging(snakemake.log[0])  # noqa: F821
from prvr.report import write_report  # noqa: E402

sm = snakemake  # noqa: F821
write_report(
    sm.output[0],
    dataset=sm.wildcards.dataset,
    runs=dict(zip(sm.params.runs, sm.input.metrics)),
    teacher_json=sm.input.teacher,
    expected=sm.params.expected,
    manifest=sm.input.manifest[0] if sm.input.manifest else None,
    benchmarks_dir=sm.params.benchmarks,
)
