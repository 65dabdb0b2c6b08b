"""DL-DKD++ losses (method spec §3.2, §4.5, §5.3-§5.5, §11.5-§11.6) against plain numpy/python."""

import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from prvr.config import TrainConfig
from prvr.losses import (
    LossParams,
    alpha_beta,
    dldkdpp_loss,
    frame_scores,
    fused_scores,
    kd_loss,
    kd_weight,
    nce_loss,
    soft_nce_loss,
    triplet_loss,
)

torch.set_num_threads(2)


# ----------------------------------------------------------------- independent references


def np_lse(x):
    m = max(x)
    return m + math.log(sum(math.exp(a - m) for a in x))


def np_softmax(x):
    m = max(x)
    e = [math.exp(a - m) for a in x]
    return [a / sum(e) for a in e]


def np_frame_scores(q, v, vmask):
    nq, (nv, length) = len(q), vmask.shape
    cos = np.full((nq, nv, length), -1e10)
    raw = np.full((nq, nv, length), -1e10)
    for i in range(nq):
        for b in range(nv):
            for t in range(length):
                if vmask[b, t]:
                    raw[i, b, t] = q[i] @ v[b, t]
                    cos[i, b, t] = raw[i, b, t] / (np.linalg.norm(q[i]) * np.linalg.norm(v[b, t]))
    return cos, cos.max(-1), raw.max(-1)


def np_triplet_hardest(S, y, m):
    """Triplet with the hardest negative on both sides (= hard mode with pool 1)."""
    nq, nv = S.shape
    t2v = np.mean([max(0.0, m + max(S[i, u] for u in range(nv) if u != y[i]) - S[i, y[i]]) for i in range(nq)])
    v2t = 0.0
    for u in range(nv):
        pos = [S[i, u] for i in range(nq) if y[i] == u]
        neg = [S[i, u] for i in range(nq) if y[i] != u]
        if pos and neg:
            v2t += max(0.0, m + max(neg) - np.mean(pos))
    return t2v + v2t / nv


def np_nce(Z, y):
    nq, nv = Z.shape
    t2v = np.mean([np_lse(Z[i]) - Z[i, y[i]] for i in range(nq)])
    v2t = 0.0
    for u in range(nv):
        pos = [Z[i, u] for i in range(nq) if y[i] == u]
        if pos:
            v2t += np_lse(Z[:, u]) - np_lse(pos)
    return t2v + v2t / nv


def np_soft_nce(Z, y, src, alpha, beta):
    """§5.4c with §11.5 (1e-12 on every weight inside the log) and §11.6 (independent cuts)."""
    nq, nv = Z.shape
    hq, hv = int(alpha * nq), int(alpha * nv)
    t2v = []
    for i in range(nq):
        gt = [1.0 if y[i] == u else 0.0 for u in range(nv)]
        if i < hq:
            w = gt
        else:
            p = np_softmax(list(src[i]))
            w = [beta * g + (1 - beta) * pp for g, pp in zip(gt, p)]
        t2v.append(sum(w[u] * (np_lse(Z[i]) - Z[i, u]) for u in range(nv)))
    v2t = []
    for u in range(nv):
        gt = [1.0 if y[i] == u else 0.0 for i in range(nq)]
        if u < hv:
            w = gt
        else:
            p = np_softmax(list(src[:, u]))
            w = [beta * g + (1 - beta) * pp for g, pp in zip(gt, p)]
        v2t.append(np_lse(Z[:, u]) - math.log(sum((w[i] + 1e-12) * math.exp(Z[i, u]) for i in range(nq))))
    loss = 0.0
    if hq > 0 and hv > 0:
        loss += alpha * (np.mean(t2v[:hq]) + np.mean(v2t[:hv]))
    if hq < nq and hv < nv:
        loss += (1 - alpha) * (np.mean(t2v[hq:]) + np.mean(v2t[hv:]))
    return loss


def np_kd(t, s, mask, tau):
    total = 0.0
    for i in range(len(t)):
        idx = [j for j in range(len(t[i])) if mask[i][j]]
        pt = np_softmax([t[i][j] / tau for j in idx])
        ps = np_softmax([s[i][j] / tau for j in idx])
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return total


# ----------------------------------------------------------------- fixtures


def batch(seed=0, nq=9, nv=4, length=5, h=6, labels=None):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(labels if labels is not None else [0, 0, 0, 1, 1, 2, 2, 3, 3][:nq])
    lens = torch.randint(1, length + 1, (nv,), generator=g)
    lens[0] = length
    vmask = torch.arange(length)[None, :] < lens[:, None]
    q = {b: torch.randn(nq, h, generator=g, dtype=torch.float64) for b in ("inheritance", "exploration")}
    v = {b: torch.randn(nv, length, h, generator=g, dtype=torch.float64) for b in ("inheritance", "exploration")}
    t_raw = torch.randn(nq, nv, generator=g, dtype=torch.float64) * 3
    t_pos = torch.rand(nq, length, generator=g, dtype=torch.float64)
    return q, v, vmask, labels, t_raw, t_pos


# ----------------------------------------------------------------- scores


def test_frame_scores_match_numpy():
    q, v, vmask, *_ = batch()
    cos, cmax, rmax = frame_scores(q["inheritance"], v["inheritance"], vmask)
    rc, rcm, rrm = np_frame_scores(q["inheritance"].numpy(), v["inheritance"].numpy(), vmask.numpy())
    assert cos.shape == (9, 4, 5) and cos.dtype == torch.float32
    np.testing.assert_allclose(cos.numpy(), rc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cmax.numpy(), rcm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rmax.numpy(), rrm, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no valid frame"):
        frame_scores(q["inheritance"], v["inheritance"], torch.zeros(4, 5, dtype=torch.bool))


def test_fused_scores_weights_and_chunking():
    q, v, vmask, *_ = batch(1)
    ci = np_frame_scores(q["inheritance"].numpy(), v["inheritance"].numpy(), vmask.numpy())[1]
    ce = np_frame_scores(q["exploration"].numpy(), v["exploration"].numpy(), vmask.numpy())[1]
    np.testing.assert_allclose(fused_scores(q, v, vmask).numpy(), 0.7 * ci + 0.3 * ce, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused_scores(q, v, vmask, max_elements=7).numpy(), 0.7 * ci + 0.3 * ce,
                               rtol=1e-5, atol=1e-6)
    single = fused_scores({"exploration": q["exploration"]}, {"exploration": v["exploration"]}, vmask)
    np.testing.assert_allclose(single.numpy(), ce, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="branches"):
        fused_scores({"inheritance": q["inheritance"]}, v, vmask)


# ----------------------------------------------------------------- triplet


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_pool1_equals_hardest_reference(seed):
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(9, 4, generator=g, dtype=torch.float64) * 2 - 1
    y = [0, 0, 0, 1, 1, 2, 2, 3, 3]
    got = triplet_loss(S, torch.tensor(y), 0.2, hard=True, pool=1)
    assert got.item() == pytest.approx(np_triplet_hardest(S.numpy(), y, 0.2), rel=1e-12)


def _t2v_only_case():
    # One query, positive = video 0 (score 0); videos 1-3 have no query, so v2t is 0 and the
    # loss reveals which negative was drawn: m + neg - pos = 0.2 + neg.
    S = torch.tensor([[0.0, 0.5, 0.3, 0.1]])
    return S, torch.tensor([0]), {0.7: 1, 0.5: 2, 0.3: 3}


def test_triplet_t2v_sampling_pool_and_uniformity():
    S, y, which = _t2v_only_case()
    g = torch.Generator().manual_seed(0)
    for hard, pool, allowed in [(True, 1, {1}), (True, 2, {1, 2}), (True, 20, {1, 2, 3}), (False, 1, {1, 2, 3})]:
        draws = Counter(which[round(triplet_loss(S, y, 0.2, hard, pool, g).item(), 6)] for _ in range(600))
        assert set(draws) == allowed, (hard, pool, draws)
        for c in draws.values():  # uniform within the pool
            assert abs(c - 600 / len(allowed)) < 0.2 * 600 / len(allowed) + 15


def test_triplet_v2t_random_negative_when_not_hard():
    # Video 0 has one query (score .1); its negatives are queries 1-3 (scores .4, .6, .8).
    # Video 1's term is fixed, t2v is fixed (one negative), so the loss reveals the draw.
    S = torch.tensor([[0.1, 0.0], [0.4, 0.9], [0.6, 0.9], [0.8, 0.9]])
    y = torch.tensor([0, 1, 1, 1])
    g = torch.Generator().manual_seed(1)
    values = Counter(round(triplet_loss(S, y, 0.2, False, 20, g).item(), 6) for _ in range(600))
    assert len(values) == 3 and min(values.values()) > 150
    hard = triplet_loss(S, y, 0.2, True, 1).item()
    assert hard == pytest.approx(np_triplet_hardest(S.double().numpy(), [0, 1, 1, 1], 0.2))
    assert hard == pytest.approx(max(values))


def test_triplet_single_video_and_single_query():
    S = torch.tensor([[0.3], [0.1]], requires_grad=True)
    loss = triplet_loss(S, torch.tensor([0, 0]), 0.2, True)
    assert loss.item() == 0.0
    loss.backward()  # stays in the graph
    one = triplet_loss(torch.tensor([[0.1, 0.2, -0.5]]), torch.tensor([0]), 0.2, True, pool=1)
    assert one.item() == pytest.approx(0.2 + 0.2 - 0.1)  # t2v only: the video has no negative query


def test_triplet_gradients_and_errors():
    S = torch.rand(9, 4, dtype=torch.float64, requires_grad=True)
    triplet_loss(S, torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3]), 5.0, True, pool=1).backward()
    assert torch.isfinite(S.grad).all() and S.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="labels"):
        triplet_loss(S, torch.tensor([0, 4, 0, 1, 1, 2, 2, 3, 3]), 0.2, True)
    with pytest.raises(ValueError, match="labels"):
        triplet_loss(S, torch.tensor([0, 1]), 0.2, True)


# ----------------------------------------------------------------- NCE


def test_nce_matches_numpy_and_video_without_query():
    g = torch.Generator().manual_seed(3)
    Z = torch.randn(9, 4, generator=g, dtype=torch.float64) * 4
    y = [0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert nce_loss(Z, torch.tensor(y)).item() == pytest.approx(np_nce(Z.numpy(), y), rel=1e-12)
    y2 = [0, 0, 0, 1, 1, 1, 1, 3, 3]  # video 2 has no query
    Z.requires_grad_(True)
    loss = nce_loss(Z, torch.tensor(y2))
    assert loss.item() == pytest.approx(np_nce(Z.detach().numpy(), y2), rel=1e-12)
    loss.backward()
    assert torch.isfinite(Z.grad).all()


@pytest.mark.parametrize("alpha,beta", [(0.799, 0.799), (0.4856, 0.5), (0.0, 0.5), (1.0, 0.8), (0.2, 0.6),
                                        (0.34, 0.7), (0.5, 0.6)])
def test_soft_nce_matches_numpy(alpha, beta):
    # (0.2, Nq 9, B 4): 1 hard query row, 0 hard video columns → the hard term drops out;
    # (0.34): 3 hard rows, 1 hard column; (0.5): 4 hard rows, 2 hard columns (the hard rows'
    # videos are 0, 1 only partly: cuts are independent, §11.6); (1.0): no soft part; (0.0): no hard part.
    g = torch.Generator().manual_seed(4)
    Z = torch.randn(9, 4, generator=g, dtype=torch.float64) * 3
    src = torch.randn(9, 4, generator=g, dtype=torch.float64) * 3
    y = [0, 0, 0, 1, 1, 2, 2, 3, 3]
    got = soft_nce_loss(Z, torch.tensor(y), src, alpha, beta).item()
    assert got == pytest.approx(np_soft_nce(Z.numpy(), y, src.numpy(), alpha, beta), rel=1e-10, abs=1e-12)


def test_soft_nce_all_hard_is_nce_and_eps_counts():
    g = torch.Generator().manual_seed(5)
    Z = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert soft_nce_loss(Z, y, torch.zeros_like(Z), 1.0, 0.5).item() == pytest.approx(nce_loss(Z, y).item(), rel=1e-9)
    # 1e-12 enters every weight, incl. zero ones: huge logits on negatives make it visible.
    Z2 = torch.tensor([[0.0, 40.0], [40.0, 0.0]], dtype=torch.float64)
    y2 = torch.tensor([0, 1])
    got = soft_nce_loss(Z2, y2, torch.zeros_like(Z2), 1.0, 0.5).item()
    assert got == pytest.approx(np_soft_nce(Z2.numpy(), [0, 1], np.zeros((2, 2)), 1.0, 0.5), rel=1e-12)
    assert got < nce_loss(Z2, y2).item() - 1e-6


def test_exploration_self_target_gradients():
    g = torch.Generator().manual_seed(6)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    base = torch.randn(6, 3, generator=g, dtype=torch.float64)
    grads = {}
    for detach in (False, True):
        Z = base.clone().requires_grad_(True)
        soft_nce_loss(Z, y, Z.detach() if detach else Z, 0.0, 0.5).backward()
        grads[detach] = Z.grad
    assert not torch.allclose(grads[False], grads[True])
    # Non-detached self-target: the t2v soft row = β·CE + (1-β)·H(p) (entropy term, §5.4c note).
    Z = base.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: soft_nce_loss(z, y, z, 0.34, 0.7), (Z,))


# ----------------------------------------------------------------- KD


def test_kd_matches_numpy_and_ignores_padding():
    g = torch.Generator().manual_seed(7)
    t = torch.rand(3, 5, generator=g, dtype=torch.float64)
    s = torch.rand(3, 5, generator=g, dtype=torch.float64) * 2 - 1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    ref = np_kd(t.tolist(), s.tolist(), mask.tolist(), 0.2)
    t_bad = t.masked_fill(~mask, float("nan"))
    s_bad = s.masked_fill(~mask, -1e10)
    s_bad.requires_grad_(True)
    got = kd_loss(t_bad, s_bad, mask, 0.2)
    assert got.item() == pytest.approx(ref, rel=1e-5)  # computed in float32
    got.backward()
    assert torch.isfinite(s_bad.grad).all() and (s_bad.grad[~mask] == 0).all()
    assert kd_loss(t, t, mask, 0.2).item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------- schedules


def test_alpha_beta_sigmoid_values():
    p = LossParams()
    table = {0: (0.7990, 0.7990), 10: (0.797, 0.797), 20: (0.788, 0.788), 30: (0.760, 0.760), 40: (0.675, 0.675),
             45: (0.594, 0.594), 50: (0.4856, 0.5), 60: (0.245, 0.5), 80: (0.028, 0.5), 100: (0.002, 0.5)}
    for e, (a, b) in table.items():
        got = alpha_beta(e, p)
        nd = 4 if e in (0, 50) else 3
        assert round(got[0], nd) == pytest.approx(a, abs=1e-9), e
        assert round(got[1], nd) == pytest.approx(b, abs=1e-9), e
    # exact formula: 0.8 * 800 / (800 + exp(e / 8))
    assert alpha_beta(37, p)[0] == pytest.approx(0.8 * 800 / (800 + math.exp(37 / 8)), rel=1e-12)


def test_alpha_beta_alternatives():
    p = LossParams(alpha_decay="linear", beta_decay="cosine", n_epoch=100)
    assert alpha_beta(50, p) == pytest.approx((0.4, 0.5 + 0.5 * 0.3 * (1 + math.cos(math.pi / 2))))
    assert alpha_beta(100, p) == pytest.approx((0.0, 0.5))
    p = LossParams(alpha_decay="exp", beta_decay="none")
    assert alpha_beta(10, p) == pytest.approx((0.8 * 0.95 ** 10, 0.8))
    p = LossParams(alpha_decay="exp", beta_decay="exp", alpha_floor=0.3)
    assert alpha_beta(100, p) == pytest.approx((0.3, 0.5))
    with pytest.raises(ValueError, match="alpha_decay"):
        LossParams(alpha_decay="step")


def test_kd_weight_schedules():
    p = LossParams()
    for e, w in {0: 0.1, 10: 0.060, 20: 0.036, 30: 0.021, 40: 0.013}.items():
        assert round(kd_weight(e, p), 3) == pytest.approx(w)
    assert kd_weight(7, p) == pytest.approx(0.1 * 0.95 ** 7, rel=1e-12)
    assert kd_weight(30, LossParams(kd_decay="linear")) == pytest.approx(0.1 * 0.7)
    assert kd_weight(200, LossParams(kd_decay="linear")) == pytest.approx(0.1 * 0.05)
    assert kd_weight(16, LossParams(kd_decay="sigmoid")) == pytest.approx(0.1 * 800 / (800 + math.exp(2)))
    assert kd_weight(16, LossParams(kd_decay="none")) == pytest.approx(0.1)
    assert kd_weight(0, LossParams(kd=False)) == 0.0


def test_loss_params_from_config():
    cfg = TrainConfig(margin=0.1, label_style="hard", kd_decay="linear", n_epoch=50)
    p = LossParams.from_config(cfg)
    assert (p.margin, p.label_style, p.kd_decay, p.n_epoch, p.ab_exp_k) == (0.1, "hard", "linear", 50, 0.95)
    assert LossParams.from_config({"margin": 0.3}).margin == 0.3
    assert LossParams.from_config(SimpleNamespace(beta_floor=0.4)).beta_floor == 0.4
    shared = {f for f in LossParams.__dataclass_fields__ if f != "ab_exp_k"}
    assert shared <= set(TrainConfig.__dataclass_fields__)


# ----------------------------------------------------------------- total


def np_total(q, v, vmask, y, t_raw, t_pos, epoch, p):
    """Whole DL-DKD++ loss in numpy with pool 1 (deterministic)."""
    a, b = alpha_beta(epoch, p)
    out = {}
    for br, s in (("inheritance", "inh"), ("exploration", "exp")):
        cos, cmax, rmax = np_frame_scores(q[br].numpy(), v[br].numpy(), vmask.numpy())
        out[f"trip_{s}"] = np_triplet_hardest(cmax, y, p.margin)
        src = t_raw.numpy() if br == "inheritance" else rmax
        out[f"nce_{s}"] = np_soft_nce(rmax, y, src, a, b) if p.label_style == "soft" else np_nce(rmax, y)
        if br == "inheritance":
            stud = [cos[i, y[i]] for i in range(len(y))]
            out["kd"] = np_kd(t_pos.tolist(), stud, vmask[y].tolist(), p.kd_temperature)
    out["loss"] = (out["trip_inh"] + p.nce_weight_inh * out["nce_inh"] + kd_weight(epoch, p) * out["kd"]
                   + out["trip_exp"] + p.nce_weight_exp * out["nce_exp"])
    return out


@pytest.mark.parametrize("epoch,style", [(0, "soft"), (50, "soft"), (95, "soft"), (3, "hard")])
def test_total_loss_matches_numpy(epoch, style):
    q, v, vmask, labels, t_raw, t_pos = batch(8)
    p = LossParams(hard_pool_size=1, label_style=style, margin=0.3)
    got = dldkdpp_loss(q, v, vmask, labels, t_raw, t_pos, epoch, p)
    ref = np_total(q, v, vmask, labels.tolist(), t_raw, t_pos, epoch, p)
    assert list(got) == ["trip_inh", "nce_inh", "kd", "trip_exp", "nce_exp", "loss", "alpha", "beta", "kd_w"]
    for k, val in ref.items():
        assert got[k].item() == pytest.approx(val, rel=1e-4, abs=1e-6), k
    assert got["alpha"].item() == pytest.approx(alpha_beta(epoch, p)[0])
    assert got["kd_w"].item() == pytest.approx(kd_weight(epoch, p))


def test_total_loss_single_branch_kd_off_and_missing_teacher():
    q, v, vmask, labels, t_raw, t_pos = batch(9)
    p = LossParams(hard_pool_size=1)
    exp_only = dldkdpp_loss({"exploration": q["exploration"]}, {"exploration": v["exploration"]}, vmask, labels,
                            None, None, 0, p)
    assert set(exp_only) == {"trip_exp", "nce_exp", "loss", "alpha", "beta", "kd_w"}
    both = dldkdpp_loss(q, v, vmask, labels, t_raw, t_pos, 0, p)
    assert exp_only["trip_exp"].item() == pytest.approx(both["trip_exp"].item())
    assert exp_only["loss"].item() == pytest.approx(both["trip_exp"].item() + 0.04 * both["nce_exp"].item())
    inh_only = dldkdpp_loss({"inheritance": q["inheritance"]}, {"inheritance": v["inheritance"]}, vmask, labels,
                            t_raw, None, 0, LossParams(kd=False))
    assert set(inh_only) == {"trip_inh", "nce_inh", "kd", "loss", "alpha", "beta", "kd_w"}
    assert inh_only["kd"].item() == 0.0 and inh_only["kd_w"].item() == 0.0
    with pytest.raises(ValueError, match="teacher_raw"):
        dldkdpp_loss(q, v, vmask, labels, None, t_pos, 0, p)
    with pytest.raises(ValueError, match="teacher_pos_cos"):
        dldkdpp_loss(q, v, vmask, labels, t_raw, None, 0, p)
    with pytest.raises(ValueError, match="teacher_pos_cos"):
        dldkdpp_loss(q, v, vmask, labels, t_raw, t_pos[:, :3], 0, p)
    hard = dldkdpp_loss(q, v, vmask, labels, None, t_pos, 0, LossParams(label_style="hard"))  # no T̂ needed
    assert torch.isfinite(hard["loss"])


def test_total_loss_detach_self_target_changes_exploration_grads_only():
    q, v, vmask, labels, t_raw, t_pos = batch(10)
    grads = {}
    for detach in (False, True):
        qq = {k: x.clone().requires_grad_(True) for k, x in q.items()}
        p = LossParams(hard_pool_size=1, detach_self_target=detach)
        out = dldkdpp_loss(qq, v, vmask, labels, t_raw, t_pos, 60, p)
        out["loss"].backward()
        grads[detach] = {k: x.grad for k, x in qq.items()}
    torch.testing.assert_close(grads[False]["inheritance"], grads[True]["inheritance"])
    assert not torch.allclose(grads[False]["exploration"], grads[True]["exploration"])


def test_total_loss_edge_cases_single_query_single_video():
    g = torch.Generator().manual_seed(11)
    q = {b: torch.randn(1, 4, generator=g, requires_grad=True) for b in ("inheritance", "exploration")}
    v = {b: torch.randn(1, 1, 4, generator=g) for b in ("inheritance", "exploration")}
    out = dldkdpp_loss(q, v, torch.ones(1, 1, dtype=torch.bool), torch.tensor([0]), torch.randn(1, 1),
                       torch.randn(1, 1), 0, LossParams())
    assert out["trip_inh"].item() == 0.0 and out["kd"].item() == pytest.approx(0.0, abs=1e-7)
    assert all(torch.isfinite(x).all() for x in out.values())
    out["loss"].backward()
    assert all(torch.isfinite(x.grad).all() for x in q.values())
