"""Text-to-video evaluation of a trained DL-DKD++ student (method spec §1.2-1.3, §5.6).

The gallery is the split's unique video ids in order of first appearance. Videos are
encoded once (rows capped at ``max_ctx_l`` by uniform sampling, L2-normalised; no teacher),
queries once; the score of a (query, video) pair is per branch the max over the video's
frames of the cosine, fused as 0.7·inheritance + 0.3·exploration. Scores are formed in
(query chunk × video chunk × frames) blocks, so memory stays bounded (TVR: 10,895 × 2,179).
Recalls come from :mod:`prvr.metrics`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prvr.atomic import write_json, write_text
from prvr.config import resolve_device
from prvr.data.captions import Caption, read_captions
from prvr.data.dataset import PRVRData
from prvr.store import FeatureStore

log = logging.getLogger(__name__)

METRIC_KEYS = ("R@1", "R@5", "R@10", "R@100", "SumR", "medr", "meanr", "mAP")
BRANCH_WEIGHTS = ("inheritance", "exploration")
PAD_PENALTY = -1e4  # score of a padded frame (real frames score a cosine in [-1, 1])


@torch.no_grad()
def encode_split(
    model: torch.nn.Module,
    data: PRVRData,
    device: str | torch.device,
    video_batch: int = 256,
    query_batch: int = 1024,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Encode a split's gallery and queries with every branch (eval mode, no grad).

    Returns:
        (q {branch: (Nq, H) L2-normalised}, v {branch: (Nv, L, H) L2-normalised frames,
        zero beyond each video's length}, vmask (Nv, L) bool), on ``device``; L = the
        split's longest video (<= max_ctx_l).
    """
    was_training = model.training
    model.eval()
    try:
        length = int(data.videos.lengths.max())
        vmask = torch.zeros((data.n_videos, length), dtype=torch.bool, device=device)
        v_out: dict[str, torch.Tensor] = {}
        for idx, frames, mask in data.video_batches(video_batch, device=device):
            enc = model.encode_video(frames, mask)
            sl = slice(int(idx[0]), int(idx[-1]) + 1)
            w = frames.shape[1]
            vmask[sl, :w] = mask.bool()
            for b, f in enc.items():
                if b not in v_out:
                    v_out[b] = torch.zeros((data.n_videos, length, f.shape[-1]), dtype=torch.float32, device=device)
                v_out[b][sl, :w] = F.normalize(f.float(), dim=-1) * mask[..., None]
        q_out: dict[str, list[torch.Tensor]] = {}
        for _, tokens, mask in data.query_batches(query_batch, device=device):
            enc = model.encode_query(tokens, mask)
            for b, q in enc.items():
                q_out.setdefault(b, []).append(F.normalize(q.float(), dim=-1))
        return {b: torch.cat(x) for b, x in q_out.items()}, v_out, vmask
    finally:
        model.train(was_training)


def fusion_weights(branches: Sequence[str], fusion: Sequence[float] = (0.7, 0.3)) -> dict[str, float]:
    """Weights of the fused score: (inheritance, exploration) = ``fusion``; a single branch gets 1."""
    branches = list(branches)
    if len(branches) == 1:
        return {branches[0]: 1.0}
    return dict(zip(BRANCH_WEIGHTS, (float(x) for x in fusion)))


@torch.no_grad()
def score_ranks(
    q: dict[str, torch.Tensor],
    v: dict[str, torch.Tensor],
    vmask: torch.Tensor,
    gt: torch.Tensor,
    fusion: Sequence[float] = (0.7, 0.3),
    query_chunk: int = 2048,
    video_chunk: int = 512,
    max_elements: int = 2**26,
) -> dict[str, torch.Tensor]:
    """Ranks (1-based) of every query's ground-truth video, fused and per branch.

    Args:
        q: {branch: (Nq, H)} normalised queries; v: {branch: (Nv, L, H)} normalised frames.
        vmask: (Nv, L) bool; gt: (Nq,) ground-truth video index.
        fusion: (inheritance, exploration) weights.
        query_chunk, video_chunk: block sizes; the (q, v, L) block also stays under ``max_elements``.

    Returns:
        {"fused": (Nq,) ranks, branch: (Nq,) ranks, ...} (numpy int64; pessimistic ties, see prvr.metrics).
    """
    from prvr.metrics import ranks_from_scores

    branches = [b for b in BRANCH_WEIGHTS if b in q]
    weights = fusion_weights(branches, fusion)
    n_q, (n_v, length) = next(iter(q.values())).shape[0], vmask.shape
    # One extra coordinate puts a -1e4 penalty on padded frames inside the product itself
    # (cosines lie in [-1, 1]), so no masked copy of the (q, v, L) block is needed.
    penalty = torch.where(vmask, 0.0, PAD_PENALTY).to(next(iter(v.values())).dtype)[..., None]
    q = {b: torch.cat([x, torch.ones_like(x[:, :1])], dim=1) for b, x in q.items()}
    v = {b: torch.cat([x, penalty], dim=2) for b, x in v.items()}
    out: dict[str, list[np.ndarray]] = {k: [] for k in ["fused", *branches]}
    for qa in range(0, n_q, query_chunk):
        qs = slice(qa, min(qa + query_chunk, n_q))
        nq_c = qs.stop - qs.start
        vstep = max(1, min(video_chunk, max_elements // max(1, nq_c * length)))
        per: dict[str, torch.Tensor] = {}
        for b in branches:
            cols = []
            for va in range(0, n_v, vstep):
                vs = slice(va, min(va + vstep, n_v))
                cols.append(torch.einsum("qh,vlh->qvl", q[b][qs], v[b][vs]).amax(dim=-1))
            per[b] = torch.cat(cols, dim=1)
        fused = sum(weights[b] * per[b] for b in branches)
        g = gt[qs].to(fused.device)
        out["fused"].append(ranks_from_scores(fused, g))
        if len(branches) > 1:
            for b in branches:
                out[b].append(ranks_from_scores(per[b], g))
        else:
            out[branches[0]].append(out["fused"][-1])
    return {k: np.concatenate(x) for k, x in out.items()}


def evaluate_model(
    model: torch.nn.Module,
    data: PRVRData,
    device: str | torch.device,
    fusion: Sequence[float] = (0.7, 0.3),
    query_chunk: int = 2048,
    video_chunk: int = 512,
) -> dict[str, dict[str, float]]:
    """Metrics of ``model`` on a loaded split: {"fused": {...}, branch: {...}} (R@K, SumR, medr, meanr, mAP)."""
    from prvr.metrics import recall_metrics

    q, v, vmask = encode_split(model, data, device)
    gt = torch.from_numpy(data.query_video)
    ranks = score_ranks(q, v, vmask, gt, fusion, query_chunk, video_chunk)
    return {k: {m: float(x) for m, x in recall_metrics(r).items()} for k, r in ranks.items()}


def load_trained(train_dir: str | os.PathLike, device: str = "cpu"):
    """Rebuild the student from ``model.json`` and load ``best.safetensors``. Returns (model, model_json)."""
    from safetensors.torch import load_file

    from prvr.model import DLDKDStudent

    train_dir = Path(train_dir)
    meta_path = train_dir / "model.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} does not exist (train first)")
    meta = json.loads(meta_path.read_text())
    arch = meta["architecture"]
    model = DLDKDStudent(**{**arch, "branches": tuple(arch["branches"])})
    weights = train_dir / meta.get("weights", "best.safetensors")
    state = load_file(str(weights), device="cpu")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta


def _random_weight_stores(*paths) -> bool:
    flag = False
    for p in paths:
        try:
            attrs = FeatureStore.open(p).attrs
        except Exception as exc:  # noqa: BLE001 (only a report flag)
            log.debug("no random-weights flag from %s: %s", p, exc)
            continue
        flag |= bool(attrs.get("random_weights"))
    return flag


def markdown_table(
    metrics: dict, expected: dict | None = None, teacher: dict | None = None, title: str = "Text-to-video retrieval"
) -> str:
    """Markdown table: ours fused, each branch, the teacher alone and the expected (paper) numbers."""
    from prvr.report import metrics_table

    rows = [("prvr DL-DKD++ (fused)", metrics)]
    for b, bm in (metrics.get("branches") or {}).items():
        rows.append((f"prvr {b} branch", bm))
    if teacher:
        rows.append(("CLIP teacher alone", teacher))
    if expected:
        rows.append(("paper (expected)", expected))
    lines = [f"# {title}", "", f"{metrics.get('n_queries', '?')} queries, {metrics.get('n_videos', '?')} videos.", ""]
    lines.append(metrics_table(rows))
    if metrics.get("random_weights"):
        lines += ["", "**Features came from RANDOM-WEIGHT models: the numbers only show that the pipeline works.**"]
    return "\n".join(lines) + "\n"


def evaluate(
    train_dir: str | os.PathLike,
    student_video: str | os.PathLike,
    student_text: str | os.PathLike,
    captions: str | os.PathLike | Sequence[Caption],
    out_json: str | os.PathLike,
    out_md: str | os.PathLike | None = None,
    device: str = "auto",
    expected: dict | None = None,
    teacher_json: str | os.PathLike | None = None,
    skip_missing: bool = False,
    query_chunk: int | None = None,
    video_chunk: int | None = None,
    threads: int = 0,
) -> dict:
    """Evaluate the best checkpoint of a training run on one split.

    Args:
        train_dir: folder with ``model.json`` and ``best.safetensors`` (from :func:`prvr.train.train`).
        student_video, student_text: feature stores.
        captions: the split's caption file (or captions).
        out_json: metrics JSON: top-level R@1, R@5, R@10, R@100, SumR, medr, meanr, mAP of the
            fused score, ``branches`` {branch: metrics}, counts and provenance.
        out_md: optional markdown table (ours fused, branches, teacher alone, expected).
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        expected: reported metrics to print beside ours.
        teacher_json: metrics of the teacher alone (:func:`prvr.teacher.teacher_metrics`).
        skip_missing: drop captions whose features are missing (warning) instead of failing.
        query_chunk, video_chunk: scoring block sizes (default: the run's config).
        threads: torch CPU threads (0: leave the default).

    Returns:
        The metrics dict written to ``out_json``.
    """
    t0 = time.time()
    if threads > 0:
        torch.set_num_threads(threads)
    device = resolve_device(device)
    model, meta = load_trained(train_dir, device)
    arch = meta["architecture"]
    cfg = meta.get("train_config", {})
    caps = read_captions(captions) if isinstance(captions, (str, os.PathLike)) else list(captions)
    data = PRVRData.load(
        caps, student_video, student_text, max_ctx_l=arch["max_ctx_l"], max_desc_l=arch["max_desc_l"],
        skip_missing=skip_missing, memory_budget_gb=cfg.get("memory_budget_gb", 8.0), split=str(captions),
    )  # fmt: skip
    if data.video_dim != arch["video_dim"] or data.query_dim != arch["query_dim"]:
        raise ValueError(
            f"features ({data.video_dim}-d video, {data.query_dim}-d text) do not match the trained model "
            f"({arch['video_dim']}-d, {arch['query_dim']}-d) of {train_dir}"
        )
    fusion = meta.get("fusion", [0.7, 0.3])
    res = evaluate_model(
        model, data, device, fusion,
        query_chunk or cfg.get("eval_query_chunk", 2048), video_chunk or cfg.get("eval_video_chunk", 512),
    )  # fmt: skip
    out = dict(res["fused"])
    out["branches"] = {b: m for b, m in res.items() if b != "fused"}
    out.update(
        {
            "n_queries": data.n_queries,
            "n_videos": data.n_videos,
            "fusion": dict(zip(BRANCH_WEIGHTS, fusion)) if len(arch["branches"]) == 2 else {arch["branches"][0]: 1.0},
            "best_epoch": meta.get("best_epoch"),
            "val_SumR": meta.get("val_SumR"),
            "train_dir": str(train_dir),
            "captions": str(captions) if isinstance(captions, (str, os.PathLike)) else None,
            "seconds": round(time.time() - t0, 3),
        }
    )
    if _random_weight_stores(student_video, student_text):
        out["random_weights"] = True
    data.close()
    write_json(out_json, out)
    if out_md is not None:
        teacher = json.loads(Path(teacher_json).read_text()) if teacher_json and Path(teacher_json).exists() else None
        write_text(out_md, markdown_table(out, expected, teacher))
    log.info("evaluate %s: SumR %.1f (%s) in %.1f s", train_dir, out["SumR"],
             ", ".join(f"{b} {m['SumR']:.1f}" for b, m in out["branches"].items()), time.time() - t0)  # fmt: skip
    return out

