"""Helpers for tests that run the real Snakemake workflow in a throwaway copy of the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

TINY = {
    "targets": ["tiny"],
    "runs": {"dldkdpp": {}},
    "datasets": {
        "tiny": {
            "demo": {"n_videos": 12, "seed": 1},
            "videos": "results/tiny/raw/videos",
            "captions": {s: f"results/tiny/raw/demo{s}.caption.txt" for s in ("train", "val", "test")},
            "clip": {"model": "local-dir:results/tiny/models/clip", "pretrained": None, "batch_size": 16},
            "frames": {"fps": 1.0, "max_steps": 8},
            "student_video": [{"kind": "clip", "model": "local-dir:results/tiny/models/student_clip", "pretrained": None}],
            "student_text": {"model": "results/tiny/models/roberta", "max_tokens": 16},
            "extract": {"shard_size": 5, "workers": 1, "timeout_s": 60},
            "train": {"n_epoch": 2, "batch_size": 4, "hidden": 32, "n_heads": 4, "progress": False},
        }
    },
}


def copy_repo(dest: Path) -> Path:
    """Copy the tracked (and untracked, not ignored) files of the repo to ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def write_config(dest: Path, cfg: dict = TINY, name: str = "tiny.yaml") -> Path:
    path = dest / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [SNAKEMAKE, *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Rules (with counts) that a dry run would execute."""
    proc = snakemake(workdir, "-n", "--quiet", "rules", *args)
    jobs: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("total", "job"):
            jobs[parts[0]] = int(parts[1])
    return jobs
