# Captions -> CLIP text vectors (teacher) and token features (student).


rule clip_text:
    input:
        captions=expand("results/{{dataset}}/captions/{split}.caption.txt", split=SPLITS),
        models=lambda w: model_inputs(w.dataset, "clip"),
    output:
        store=directory("results/{dataset}/text/clip_text.zarr"),
    log:
        "logs/{dataset}/clip_text.log",
    benchmark:
        "benchmarks/{dataset}/clip_text.tsv"
    params:
        clip=block("clip"),
        device=block("device"),
        dtype=lambda w: dcfg(w.dataset)["extract"]["dtype"],
    threads: 2
    wildcard_constraints:
        dataset=_alt(TEACHER_VIDEO_DATASETS),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow/scripts/clip_text.py"


rule student_text:
    input:
        captions=expand("results/{{dataset}}/captions/{split}.caption.txt", split=SPLITS),
        models=lambda w: model_inputs(w.dataset, "student_text"),
    output:
        store=directory("results/{dataset}/text/student_text.zarr"),
    log:
        "logs/{dataset}/student_text.log",
    benchmark:
        "benchmarks/{dataset}/student_text.tsv"
    params:
        student_text=block("student_text"),
        device=block("device"),
        dtype=lambda w: dcfg(w.dataset)["extract"]["dtype"],
    threads: 2
    wildcard_constraints:
        dataset=_alt(VIDEO_DATASETS),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow/scripts/student_text.py"
