"""Ablations of DL-DKD++ on the planted synthetic set (tests/synthetic.py).

Usage:  python bench/ablation.py [--seeds 3] [--epochs 15] [--videos 400] [--out results.md]

Variants (method spec §7.2 switches, everything else at the DL-DKD++ settings):

* DL-DKD++ (both branches, soft targets, KD)
* inheritance branch only / exploration branch only
* KD off (no frame-level distillation; soft targets kept)
* hard targets (``label_style hard``: plain InfoNCE, the ICCV DL-DKD behaviour)

Each variant is trained with ``--seeds`` training seeds on the same data and evaluated once
on the test split with its best-val checkpoint; the table gives the test metrics' mean (and
the SumR standard deviation). The teacher alone and an untrained student are listed for scale.
The data are synthetic: the numbers say how the switches behave on planted structure (a
teacher that sees only part of the latent signal), not what they do on TVR.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

VARIANTS = {
    "DL-DKD++ (both branches, soft targets, KD)": {},
    "inheritance branch only": {"branches": "inheritance"},
    "exploration branch only": {"branches": "exploration"},
    "KD off": {"kd": False},
    "hard targets (DL-DKD, ICCV)": {"label_style": "hard"},
}
KEYS = ("R@1", "R@5", "R@10", "R@100", "SumR")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--videos", type=int, default=400, help="training videos (val and test get a quarter each)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)

    import torch
    from synthetic import make_synthetic

    from prvr.config import TrainConfig
    from prvr.data.captions import read_captions
    from prvr.data.dataset import PRVRData
    from prvr.evaluate import evaluate, evaluate_model
    from prvr.teacher import teacher_metrics, teacher_similarity
    from prvr.train import build_model, train

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="prvr-ablation-"))
    n_eval = max(10, args.videos // 4)
    p = make_synthetic(work / "data", n_videos={"train": args.videos, "val": n_eval, "test": n_eval}, seed=args.data_seed)
    teacher_similarity(p.teacher_video, p.teacher_text, p.student_video, p.captions["train"], work / "teacher")
    teacher = teacher_metrics(p.teacher_video, p.teacher_text, p.captions["test"], work / "teacher.json")
    base = {"hidden": args.hidden, "n_heads": 4, "drop": 0.1, "input_drop": 0.1, "batch_size": 64, "lr": 1e-3,
            "n_epoch": args.epochs, "progress": False, "threads": args.threads}
    results: dict[str, list[dict]] = {}
    t0 = time.time()
    for name, over in VARIANTS.items():
        for seed in range(args.seeds):
            cfg = TrainConfig(**{**base, **over, "seed": seed})
            run = work / "runs" / f"{len(results)}_{seed}"
            train(p.as_train_paths(work / "teacher"), cfg, run)
            m = evaluate(run, p.student_video, p.student_text, p.captions["test"], run / "test.json", device="cpu")
            results.setdefault(name, []).append(m)
            print(f"{name} seed {seed}: test SumR {m['SumR']:.1f} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    test = PRVRData.load(read_captions(p.captions["test"]), p.student_video, p.student_text)
    untrained = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = build_model(TrainConfig(**{**base, "seed": seed}), test.video_dim, test.query_dim)
        untrained.append(evaluate_model(model, test, "cpu")["fused"])

    def row(name, ms):
        cells = [f"{statistics.mean(m[k] for m in ms):.1f}" for k in KEYS]
        sd = statistics.stdev(m["SumR"] for m in ms) if len(ms) > 1 else 0.0
        return f"| {name} | " + " | ".join(cells) + f" | {sd:.1f} |"

    n_test = len(read_captions(p.captions["test"]))
    lines = [
        (f"Synthetic planted set: {args.videos} train / {n_eval} val / {n_eval} test videos ({n_test} test queries), "
        f"hidden {args.hidden}, {args.epochs} epochs, batch 64, lr 1e-3; mean of {args.seeds} training seeds "
        f"(test metrics of the best-val checkpoint)."),
        "",
        "| variant | R@1 | R@5 | R@10 | R@100 | SumR | SumR sd |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [row(name, ms) for name, ms in results.items()]
    lines.append(row("CLIP-like teacher alone", [teacher]))
    lines.append(row("untrained student", untrained))
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
