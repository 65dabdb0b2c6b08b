"""The Snakemake workflow as a user runs it: dry run, lint, and a tiny end-to-end run."""

from __future__ import annotations

import json
import shutil

import pytest

from workflow_utils import REPO, TINY, copy_repo, planned_jobs, snakemake, write_config


def test_dry_run_default_config(tmp_path):
    work = copy_repo(tmp_path / "repo")
    jobs = planned_jobs(work)
    for rule in ("demo_videos", "demo_models", "probe_videos", "train", "evaluate", "report"):
        assert jobs.get(rule) == 1, jobs
    assert jobs["captions"] == 3


def test_lint_is_clean():
    proc = snakemake(REPO, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_bad_config_fails_with_key_named(tmp_path):
    work = copy_repo(tmp_path / "repo")
    bad = {"datasets": {"demo": {"frames": {"fps": "fast"}}}}
    cfg = write_config(work, bad, "bad.yaml")
    proc = snakemake(work, "-n", "--configfile", str(cfg), check=False)
    assert proc.returncode != 0
    assert "datasets.demo.frames" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_tiny_end_to_end(tmp_path):
    """Raw videos in, metrics out; reruns are no-ops; a param change reruns only downstream;
    a corrupt video is quarantined and skipped."""
    work = copy_repo(tmp_path / "repo")
    cfg = str(write_config(work))
    snakemake(work, "--cores", "2", "--configfile", cfg)

    metrics = json.loads((work / "results/tiny/eval/dldkdpp/test_metrics.json").read_text())
    for k in ("R@1", "R@5", "R@10", "R@100", "SumR"):
        assert 0.0 <= metrics[k] <= (400.0 if k == "SumR" else 100.0)
    report = (work / "results/tiny/report.md").read_text()
    assert "SumR" in report and "CLIP teacher alone" in report

    # Nothing to do on a rerun.
    assert planned_jobs(work, "--configfile", cfg) == {}

    # A train param change reruns train and what follows, nothing upstream.
    changed = json.loads(json.dumps(TINY))
    changed["datasets"]["tiny"]["train"]["lr"] = 5e-4
    cfg2 = str(write_config(work, changed, "tiny2.yaml"))
    jobs = planned_jobs(work, "--configfile", cfg2)
    assert set(jobs) == {"train", "evaluate", "report", "all"}, jobs

    # A corrupt video: reported in the manifest, skipped downstream, run completes.
    videos = work / "results/tiny/raw/videos"
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    snakemake(work, "--cores", "2", "--configfile", cfg, "--forcerun", "probe_videos")
    manifest = (work / "results/tiny/manifest.tsv").read_text().splitlines()
    broken = [line for line in manifest if line.startswith("broken\t")]
    assert broken and "\terror\t" in broken[0]
    from prvr.store import FeatureStore

    store = FeatureStore.open(work / "results/tiny/features/clip_frames.zarr")
    assert "broken" not in store and len(store) == 12
    assert "broken" in (work / "results/tiny/report.md").read_text()
    shutil.rmtree(work / "results", ignore_errors=True)
