"""Feature-extraction throughput: end to end vs the bare model forward, on generated videos.

For each kind (``clip_frames`` with a random-init ViT-B-32; ``i3d`` = ``student_video`` with a
random-init Inception-I3D on 16-frame 224 px snippets) the script measures, in one process:

* decode: the decode workers alone (decord + PIL preprocessing, ``--workers`` processes),
  model-input frames per second;
* bare forward: the model on pre-decoded, pre-processed batches already in memory (the
  limit);
* end to end: :func:`prvr.extract.extract` from the manifest to the written store (decode +
  preprocess + model + write), total and without its set-up (model load, worker start).

Bare and end-to-end runs alternate ``--repeats`` times and the best of each is reported (on a
shared machine other processes only ever slow a run down). Frames are model-input frames
(CLIP: one per step; I3D: 16 per step).

Usage: ``python bench/extract_speed.py [--videos 4 --seconds 10 --clip-fps 2 --i3d-fps 0.3]``
(a few minutes on 2 CPU cores). Random weights: the numbers are speeds, not features.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prvr.extract import build_encoders, extract  # noqa: E402
from prvr.video import list_videos, probe_videos, read_manifest, step_times  # noqa: E402
from prvr.video.decode import CHUNK_BYTES, DecodeTask, Task, WorkerPool, decode_steps  # noqa: E402


def make_videos(folder: Path, n: int, seconds: float, size=(320, 240), fps=25) -> None:
    """Moving-gradient H.264 clips (keyframe every 2 s), like a typical web video."""
    import av

    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for v in range(n):
        with av.open(str(folder / f"v{v:02d}.mp4"), "w") as out:
            st = out.add_stream("libx264", rate=fps)
            st.width, st.height, st.pix_fmt = w, h, "yuv420p"
            st.options = {"g": str(2 * fps), "preset": "veryfast", "crf": "23"}
            for i in range(int(seconds * fps)):
                img = np.stack([(xx + 3 * i + 40 * v) % 256, (yy + 2 * i) % 256, (xx + yy + i) % 256], -1)
                frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
                for p in st.encode(frame):
                    out.mux(p)
            for p in st.encode():
                out.mux(p)


def decode_only(manifest: Path, cfg: dict, encoders, workers: int) -> dict:
    """Decode + preprocess every step with the worker pool; keep the model inputs."""
    rows = [r for r in read_manifest(manifest) if r["status"] == "ok"]
    specs = [e.spec for e in encoders]
    tasks = []
    for i, r in enumerate(rows):
        times = step_times(r["duration"], cfg["frames"]["fps"], cfg["frames"]["max_steps"])
        bps = sum(s.step_bytes(r["width"], r["height"]) for s in specs)
        tasks.append(Task(i, decode_steps, (DecodeTask(r["path"], times, specs, fps=r["fps"], width=r["width"],
                                                      height=r["height"], chunk_steps=max(1, min(256, CHUNK_BYTES // bps))),)))
    inputs = [[] for _ in specs]
    frames = 0
    pool = WorkerPool(workers, 600).start()  # worker start-up is not decode time
    t = time.perf_counter()
    for kind, _, payload in pool.imap(tasks):
        if kind == "item":
            for k, s in enumerate(specs):
                inputs[k].append(payload["arrays"][s.name])
        elif kind == "done":
            frames += payload["frames"]
        else:
            raise RuntimeError(payload)
    seconds = time.perf_counter() - t
    inputs = [np.concatenate(x) for x in inputs]
    steps = len(inputs[0])
    model_frames = steps * sum(s.snippet for s in specs)
    return {"seconds": seconds, "steps": steps, "model_frames": model_frames, "decoded_frames": frames,
            "inputs": inputs}


def bare_forward(encoders, inputs) -> dict:
    """The model alone on in-memory batches (one warm-up batch first, not timed)."""
    import torch

    total = 0.0
    with torch.inference_mode():
        for enc, x in zip(encoders, inputs):
            b = enc.batch_size
            enc.encode(x[:b] if len(x) >= b else np.concatenate([x, np.zeros((b - len(x), *x.shape[1:]), x.dtype)]))
            t = time.perf_counter()
            for s in range(0, len(x), b):
                batch = x[s : s + b]
                if len(batch) < b:  # the same padded full batches as extract()
                    batch = np.concatenate([batch, np.zeros((b - len(batch), *batch.shape[1:]), batch.dtype)])
                enc.encode(batch)
            total += time.perf_counter() - t
    return {"seconds": total}


def run_kind(name: str, kind: str, cfg: dict, manifest: Path, out: Path, workers: int, repeats: int) -> dict:
    """Decode alone once; then bare forward and end to end alternately ``repeats`` times (best of each:
    other processes on a shared machine only ever slow a run down)."""
    encoders = build_encoders(kind, cfg, "cpu", allow_random=True)
    dec = decode_only(manifest, cfg, encoders, workers)
    inputs = dec.pop("inputs")
    steps, mframes = dec["steps"], dec["model_frames"]
    bare_s, e2e_s, run_s, setup_s = [], [], [], []
    for r in range(repeats):
        bare_s.append(bare_forward(encoders, inputs)["seconds"])
        e2e = extract(kind, manifest, cfg, out / f"{name}-{r}.zarr", progress=False, allow_random=True)
        assert e2e["steps"] == steps, (e2e["steps"], steps)
        e2e_s.append(e2e["seconds"])
        run_s.append(e2e["seconds"] - e2e["setup_seconds"])
        setup_s.append(e2e["setup_seconds"])
        print(f"  {name} repeat {r}: bare {mframes / bare_s[-1]:.2f} fps, end to end {mframes / e2e_s[-1]:.2f} fps "
              f"({mframes / run_s[-1]:.2f} without set-up)", flush=True)
    bare, full, run = min(bare_s), min(e2e_s), min(run_s)
    return {
        "kind": name,
        "steps": steps,
        "model_frames": mframes,
        "decoded_frames": dec["decoded_frames"],
        "decode_fps": mframes / dec["seconds"],
        "bare_fps": mframes / bare,
        "e2e_fps": mframes / full,
        "e2e_run_fps": mframes / run,
        "setup_s": min(setup_s),
        "ratio": bare / full,
        "ratio_run": bare / run,
        "repeats": {"bare_s": bare_s, "e2e_s": e2e_s, "run_s": run_s},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clip-fps", type=float, default=2.0)
    ap.add_argument("--i3d-fps", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=3, help="alternate bare/e2e this many times; best of each")
    ap.add_argument("--clip-batch", type=int, default=32)
    ap.add_argument("--i3d-batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--nice", type=int, default=None, help="extract.worker_nice (default: prvr's default)")
    ap.add_argument("--kinds", default="clip_frames,i3d")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="prvr-extract-bench-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        make_videos(tmp / "videos", args.videos, args.seconds)
        manifest = tmp / "manifest.tsv"
        probe_videos(list_videos(tmp / "videos"), manifest, workers=args.workers, progress=False)
        print(f"# {args.videos} videos x {args.seconds:g} s, 320x240 @ 25 fps (made + probed in "
              f"{time.perf_counter() - t:.1f} s); torch threads {torch.get_num_threads()}, "
              f"decode workers {args.workers}, {os.cpu_count()} CPUs", flush=True)
        base = {"device": "cpu", "extract": {"workers": args.workers, "timeout_s": 600, "dtype": "float16"}}
        if args.nice is not None:
            base["extract"]["worker_nice"] = args.nice
        results = []
        for kind in args.kinds.split(","):
            if kind == "clip_frames":
                cfg = {**base, "clip": {"model": "ViT-B-32", "pretrained": None, "batch_size": args.clip_batch},
                       "frames": {"fps": args.clip_fps, "max_steps": 100000}}
                results.append(run_kind("clip_frames", "clip_frames", cfg, manifest, tmp, args.workers, args.repeats))
            elif kind == "i3d":
                cfg = {**base, "frames": {"fps": args.i3d_fps, "max_steps": 100000},
                       "student_video": [{"kind": "i3d", "checkpoint": None, "batch_size": args.i3d_batch}]}
                results.append(run_kind("i3d", "student_video", cfg, manifest, tmp, args.workers, args.repeats))
            else:
                raise SystemExit(f"unknown kind {kind}")
            print(json.dumps({k: v for k, v in results[-1].items() if k != "repeats"}), flush=True)
    print()
    print("| kind | steps | model frames | decode only (fps) | bare forward (fps) | end to end (fps) | "
          "e2e / bare | e2e w/o set-up (fps) | ratio w/o set-up | set-up (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['kind']} | {r['steps']} | {r['model_frames']} | {r['decode_fps']:.0f} | {r['bare_fps']:.1f} | "
              f"{r['e2e_fps']:.1f} | {100 * r['ratio']:.0f} % | {r['e2e_run_fps']:.1f} | {100 * r['ratio_run']:.0f} % | "
              f"{r['setup_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
