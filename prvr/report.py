"""Per-dataset markdown report: runs beside the teacher alone and the paper's numbers."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from prvr.atomic import write_text

METRICS = ("R@1", "R@5", "R@10", "R@100", "SumR")


def metrics_row(name: str, m: dict | None) -> str:
    """One markdown table row; missing values print as a dash."""
    cells = [f"{m[k]:.1f}" if m and m.get(k) is not None else "–" for k in METRICS]
    return f"| {name} | " + " | ".join(cells) + " |"


def metrics_table(rows: list[tuple[str, dict | None]]) -> str:
    head = "| | " + " | ".join(METRICS) + " |\n|---|" + "---:|" * len(METRICS)
    return "\n".join([head] + [metrics_row(n, m) for n, m in rows])


def _read_json(path) -> dict | None:
    if path and Path(path).exists():
        return json.loads(Path(path).read_text())
    return None


def stage_times(benchmarks_dir: str | os.PathLike) -> list[tuple[str, float]]:
    """Wall seconds of each stage from Snakemake ``benchmark:`` files (shards summed per kind)."""
    out: dict[str, float] = {}
    root = Path(benchmarks_dir)
    if not root.exists():
        return []
    for tsv in sorted(root.rglob("*.tsv")):
        rel = tsv.relative_to(root).with_suffix("")
        name = str(rel.parent / "shards") if rel.name.startswith("shard_") else str(rel)
        with open(tsv, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        if rows:
            out[name] = out.get(name, 0.0) + float(rows[-1]["s"])
    return sorted(out.items())


def write_report(
    out_path,
    dataset: str,
    runs: dict[str, str],
    teacher_json=None,
    expected: dict | None = None,
    manifest=None,
    benchmarks_dir=None,
) -> str:
    """Write ``out_path`` (markdown) and return its text."""
    rows = [(f"prvr `{run}` (fused)", _read_json(p)) for run, p in runs.items()]
    teacher = _read_json(teacher_json)
    if teacher:
        rows.append(("CLIP teacher alone", teacher))
    if expected:
        rows.append(("paper (expected)", expected))
    lines = [f"# prvr report: {dataset}", "", "Text-to-video retrieval on the test split.", "", metrics_table(rows), ""]
    for run, p in runs.items():
        m = _read_json(p) or {}
        if m.get("random_weights"):
            lines.append(f"**`{run}` used RANDOM-WEIGHT demo models: the numbers only show the pipeline works.**\n")
        for b, bm in (m.get("branches") or {}).items():
            lines.append(f"- `{run}` {b} branch alone: SumR {bm['SumR']:.1f}")
    if manifest and Path(manifest).exists():
        with open(manifest, newline="") as f:
            mrows = list(csv.DictReader(f, delimiter="\t"))
        bad = [r for r in mrows if r.get("status") != "ok"]
        lines += ["", f"## Videos: {len(mrows) - len(bad)} usable, {len(bad)} quarantined", ""]
        lines += [f"- `{r['video_id']}` ({r.get('path', '')}): {r.get('reason', '')}" for r in bad]
    times = stage_times(benchmarks_dir) if benchmarks_dir else []
    if times:
        lines += ["", "## Stage wall time (Snakemake benchmark files)", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {n} | {s:.1f} |" for n, s in times]
    text = "\n".join(lines) + "\n"
    write_text(out_path, text)
    return text
