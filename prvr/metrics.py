"""Text-to-video retrieval metrics (method spec §1.2): ranks, R@K, SumR, medr, meanr, mAP.

Tie rule (differs from the reference on purpose): a query's rank is **pessimistic**,

    rank = 1 + #{videos scoring > gt} + #{other videos scoring == gt} = #{videos scoring >= gt}.

The reference sorts each score row with ``numpy.argsort`` (not stable) and takes the
position of the ground-truth video, so ties are broken by the sort's internal order. With
many ties that order can favour the ground truth: a collapsed model that scores every video
the same would get ranks that depend only on where the gt sits in the gallery (for small
rows numpy's introsort behaves like a stable sort, so gt index 0 → rank 1), i.e. non-zero
recall for a model that learnt nothing. The pessimistic rule gives that model rank N_video
for every query. For scores without ties both rules agree. NaN scores rank below every
number (treated as -inf), so a NaN score can never look good either.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

RECALL_KS = (1, 5, 10, 100)


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _clean(scores: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(scores, nan=-torch.inf) if scores.is_floating_point() else scores


def _check_gt(gt, n_queries: int, n_videos: int) -> torch.Tensor:
    gt = _as_tensor(gt).long().reshape(-1).cpu()
    if gt.numel() != n_queries:
        raise ValueError(f"gt: expected {n_queries} ground-truth video indices, got {gt.numel()}")
    if n_queries and (gt.min() < 0 or gt.max() >= n_videos):
        raise ValueError(f"gt: indices must lie in [0, {n_videos}), got [{gt.min()}, {gt.max()}]")
    return gt


def ranks_from_scores(scores, gt) -> np.ndarray:
    """1-based pessimistic rank of each query's ground-truth video.

    Args:
        scores: (Nq, Nv) tensor or array, higher = more relevant.
        gt: (Nq,) ground-truth video index of each query.

    Returns:
        (Nq,) int64 array of ranks in [1, Nv].
    """
    s = _clean(_as_tensor(scores))
    if s.dim() != 2:
        raise ValueError(f"scores: expected a (Nq, Nv) matrix, got shape {tuple(s.shape)}")
    gt = _check_gt(gt, s.shape[0], s.shape[1]).to(s.device)
    gt_score = s.gather(1, gt[:, None])
    return (s >= gt_score).sum(dim=1).cpu().numpy().astype(np.int64)


def chunked_ranks(score_block: Callable[[slice, slice], torch.Tensor], n_queries: int, n_videos: int, gt,
                  query_chunk: int = 2048, video_chunk: int = 512) -> np.ndarray:
    """:func:`ranks_from_scores` without ever building the (Nq, Nv) matrix.

    Each (query chunk, video chunk) block is computed exactly once. For every query chunk
    the blocks holding its queries' ground-truth videos are computed first and kept until
    the gt scores are known (with queries grouped by video, as in the caption files, that is
    one or two blocks); every other block is counted and dropped at once. Peak memory is
    therefore (query_chunk × video_chunk) × the number of distinct gt chunks of a query
    chunk, at most query_chunk × Nv.

    Args:
        score_block: f(query_slice, video_slice) → (len(q), len(v)) scores (any device).
        n_queries, n_videos: the full matrix size.
        gt: (Nq,) ground-truth video index of each query.
        query_chunk, video_chunk: block size.

    Returns:
        (Nq,) int64 array, equal to ``ranks_from_scores`` on the full matrix.
    """
    if query_chunk < 1 or video_chunk < 1:
        raise ValueError(f"chunk sizes must be >= 1, got {query_chunk}, {video_chunk}")
    gt = _check_gt(gt, n_queries, n_videos)
    ranks = np.empty(n_queries, dtype=np.int64)
    n_vchunks = -(-n_videos // video_chunk)

    def block(qs: slice, c: int) -> torch.Tensor:
        vs = slice(c * video_chunk, min((c + 1) * video_chunk, n_videos))
        b = _clean(_as_tensor(score_block(qs, vs)))
        expected = (qs.stop - qs.start, vs.stop - vs.start)
        if tuple(b.shape) != expected:
            raise ValueError(f"score_block({qs}, {vs}) returned shape {tuple(b.shape)}, expected {expected}")
        return b

    for q0 in range(0, n_queries, query_chunk):
        qs = slice(q0, min(q0 + query_chunk, n_queries))
        g = gt[qs]
        g_chunk = g // video_chunk
        needed = torch.unique(g_chunk).tolist()
        held = {c: block(qs, c) for c in needed}
        first = held[needed[0]]
        gt_score = torch.empty(len(g), dtype=first.dtype, device=first.device)
        for c, b in held.items():
            rows = (g_chunk == c).nonzero().squeeze(1)
            cols = g[rows] - c * video_chunk
            gt_score[rows.to(b.device)] = b[rows.to(b.device), cols.to(b.device)]
        counts = torch.zeros(len(g), dtype=torch.long, device=first.device)
        for b in held.values():
            counts += (b >= gt_score[:, None]).sum(dim=1)
        del held
        for c in range(n_vchunks):
            if c not in needed:
                counts += (block(qs, c) >= gt_score[:, None]).sum(dim=1)
        ranks[qs] = counts.cpu().numpy()
    return ranks


def recall_metrics(ranks) -> dict[str, float]:
    """Summary metrics of 1-based ranks (§1.2), unrounded.

    Returns:
        {"R@1", "R@5", "R@10", "R@100"}: % of queries with rank <= K;
        "SumR": sum of those four (unrounded); "medr", "meanr": median and mean rank;
        "mAP": mean of 1/rank (AP with one relevant video), in % like the recalls.
    """
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)
    if r.size == 0:
        raise ValueError("recall_metrics: no ranks")
    if (r < 1).any() or not np.isfinite(r).all():
        raise ValueError("recall_metrics: ranks must be finite and >= 1 (1-based)")
    out = {f"R@{k}": float(100.0 * np.mean(r <= k)) for k in RECALL_KS}
    out["SumR"] = float(sum(out[f"R@{k}"] for k in RECALL_KS))
    out["medr"] = float(np.median(r))
    out["meanr"] = float(r.mean())
    out["mAP"] = float(100.0 * np.mean(1.0 / r))
    return out
