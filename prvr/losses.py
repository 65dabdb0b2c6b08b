"""DL-DKD++ losses and schedules (method spec §3.2, §4.5, §5.3-§5.5, §11.5-§11.6).

Pure functions of tensors; only torch is imported. Notation: ``Nq`` queries, ``B`` videos,
``L`` padded frames, ``H`` hidden size; ``labels[i]`` is the index (0..B-1) of query i's
video in the batch. Everything is vectorised: there are no Python loops over queries or
videos (the reference loops in Python for the video→text triplet and NCE terms).

Edge cases the reference does not handle (it crashes or returns NaN) and what we do:

* B = 1: the text→video triplet has no negative video and the video→text triplet no
  negative query; both are defined as 0 (keeping the graph so ``backward`` works).
* A video of the batch without any query (never produced by the training collation):
  its video→text triplet and video→text InfoNCE terms are 0 and it still counts in the
  mean over the B videos (the reference NCE behaves so; its triplet would give NaN).
* A single query, a one-token query: nothing is squeezed, shapes stay (Nq, ...).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

BRANCHES = ("inheritance", "exploration")  # same as prvr.model.BRANCHES (kept torch-only here)
SHORT = {"inheritance": "inh", "exploration": "exp"}

#: Fill value of padded frames in every frame-level score (reference ``mask_logits``).
MASK_VALUE = -1e10
#: ``F.normalize``'s epsilon, used for cosines.
NORM_EPS = 1e-12
#: Added to every video→text target weight inside the log (§11.5).
SOFT_NCE_EPS = 1e-12
#: k of the KD "sigmoid" decay 800 / (800 + exp(100 e / 800)) (§4.5; a reference constant).
KD_SIGMOID_K = 800.0

DECAYS_KD = ("exp", "linear", "sigmoid", "none")
DECAYS_AB = ("exp", "linear", "cosine", "sigmoid", "none")


@dataclass
class LossParams:
    """Loss hyper-parameters; field names equal :class:`prvr.config.TrainConfig`'s."""

    margin: float = 0.2  # triplet margin m
    hard_negative_start_epoch: int = 0  # hard-negative mining from this (0-based) epoch on
    hard_pool_size: int = 20  # text→video negative drawn among this many hardest videos
    label_style: str = "soft"  # soft (DL-DKD++ soft-target NCE) | hard (plain InfoNCE, ICCV)
    nce_weight_inh: float = 0.04
    nce_weight_exp: float = 0.04
    kd: bool = True  # frame-level distillation on the inheritance branch
    kd_weight: float = 0.1  # kl_intra_weight
    kd_temperature: float = 0.2
    kd_decay: str = "exp"  # exp | linear | sigmoid | none
    kd_exp_k: float = 0.95  # base of the exponential KD decay
    alpha0: float = 0.8  # initial fraction of hard-target rows
    beta0: float = 0.8  # initial ground-truth weight inside a soft target
    alpha_decay: str = "sigmoid"  # exp | linear | cosine | sigmoid | none
    beta_decay: str = "sigmoid"
    alpha_floor: float = 0.0
    beta_floor: float = 0.5
    sigmoid_k: float = 800.0  # selfDistil_sigmoid_k of the α/β sigmoid decay
    n_epoch: int = 120  # horizon of the linear and cosine α/β decays
    detach_self_target: bool = False  # the reference does NOT detach the exploration self-target
    ab_exp_k: float = 0.95  # base of the "exp" α/β decay (not in TrainConfig; reference constant)

    def __post_init__(self):
        checks = [("label_style", ("soft", "hard")), ("kd_decay", DECAYS_KD),
                  ("alpha_decay", DECAYS_AB), ("beta_decay", DECAYS_AB)]
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"LossParams.{name}: {getattr(self, name)!r} is not one of {allowed}")
        if self.hard_pool_size < 1:
            raise ValueError(f"LossParams.hard_pool_size must be >= 1, got {self.hard_pool_size}")
        if self.kd_temperature <= 0:
            raise ValueError(f"LossParams.kd_temperature must be > 0, got {self.kd_temperature}")

    @classmethod
    def from_config(cls, cfg) -> LossParams:
        """Build from any object (or mapping) holding same-named attributes; others keep defaults."""
        get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d: getattr(cfg, k, d))
        missing = object()
        kwargs = {}
        for f in dataclasses.fields(cls):
            value = get(f.name, missing)
            if value is not missing:
                kwargs[f.name] = value
        return cls(**kwargs)


# --------------------------------------------------------------------------- helpers


def _check_labels(labels: Tensor, n_queries: int, n_videos: int) -> Tensor:
    if labels.dim() != 1 or labels.shape[0] != n_queries:
        raise ValueError(f"labels: expected shape ({n_queries},), got {tuple(labels.shape)}")
    labels = labels.long()
    if n_queries and (labels.min() < 0 or labels.max() >= n_videos):
        raise ValueError(f"labels: values must lie in [0, {n_videos}), got [{labels.min()}, {labels.max()}]")
    return labels


def _positives(labels: Tensor, n_videos: int) -> Tensor:
    """(Nq, B) bool, True at (i, labels[i])."""
    return F.one_hot(labels, n_videos).bool()


def _zero(like: Tensor) -> Tensor:
    """A 0-d zero that stays attached to ``like``'s graph (so ``backward`` works on it)."""
    return like.sum() * 0.0


def _randint(high: int, size: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    dev = generator.device if generator is not None else device
    return torch.randint(0, high, size, generator=generator, device=dev).to(device)


def _rand(size: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    dev = generator.device if generator is not None else device
    return torch.rand(size, generator=generator, device=dev).to(device)


# --------------------------------------------------------------------------- scores


def frame_scores(q: Tensor, v: Tensor, vmask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Query-frame scores of one branch (§5.3).

    Args:
        q: (Nq, H) query vectors.
        v: (B, L, H) frame features.
        vmask: (B, L), true for real frames; every video needs at least one.

    Returns:
        cos_frames (Nq, B, L): cosines, padded frames = -1e10;
        cos_max (Nq, B): max over frames of the cosines;
        raw_max (Nq, B): max over frames of the raw dot products.
        Computed in float32 (autocast disabled).
    """
    vmask = vmask.bool()
    if vmask.shape != v.shape[:2]:
        raise ValueError(f"vmask shape {tuple(vmask.shape)} does not match frames {tuple(v.shape[:2])}")
    if not vmask.any(1).all():
        raise ValueError("frame_scores: a video has no valid frame (empty mask row)")
    shape = (q.shape[0], *vmask.shape)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, frames = q.float(), v.reshape(-1, v.shape[-1]).float()  # frames (B·L, H)
        pad = ~vmask.reshape(1, -1)
        raw = (q @ frames.T).masked_fill(pad, MASK_VALUE).view(shape)
        cos = F.normalize(q, dim=-1, eps=NORM_EPS) @ F.normalize(frames, dim=-1, eps=NORM_EPS).T
        cos = cos.masked_fill(pad, MASK_VALUE).view(shape)
        return cos, cos.max(dim=-1).values, raw.max(dim=-1).values


def _cos_max(q: Tensor, v: Tensor, vmask: Tensor, max_elements: int) -> Tensor:
    """(Nq, B) max-over-frames cosine, computed in video chunks of at most ``max_elements``."""
    qn = F.normalize(q.float(), dim=-1, eps=NORM_EPS)
    n_q, (n_v, length) = q.shape[0], vmask.shape
    step = max(1, max_elements // max(1, n_q * length))
    out = []
    for s in range(0, n_v, step):
        chunk = v[s:s + step]
        frames = F.normalize(chunk.reshape(-1, chunk.shape[-1]).float(), dim=-1, eps=NORM_EPS)
        cos = (qn @ frames.T).masked_fill(~vmask[s:s + step].reshape(1, -1), MASK_VALUE)
        out.append(cos.view(n_q, chunk.shape[0], length).max(dim=-1).values)
    return torch.cat(out, dim=1)


def fused_scores(q: Mapping[str, Tensor], v: Mapping[str, Tensor], vmask: Tensor,
                 fusion: tuple[float, float] = (0.7, 0.3), max_elements: int = 2 ** 26) -> Tensor:
    """Inference scores (§1.3): Σ_b w_b · max_l cos(q_b, f_{b,v,l}).

    Args:
        q: {branch: (Nq, H)} from ``encode_query``.
        v: {branch: (B, L, H)} from ``encode_video``.
        vmask: (B, L) frame mask.
        fusion: weights of (inheritance, exploration); a single-branch model uses weight 1.
        max_elements: memory bound of the (Nq, b, L) cosine block (videos are chunked).

    Returns:
        (Nq, B) float32 scores.
    """
    branches = [b for b in BRANCHES if b in q]
    if not branches or set(q) != set(v) or set(q) - set(BRANCHES):
        raise ValueError(f"fused_scores: q/v must hold the same branches among {BRANCHES}, got {sorted(q)}/{sorted(v)}")
    vmask = vmask.bool()
    if not vmask.any(1).all():
        raise ValueError("fused_scores: a video has no valid frame (empty mask row)")
    weights = dict(zip(BRANCHES, fusion)) if len(branches) == 2 else {branches[0]: 1.0}
    with torch.autocast(device_type=vmask.device.type, enabled=False):
        return sum(weights[b] * _cos_max(q[b], v[b], vmask, max_elements) for b in branches)


# --------------------------------------------------------------------------- loss terms


def triplet_loss(scores: Tensor, labels: Tensor, margin: float, hard: bool, pool: int = 20,
                 generator: torch.Generator | None = None) -> Tensor:
    """Bidirectional triplet ranking loss on video-level scores (§3.2 clip-scale, §5.4a).

    text→video: for query i, pos = S[i, y_i]; the negative is drawn uniformly among the
    ``min(pool, B-1)`` highest-scoring non-positive videos when ``hard``, else among all
    B-1 of them; mean_i max(0, m + neg - pos).
    video→text: for video v, pos = mean of S[j, v] over its queries j; neg = max of S[j, v]
    over the other videos' queries when ``hard``, else one of them drawn uniformly;
    sum_v max(0, m + neg - pos) / B.  Returns t2v + v2t.

    Args:
        scores: (Nq, B) cosine scores.
        labels: (Nq,) positive video index of each query.
        margin: m.
        hard: hard-negative mode (epoch >= hard_negative_start_epoch).
        pool: hard-negative pool size (pool = 1: always the hardest negative).
        generator: optional torch.Generator for the negative sampling.

    Returns:
        0-d tensor.
    """
    n_q, n_v = scores.shape
    labels = _check_labels(labels, n_q, n_v)
    if pool < 1:
        raise ValueError(f"triplet_loss: pool must be >= 1, got {pool}")
    pos_mask = _positives(labels, n_v)
    if n_v < 2:
        return _zero(scores)

    # text→video: choose negative columns on detached scores, take values with gradient.
    k = min(pool, n_v - 1) if hard else n_v - 1
    candidates = scores.detach().masked_fill(pos_mask, -math.inf).topk(k, dim=1).indices  # (Nq, k)
    neg_idx = candidates.gather(1, _randint(k, (n_q, 1), generator, scores.device))  # (Nq, 1)
    t2v_pos = scores.gather(1, labels[:, None])
    t2v = (margin + scores.gather(1, neg_idx) - t2v_pos).clamp(min=0).mean()

    # video→text
    n_pos = pos_mask.sum(0)  # (B,)
    v2t_pos = torch.where(pos_mask, scores, 0.0).sum(0) / n_pos.clamp(min=1)
    if hard:
        v2t_neg = scores.masked_fill(pos_mask, -math.inf).max(dim=0).values
    else:
        keys = _rand((n_q, n_v), generator, scores.device).masked_fill(pos_mask, -1.0)
        v2t_neg = scores.gather(0, keys.argmax(dim=0, keepdim=True)).squeeze(0)
    valid = (n_pos > 0) & (n_pos < n_q)  # has a positive and a negative query
    per_video = (margin + v2t_neg - v2t_pos).clamp(min=0)
    v2t = torch.where(valid, per_video, 0.0).sum() / n_v
    return t2v + v2t


def _v2t_positive_lse(logits: Tensor, pos_mask: Tensor) -> Tensor:
    """(B,) log Σ_{i: y_i = v} exp Z[i, v]; columns without a query get the full LSE (term 0)."""
    keep = pos_mask | ~pos_mask.any(0, keepdim=True)
    return logits.masked_fill(~keep, -math.inf).logsumexp(dim=0)


def nce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Multi-positive InfoNCE on raw scores, temperature 1 (§3.2; label_style ``hard``).

    t2v = mean_i [LSE_v Z[i, v] - Z[i, y_i]];
    v2t = mean_v [LSE_i Z[i, v] - log Σ_{i: y_i = v} exp Z[i, v]] (0 for a video without queries).

    Args:
        logits: (Nq, B) raw max dot products Ŝ.
        labels: (Nq,).

    Returns:
        0-d tensor t2v + v2t.
    """
    n_q, n_v = logits.shape
    labels = _check_labels(labels, n_q, n_v)
    pos_mask = _positives(labels, n_v)
    t2v = (logits.logsumexp(dim=1) - logits.gather(1, labels[:, None]).squeeze(1)).mean()
    v2t = (logits.logsumexp(dim=0) - _v2t_positive_lse(logits, pos_mask)).mean()
    return t2v + v2t


def soft_nce_loss(logits: Tensor, labels: Tensor, source: Tensor, alpha: float, beta: float) -> Tensor:
    """DL-DKD++ soft-target contrastive loss (§5.4c with §11.5, §11.6).

    Rows 0..⌊α·Nq⌋-1 (queries) and columns 0..⌊α·B⌋-1 (videos) keep hard targets, cut
    independently; the others get soft targets mixing the ground truth (weight β) with the
    softmax of ``source`` (over videos for a query row, over queries for a video column):

        Y^Q[i] = β·Y[i] + (1-β)·softmax_v(Src[i, :])         (soft query rows)
        Y^V[v] = β·Y[:, v] + (1-β)·softmax_i(Src[:, v])      (soft video columns)
        t2v_i = Σ_v Y^Q[i, v]·(LSE_u Z[i, u] - Z[i, v])
        v2t_v = LSE_i Z[i, v] - log Σ_i (Y^V[v, i] + 1e-12)·exp Z[i, v]

    L_hard = mean of hard t2v rows + mean of hard v2t columns (only if both counts > 0),
    L_soft likewise over the soft ones; returns α·L_hard + (1-α)·L_soft.

    Args:
        logits: (Nq, B) raw max dot products Ŝ (temperature 1).
        labels: (Nq,).
        source: (Nq, B) similarity source of the soft targets (teacher T̂ for the
            inheritance branch; the branch's own Ŝ for exploration). Gradient flows through
            it if it has one (the reference does not detach the self-target).
        alpha: fraction of hard rows/columns, and weight of L_hard.
        beta: ground-truth weight inside a soft target.

    Returns:
        0-d tensor.
    """
    n_q, n_v = logits.shape
    labels = _check_labels(labels, n_q, n_v)
    if source.shape != logits.shape:
        raise ValueError(f"soft_nce_loss: source shape {tuple(source.shape)} != logits shape {tuple(logits.shape)}")
    y = _positives(labels, n_v).to(logits.dtype)
    h_q, h_v = math.floor(alpha * n_q), math.floor(alpha * n_v)
    hard_rows = (torch.arange(n_q, device=logits.device) < h_q)[:, None]
    hard_cols = (torch.arange(n_v, device=logits.device) < h_v)[None, :]
    source = source.to(logits.dtype)

    y_q = torch.where(hard_rows, y, beta * y + (1 - beta) * source.softmax(dim=1))
    t2v = (y_q * (logits.logsumexp(dim=1, keepdim=True) - logits)).sum(dim=1)  # (Nq,)
    y_v = torch.where(hard_cols, y, beta * y + (1 - beta) * source.softmax(dim=0))  # (Nq, B), column v = Y^V[v]
    v2t = logits.logsumexp(dim=0) - (logits + torch.log(y_v + SOFT_NCE_EPS)).logsumexp(dim=0)  # (B,)

    loss = _zero(logits)
    if h_q > 0 and h_v > 0:
        loss = loss + alpha * (t2v[:h_q].mean() + v2t[:h_v].mean())
    if h_q < n_q and h_v < n_v:
        loss = loss + (1 - alpha) * (t2v[h_q:].mean() + v2t[h_v:].mean())
    return loss


def kd_loss(teacher_cos: Tensor, student_cos: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """Frame-level distillation (§4.5, §5.4b): Σ_i KL(P_T,i ‖ P_S,i).

    P = softmax over the valid frames of (cosines / τ), for each query on its positive
    video; summed over frames and over queries (no averaging). The teacher is detached.

    Args:
        teacher_cos: (Nq, L) teacher cosines (padded entries arbitrary, even NaN).
        student_cos: (Nq, L) student cosines (padded entries arbitrary).
        mask: (Nq, L) valid frames of each query's positive video (>= 1 per row).
        temperature: τ.

    Returns:
        0-d tensor.
    """
    if teacher_cos.shape != student_cos.shape or tuple(mask.shape) != tuple(student_cos.shape):
        raise ValueError(f"kd_loss: shapes differ: teacher {tuple(teacher_cos.shape)}, "
                         f"student {tuple(student_cos.shape)}, mask {tuple(mask.shape)}")
    pad = ~mask.bool()
    log_pt = (teacher_cos.detach().float().masked_fill(pad, MASK_VALUE) / temperature).log_softmax(dim=-1)
    log_ps = (student_cos.float().masked_fill(pad, MASK_VALUE) / temperature).log_softmax(dim=-1)
    return torch.where(pad, 0.0, log_pt.exp() * (log_pt - log_ps)).sum()


# --------------------------------------------------------------------------- schedules


def kd_weight(epoch: int, p: LossParams) -> float:
    """KD weight at a 0-based epoch: kd_weight × decay(epoch); 0 when ``p.kd`` is off.

    exp: k^e; linear: max(1 - 0.01e, 0.05); sigmoid: 800 / (800 + exp(100e/800)); none: 1.
    """
    if not p.kd:
        return 0.0
    if p.kd_decay == "exp":
        decay = p.kd_exp_k ** epoch
    elif p.kd_decay == "linear":
        decay = max(1.0 - 0.01 * epoch, 0.05)
    elif p.kd_decay == "sigmoid":
        decay = KD_SIGMOID_K / (KD_SIGMOID_K + math.exp(100.0 * epoch / KD_SIGMOID_K))
    else:
        decay = 1.0
    return p.kd_weight * decay


def _decayed(x0: float, floor: float, how: str, epoch: int, p: LossParams) -> float:
    if how == "exp":
        x = x0 * p.ab_exp_k ** epoch
    elif how == "linear":
        x = x0 + (floor - x0) * epoch / p.n_epoch
    elif how == "cosine":
        x = floor + 0.5 * (x0 - floor) * (1 + math.cos(math.pi * epoch / p.n_epoch))
    elif how == "sigmoid":
        k = p.sigmoid_k
        x = x0 * k / (k + math.exp(100.0 * epoch / k))
    else:
        x = x0
    return max(x, floor)


def alpha_beta(epoch: int, p: LossParams) -> tuple[float, float]:
    """(α(e), β(e)) of the soft-target NCE (§5.4c; alternatives of §7.2), each clamped at its floor.

    With the defaults: α(0) = β(0) = 0.7990, α(50) = 0.4856, β(50) = 0.5.
    """
    return (_decayed(p.alpha0, p.alpha_floor, p.alpha_decay, epoch, p),
            _decayed(p.beta0, p.beta_floor, p.beta_decay, epoch, p))


# --------------------------------------------------------------------------- total


def dldkdpp_loss(q: Mapping[str, Tensor], v: Mapping[str, Tensor], vmask: Tensor, labels: Tensor,
                 teacher_raw: Tensor | None, teacher_pos_cos: Tensor | None, epoch: int,
                 p: LossParams, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The DL-DKD++ batch loss (§5.5), every term returned separately.

    L = trip_inh + w_inh·nce_inh + kd_w(e)·kd + trip_exp + w_exp·nce_exp, where the NCE terms
    are the soft-target NCE (label_style "soft"; source T̂ for inheritance, the exploration
    branch's own Ŝ for exploration) or the plain InfoNCE (label_style "hard").

    Args:
        q: {branch: (Nq, H)} from ``encode_query`` (one or both branches).
        v: {branch: (B, L, H)} from ``encode_video`` (the same branches).
        vmask: (B, L) frame mask.
        labels: (Nq,) video index in the batch of each query.
        teacher_raw: (Nq, B) teacher raw max scores T̂; needed by the soft NCE of inheritance.
        teacher_pos_cos: (Nq, L) teacher frame cosines of each query on its positive video
            (padded frames arbitrary); needed by KD.
        epoch: 0-based epoch.
        p: loss hyper-parameters.
        generator: optional generator for the triplet negative sampling.

    Returns:
        {"trip_inh", "nce_inh", "kd", "trip_exp", "nce_exp"} for the present branches
        ("kd" is 0 when ``p.kd`` is off), "loss" (the total), and 0-d float tensors
        "alpha", "beta", "kd_w".
    """
    branches = [b for b in BRANCHES if b in q]
    if not branches or set(q) != set(v) or set(q) - set(BRANCHES):
        raise ValueError(f"dldkdpp_loss: q/v must hold the same branches among {BRANCHES}, got {sorted(q)}/{sorted(v)}")
    first = q[branches[0]]
    n_q, (n_v, length) = first.shape[0], vmask.shape
    labels = _check_labels(labels.to(first.device), n_q, n_v)
    vmask = vmask.bool()
    hard = epoch >= p.hard_negative_start_epoch
    alpha, beta = alpha_beta(epoch, p)
    kd_w = kd_weight(epoch, p)

    out: dict[str, Tensor] = {}
    total = None
    for b in branches:
        s = SHORT[b]
        cos_frames, cos_max, raw_max = frame_scores(q[b], v[b], vmask)
        out[f"trip_{s}"] = triplet_loss(cos_max, labels, p.margin, hard, p.hard_pool_size, generator)
        if p.label_style == "hard":
            out[f"nce_{s}"] = nce_loss(raw_max, labels)
        else:
            if b == "inheritance":
                if teacher_raw is None:
                    raise ValueError("dldkdpp_loss: label_style 'soft' needs teacher_raw (Nq, B) "
                                     "for the inheritance branch")
                if teacher_raw.shape != (n_q, n_v):
                    raise ValueError(f"dldkdpp_loss: teacher_raw must be ({n_q}, {n_v}), "
                                     f"got {tuple(teacher_raw.shape)}")
                source = teacher_raw.detach().to(raw_max)
            else:
                source = raw_max.detach() if p.detach_self_target else raw_max
            out[f"nce_{s}"] = soft_nce_loss(raw_max, labels, source, alpha, beta)
        nce_w = p.nce_weight_inh if b == "inheritance" else p.nce_weight_exp
        term = out[f"trip_{s}"] + nce_w * out[f"nce_{s}"]
        if b == "inheritance":
            if p.kd:
                if teacher_pos_cos is None:
                    raise ValueError("dldkdpp_loss: kd=True needs teacher_pos_cos (Nq, L) for the inheritance branch")
                if teacher_pos_cos.shape != (n_q, length):
                    raise ValueError(f"dldkdpp_loss: teacher_pos_cos must be ({n_q}, {length}), "
                                     f"got {tuple(teacher_pos_cos.shape)}")
                student_pos = cos_frames[torch.arange(n_q, device=labels.device), labels]  # (Nq, L)
                teacher_pos = teacher_pos_cos.to(student_pos.device)
                out["kd"] = kd_loss(teacher_pos, student_pos, vmask[labels], p.kd_temperature)
            else:
                out["kd"] = _zero(cos_max)
            term = term + kd_w * out["kd"]
        total = term if total is None else total + term
    out = {k: out[k] for k in ("trip_inh", "nce_inh", "kd", "trip_exp", "nce_exp") if k in out}
    out["loss"] = total
    for name, value in (("alpha", alpha), ("beta", beta), ("kd_w", kd_w)):
        out[name] = torch.tensor(value, dtype=torch.float32)
    return out
