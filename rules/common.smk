# Shared Python of the workflow: validation, wildcard constraints, input functions.
import os
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)  # prvr importable from a plain checkout

from prvr.config import dataset_config, validate_config  # noqa: E402

validate_config(config)

DATASETS = sorted(config["datasets"])
RUNS = sorted(config["runs"])
SPLITS = ["train", "val", "test"]


def _alt(names):
    return "|".join(names) if names else "__none__"


def is_demo(dataset):
    return "demo" in config["datasets"][dataset]


def has_videos(dataset):
    ds = config["datasets"][dataset]
    return "videos" in ds or "demo" in ds


def is_imported(dataset):
    return "source" in config["datasets"][dataset]


VIDEO_DATASETS = [d for d in DATASETS if has_videos(d) and not is_imported(d)]
# Imported releases without CLIP teacher files: the teacher comes from prvr's own clip_frames /
# clip_text stages on the dataset's `videos:` (source.teacher: videos).
TEACHER_FROM_VIDEOS = [
    d for d in DATASETS if is_imported(d) and config["datasets"][d]["source"].get("teacher") == "videos"
]
TEACHER_VIDEO_DATASETS = VIDEO_DATASETS + TEACHER_FROM_VIDEOS
DEMO_DATASETS = [d for d in DATASETS if is_demo(d)]


wildcard_constraints:
    dataset=_alt(DATASETS),
    run=_alt(RUNS),
    split=_alt(SPLITS),
    shard=r"\d+",


def dcfg(dataset):
    """The merged config of one dataset (its block over the top-level stage blocks)."""
    return dataset_config(config, dataset)


def block(name):
    """params function: one stage block of a dataset's merged config (reruns when it changes)."""
    return lambda w: dcfg(w.dataset)[name]


def videos_source(dataset):
    return config["datasets"][dataset]["videos"]


def caption_source(dataset, split):
    return config["datasets"][dataset]["captions"][split]


def model_inputs(dataset, which):
    """Demo models are built by the workflow; real models are files the user provides."""
    return [f"results/{dataset}/models/.done"] if is_demo(dataset) else []


def train_config(dataset, run):
    from prvr.config import deep_merge

    return deep_merge(dcfg(dataset)["train"], config["runs"][run])


def extraction_shards(wildcards, kind):
    """Shard stores of one feature set, once the probe checkpoint has written the manifest."""
    from prvr.extract import n_shards

    manifest = checkpoints.probe_videos.get(dataset=wildcards.dataset).output.manifest
    n = n_shards(manifest, dcfg(wildcards.dataset)["extract"]["shard_size"])
    return expand(
        "results/{dataset}/features/shards/{kind}/{shard}.zarr",
        dataset=wildcards.dataset,
        kind=kind,
        shard=range(n),
    )


def get_final_output():
    targets = config.get("targets") or DATASETS
    out = []
    for d in targets:
        if d not in config["datasets"]:
            raise ValueError(f"targets: dataset {d!r} is not defined under datasets")
        out += expand("results/{dataset}/eval/{run}/test_metrics.json", dataset=d, run=RUNS)
        out.append(f"results/{d}/report.md")
    return out
