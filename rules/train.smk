# Train the DL-DKD++ student, then evaluate the best checkpoint once on the test split.


rule train:
    input:
        student_video="results/{dataset}/features/student_video.zarr",
        student_text="results/{dataset}/text/student_text.zarr",
        teacher="results/{dataset}/teacher/train.zarr",
        captions=expand("results/{{dataset}}/captions/{split}.caption.txt", split=SPLITS),
    output:
        best="results/{dataset}/train/{run}/best.safetensors",
        model="results/{dataset}/train/{run}/model.json",
        log_csv=report(
            "results/{dataset}/train/{run}/log.csv",
            category="Training",
            caption="../workflow/report/train_log.rst",
        ),
        summary="results/{dataset}/train/{run}/summary.json",
    log:
        "logs/{dataset}/train_{run}.log",
    benchmark:
        "benchmarks/{dataset}/train_{run}.tsv"
    params:
        train=lambda w: train_config(w.dataset, w.run),
        device=block("device"),
        out_dir=lambda w, output: os.path.dirname(output.best),
    threads: 2
    resources:
        mem_mb=8000,
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow/scripts/train.py"


rule evaluate:
    input:
        best="results/{dataset}/train/{run}/best.safetensors",
        model="results/{dataset}/train/{run}/model.json",
        student_video="results/{dataset}/features/student_video.zarr",
        student_text="results/{dataset}/text/student_text.zarr",
        test="results/{dataset}/captions/test.caption.txt",
        teacher="results/{dataset}/teacher/test_metrics.json",
    output:
        metrics="results/{dataset}/eval/{run}/test_metrics.json",
        table=report(
            "results/{dataset}/eval/{run}/test_metrics.md",
            category="Evaluation",
            caption="../workflow/report/test_metrics.rst",
        ),
    log:
        "logs/{dataset}/evaluate_{run}.log",
    benchmark:
        "benchmarks/{dataset}/evaluate_{run}.tsv"
    params:
        train_dir=lambda w, input: os.path.dirname(input.best),
        expected=lambda w: config["datasets"][w.dataset].get("expected"),
        device=block("device"),
    threads: 2
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow/scripts/evaluate.py"
