# One markdown report per dataset: every run's metrics beside the teacher and expected numbers.


rule report:
    input:
        metrics=expand("results/{{dataset}}/eval/{run}/test_metrics.json", run=RUNS),
        teacher="results/{dataset}/teacher/test_metrics.json",
        manifest=lambda w: (
            [f"results/{w.dataset}/manifest.tsv"] if w.dataset in VIDEO_DATASETS else []
        ),
    output:
        report(
            "results/{dataset}/report.md",
            category="Summary",
            caption="../workflow/report/summary.rst",
        ),
    log:
        "logs/{dataset}/report.log",
    params:
        runs=RUNS,
        expected=lambda w: config["datasets"][w.dataset].get("expected"),
        benchmarks="benchmarks/{dataset}",
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow/scripts/report.py"
