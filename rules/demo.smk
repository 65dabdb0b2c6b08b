# The embedded demo dataset and its tiny random-weight models (demo datasets only).


rule demo_videos:
    output:
        videos=directory("results/{dataset}/raw/videos"),
        train="results/{dataset}/raw/demotrain.caption.txt",
        val="results/{dataset}/raw/demoval.caption.txt",
        test="results/{dataset}/raw/demotest.caption.txt",
        moments="results/{dataset}/raw/moments.tsv",
    log:
        "logs/{dataset}/demo_videos.log",
    benchmark:
        "benchmarks/{dataset}/demo_videos.tsv"
    params:
        demo=lambda w: config["datasets"][w.dataset]["demo"],
    wildcard_constraints:
        dataset=_alt(DEMO_DATASETS),
    conda:
        "../envs/video.yaml"
    script:
        "../workflow/scripts/demo_videos.py"


rule demo_models:
    output:
        done="results/{dataset}/models/.done",
    log:
        "logs/{dataset}/demo_models.log",
    benchmark:
        "benchmarks/{dataset}/demo_models.tsv"
    params:
        seed=lambda w: config["datasets"][w.dataset]["demo"]["seed"],
    wildcard_constraints:
        dataset=_alt(DEMO_DATASETS),
    conda:
        "../envs/torch.yaml"
    script:
        "../workflow/scripts/demo_models.py"
