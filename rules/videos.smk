# Raw videos -> manifest -> CLIP teacher frames and student video features (sharded).


rule captions:
    input:
        src=lambda w: caption_source(w.dataset, w.split),
    output:
        "results/{dataset}/captions/{split}.caption.txt",
    log:
        "logs/{dataset}/captions_{split}.log",
    wildcard_constraints:
        dataset=_alt(VIDEO_DATASETS),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow/scripts/captions.py"


checkpoint probe_videos:
    input:
        videos=lambda w: videos_source(w.dataset),
    output:
        manifest="results/{dataset}/manifest.tsv",
    log:
        "logs/{dataset}/probe_videos.log",
    benchmark:
        "benchmarks/{dataset}/probe_videos.tsv"
    params:
        extract=block("extract"),
        strict=lambda w: config["datasets"][w.dataset].get("strict", False),
    threads: 2
    wildcard_constraints:
        dataset=_alt(TEACHER_VIDEO_DATASETS),
    conda:
        "../envs/video.yaml"
    script:
        "../workflow/scripts/probe_videos.py"


rule extract_shard:
    input:
        manifest="results/{dataset}/manifest.tsv",
        models=lambda w: model_inputs(w.dataset, w.kind),
    output:
        store=directory("results/{dataset}/features/shards/{kind}/{shard}.zarr"),
    log:
        "logs/{dataset}/{kind}/shard_{shard}.log",
    benchmark:
        "benchmarks/{dataset}/{kind}/shard_{shard}.tsv"
    params:
        cfg=lambda w: {k: dcfg(w.dataset)[k] for k in ("clip", "frames", "student_video", "extract", "device")},
        work="results/{dataset}/features/work/{kind}/{shard}",
    threads: 2
    resources:
        mem_mb=4000,
    wildcard_constraints:
        kind="clip_frames|student_video",
        dataset=_alt(TEACHER_VIDEO_DATASETS),
    conda:
        "../envs/video.yaml"
    script:
        "../workflow/scripts/extract_shard.py"


rule clip_frames:
    input:
        shards=lambda w: extraction_shards(w, "clip_frames"),
        manifest="results/{dataset}/manifest.tsv",
    output:
        store=directory("results/{dataset}/features/clip_frames.zarr"),
    log:
        "logs/{dataset}/clip_frames.log",
    benchmark:
        "benchmarks/{dataset}/clip_frames.tsv"
    wildcard_constraints:
        dataset=_alt(TEACHER_VIDEO_DATASETS),
    conda:
        "../envs/video.yaml"
    script:
        "../workflow/scripts/gather_shards.py"


rule student_video:
    input:
        shards=lambda w: extraction_shards(w, "student_video"),
        manifest="results/{dataset}/manifest.tsv",
    output:
        store=directory("results/{dataset}/features/student_video.zarr"),
    log:
        "logs/{dataset}/student_video.log",
    benchmark:
        "benchmarks/{dataset}/student_video.tsv"
    wildcard_constraints:
        dataset=_alt(VIDEO_DATASETS),
    conda:
        "../envs/video.yaml"
    script:
        "../workflow/scripts/gather_shards.py"
