"""Import throughput of the MS-SL release importer (prvr.data.msrl) on a generated TVR-shaped release.

For each size it writes a release in the exact on-disk layout (TVR dims: 3072-d BigFile
video features, 768-d RoBERTa token features, 512-d CLIP frames and captions, 5 captions
per video, 60-90 rows per video), then measures in the same run:

* ``read``: a plain sequential read of every release file (16 MiB ``readinto``), the limit;
* ``copy``: a plain copy of the same files next to the outputs (16 MiB reads and writes): an
  import must at least read and write every byte, so this is the limit of any importer;
* ``import``: ``import_release`` of the same files into prvr's stores, in a fresh process
  (wall time inside the process, and until the outputs are fsync-ed), with its peak RSS.

``cold`` evicts the release files from the page cache first (``posix_fadvise DONTNEED``, no
root needed); ``warm`` reads them once before measuring. Usage::

    .venv/bin/python bench/import_speed.py                      # 500 and 2000 videos, cold + warm
    .venv/bin/python bench/import_speed.py --videos 2000 --modes cold --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CHILD = r"""
import json, resource, sys, time, logging
logging.basicConfig(level=logging.WARNING)
from prvr.data.msrl import dataset_paths, import_release
src, out, threads = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
p = dataset_paths(out)
t = time.perf_counter()
s = import_release(src, p["captions"], p["student_video"], p["student_text"], p["clip_frames"], p["clip_text"], threads=threads)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "bytes_read": s["bytes_read"], "stores": s["stores"],
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def release_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read(paths: list[Path]) -> tuple[int, float]:
    buf = bytearray(16 << 20)
    n = 0
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(buf):
                n += k
    return n, time.perf_counter() - t


def plain_copy(paths: list[Path], src_root: Path, dest: Path) -> tuple[int, float]:
    """Copy the files with 16 MiB reads/writes (what an import must do at least: read + write the bytes)."""
    shutil.rmtree(dest, ignore_errors=True)
    os.sync()
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    n = 0
    t = time.perf_counter()
    for p in paths:
        out = dest / p.relative_to(src_root)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "rb", buffering=0) as f, open(out, "wb", buffering=0) as g:
            while k := f.readinto(buf):
                g.write(view[:k])
                n += k
    dt = time.perf_counter() - t
    shutil.rmtree(dest, ignore_errors=True)
    return n, dt


def fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def run_import(source: dict, out: Path, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # start without dirty pages of earlier steps (their write-back would be billed here)
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(source), str(out), str(threads)],
                         capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode:
        raise SystemExit(res.stderr)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    fsync_tree(out)
    info["seconds_synced"] = time.perf_counter() - t
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--modes", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    ap.add_argument("--dir", default="/tmp/prvr-bench-import")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="import_release(threads=...) values")
    ap.add_argument("--repeat", type=int, default=1, help="repetitions of every measurement (medians are printed)")
    ap.add_argument("--keep", action="store_true", help="keep the generated releases between runs")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    from msrl_fixtures import write_streaming_tvr

    base = Path(a.dir)
    results = []
    for nv in a.videos:
        rel_dir = base / f"release-{nv}"
        marker = rel_dir / ".complete"
        if not marker.exists():
            shutil.rmtree(rel_dir, ignore_errors=True)
            t = time.perf_counter()
            write_streaming_tvr(rel_dir, nv, seed=nv)
            marker.write_text("ok")
            print(f"generated {nv} videos in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        files = [p for p in release_files(rel_dir) if p.name != ".complete"]
        total = sum(p.stat().st_size for p in files)
        source = {"format": "msrl", "root": str(rel_dir / "tvr"), "collection": "tvr", "dtype": a.dtype}
        for mode, threads, _ in [(m, t, r) for r in range(a.repeat) for m in a.modes for t in a.threads]:
            os.sync()
            if mode == "cold":
                evict(files)
            else:
                plain_read(files)
            n, dt_read = plain_read(files)
            if mode == "cold":
                evict(files)
            _, dt_copy = plain_copy(files, rel_dir, base / f"copy-{nv}")
            if mode == "cold":
                evict(files)
            info = run_import(source, base / f"out-{nv}", threads)
            row = {
                "videos": nv, "mode": mode, "threads": threads, "release_mb": total / 1e6,
                "read_mb_s": n / 1e6 / dt_read,
                "copy_mb_s": n / 1e6 / dt_copy,
                "import_mb_s": total / 1e6 / info["seconds"],
                "import_synced_mb_s": total / 1e6 / info["seconds_synced"],
                "ratio": (total / info["seconds"]) / (n / dt_read),
                "peak_rss_mb": info["maxrss_mb"],
                "stores": {k: round(v["bytes_read"] / 1e6 / max(v["seconds"], 1e-9)) for k, v in info["stores"].items()},
            }
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
            shutil.rmtree(base / f"out-{nv}", ignore_errors=True)
        if not a.keep:
            shutil.rmtree(rel_dir, ignore_errors=True)
    print(f"dtype of the stores: {a.dtype}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}\n")
    if a.repeat > 1:
        import statistics

        med = []
        for key in dict.fromkeys((r["videos"], r["mode"], r["threads"]) for r in results):
            rs = [r for r in results if (r["videos"], r["mode"], r["threads"]) == key]
            m = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
            m["ratio"] = statistics.median(r["import_mb_s"] / r["read_mb_s"] for r in rs)
            m["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rs)
            med.append({**m, "mode": key[1], "videos": key[0], "threads": key[2]})
        print(f"medians of {a.repeat} repetitions (import/read: median of the per-repetition ratios; "
              "peak RSS: the largest)\n")
        results = med
    print("| videos | cache | threads | release MB | plain read MB/s | plain copy MB/s | import MB/s | import/read "
          "| import/copy | import MB/s incl. fsync | peak RSS MB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['videos']} | {r['mode']} | {r['threads']} | {r['release_mb']:.0f} | {r['read_mb_s']:.0f} | "
              f"{r['copy_mb_s']:.0f} | {r['import_mb_s']:.0f} | {100 * r['ratio']:.0f} % | "
              f"{100 * r['import_mb_s'] / r['copy_mb_s']:.0f} % | {r['import_synced_mb_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
