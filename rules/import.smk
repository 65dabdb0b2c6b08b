# Pre-extracted features: import the MS-SL / DL-DKD release into prvr's stores (datasets with
# `source:`), and export any prvr dataset back into that layout (on demand).
#   snakemake --configfile config/datasets/tvr.yaml --cores 8      # import -> teacher -> train -> evaluate
#   snakemake results/demo/export/VisualSearch --cores 1           # release layout of a prvr dataset
from prvr.data.msrl import export_names, release_input_files, val_is_test_message

IMPORTED_DATASETS = [d for d in DATASETS if is_imported(d)]
# TEACHER_FROM_VIDEOS (rules/common.smk): source.teacher is videos -> the CLIP teacher comes
# from prvr's own probe_videos / clip_frames / clip_text stages on the dataset's `videos:`.
IMPORT_WITH_TEACHER = [d for d in IMPORTED_DATASETS if d not in TEACHER_FROM_VIDEOS]
for _d in TEACHER_FROM_VIDEOS:
    if "videos" not in config["datasets"][_d]:
        raise ValueError(
            f"datasets.{_d}.source.teacher is 'videos', but datasets.{_d}.videos is not set: "
            "name the folder (or TSV) of the raw videos the CLIP teacher is computed from"
        )
# val == test means model selection on the test set: say it on the console, not only in the log.
for _d in config.get("targets") or DATASETS:
    if _d in IMPORTED_DATASETS and (
        _msg := val_is_test_message(config["datasets"][_d]["source"])
    ):
        print(f"WARNING (dataset {_d}): {_msg}", file=sys.stderr)


rule import_release:
    input:
        unpack(
            lambda w: release_input_files(
                config["datasets"][w.dataset]["source"], w.dataset, teacher=True
            )
        ),
    output:
        captions=expand(
            "results/{{dataset}}/captions/{split}.caption.txt", split=SPLITS
        ),
        student_video=directory("results/{dataset}/features/student_video.zarr"),
        clip_frames=directory("results/{dataset}/features/clip_frames.zarr"),
        student_text=directory("results/{dataset}/text/student_text.zarr"),
        clip_text=directory("results/{dataset}/text/clip_text.zarr"),
        summary="results/{dataset}/import/summary.json",
    log:
        "logs/{dataset}/import_release.log",
    benchmark:
        "benchmarks/{dataset}/import_release.tsv"
    wildcard_constraints:
        dataset=_alt(IMPORT_WITH_TEACHER),
    conda:
        "../envs/torch.yaml"
    threads: 1  # 2+: BigFile and HDF5 files concurrently (no gain measured on 2 loaded cores)
    resources:
        mem_mb=3000,
    params:
        source=lambda w: config["datasets"][w.dataset]["source"],
    script:
        "../workflow/scripts/import_release.py"


rule import_release_students:
    input:
        unpack(
            lambda w: release_input_files(
                config["datasets"][w.dataset]["source"], w.dataset, teacher=False
            )
        ),
    output:
        captions=expand(
            "results/{{dataset}}/captions/{split}.caption.txt", split=SPLITS
        ),
        student_video=directory("results/{dataset}/features/student_video.zarr"),
        student_text=directory("results/{dataset}/text/student_text.zarr"),
        summary="results/{dataset}/import/summary.json",
    log:
        "logs/{dataset}/import_release.log",
    benchmark:
        "benchmarks/{dataset}/import_release.tsv"
    wildcard_constraints:
        dataset=_alt(TEACHER_FROM_VIDEOS),
    conda:
        "../envs/torch.yaml"
    threads: 1  # 2+: BigFile and HDF5 files concurrently (no gain measured on 2 loaded cores)
    resources:
        mem_mb=3000,
    params:
        source=lambda w: config["datasets"][w.dataset]["source"],
    script:
        "../workflow/scripts/import_release.py"


rule export_release:
    input:
        captions=expand(
            "results/{{dataset}}/captions/{split}.caption.txt", split=SPLITS
        ),
        student_video="results/{dataset}/features/student_video.zarr",
        student_text="results/{dataset}/text/student_text.zarr",
        clip_frames="results/{dataset}/features/clip_frames.zarr",
        clip_text="results/{dataset}/text/clip_text.zarr",
    output:
        directory("results/{dataset}/export/VisualSearch"),
    log:
        "logs/{dataset}/export_release.log",
    benchmark:
        "benchmarks/{dataset}/export_release.tsv"
    conda:
        "../envs/torch.yaml"
    params:
        names=lambda w: export_names(w.dataset, dcfg(w.dataset)),
    script:
        "../workflow/scripts/export_release.py"
