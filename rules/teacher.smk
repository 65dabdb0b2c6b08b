# Teacher (CLIP) similarity products for training, and the teacher-alone test metrics.


rule teacher_similarity:
    input:
        clip_frames="results/{dataset}/features/clip_frames.zarr",
        clip_text="results/{dataset}/text/clip_text.zarr",
        student_video="results/{dataset}/features/student_video.zarr",
        train="results/{dataset}/captions/train.caption.txt",
        test="results/{dataset}/captions/test.caption.txt",
    output:
        train=directory("results/{dataset}/teacher/train.zarr"),
        metrics="results/{dataset}/teacher/test_metrics.json",
    log:
        "logs/{dataset}/teacher_similarity.log",
    benchmark:
        "benchmarks/{dataset}/teacher_similarity.tsv"
    params:
        max_ctx_l=lambda w: dcfg(w.dataset)["train"].get("max_ctx_l", 128),
        device=block("device"),
        skip_missing=lambda w: is_imported(w.dataset),
    threads: 2
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow/scripts/teacher_similarity.py"
