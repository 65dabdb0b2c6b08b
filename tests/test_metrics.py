"""Retrieval metrics (method spec §1.2) and the pessimistic tie rule."""

import numpy as np
import pytest
import torch

from prvr.metrics import chunked_ranks, ranks_from_scores, recall_metrics


def test_ranks_hand_made_with_ties_and_nan():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.2], [0.1, 0.3, 0.3], [np.nan, 0.0, -5.0], [0.0, np.nan, 1.0]])
    gt = [0, 1, 2, 0, 2]
    # row 1: all tied → worst rank; row 2: one tie → rank 2; row 3: NaN gt → last; row 4: NaN other → below
    np.testing.assert_array_equal(ranks_from_scores(scores, gt), [1, 3, 2, 3, 1])
    np.testing.assert_array_equal(ranks_from_scores(torch.tensor(scores), torch.tensor(gt)), [1, 3, 2, 3, 1])


def test_constant_model_never_looks_good():
    ranks = ranks_from_scores(np.zeros((50, 20)), np.arange(50) % 20)
    assert (ranks == 20).all()
    m = recall_metrics(ranks)
    assert m["R@1"] == m["R@5"] == m["R@10"] == 0.0 and m["R@100"] == 100.0


def test_recall_metrics_hand_computed():
    m = recall_metrics([1, 2, 6, 11, 101, 3])
    assert m["R@1"] == pytest.approx(100 / 6)
    assert m["R@5"] == pytest.approx(50.0)
    assert m["R@10"] == pytest.approx(400 / 6)
    assert m["R@100"] == pytest.approx(500 / 6)
    assert m["SumR"] == pytest.approx(1300 / 6)  # 216.67, sum of the unrounded recalls
    assert m["medr"] == 4.5 and m["meanr"] == pytest.approx(124 / 6)
    assert m["mAP"] == pytest.approx(100 * (1 + 1 / 2 + 1 / 6 + 1 / 11 + 1 / 101 + 1 / 3) / 6)
    # unrounded SumR differs from the sum of rounded recalls (§1.2 item 6)
    m = recall_metrics([1, 2, 2, 2, 20, 20])  # 16.67 + 66.67 + 66.67 + 100
    assert m["SumR"] == pytest.approx(250.0)
    assert sum(round(m[k], 1) for k in ("R@1", "R@5", "R@10", "R@100")) == pytest.approx(250.1)
    with pytest.raises(ValueError):
        recall_metrics([])
    with pytest.raises(ValueError):
        recall_metrics([0, 1])


@pytest.mark.parametrize("qc,vc", [(7, 5), (64, 512), (1, 1), (13, 40)])
@pytest.mark.parametrize("grouped", [True, False])
def test_chunked_equals_full_with_ties(qc, vc, grouped):
    rng = np.random.default_rng(qc * 100 + vc)
    nq, nv = 61, 37
    full = np.round(rng.standard_normal((nq, nv)), 1).astype(np.float32)  # many ties
    full[3] = 0.0  # a constant row
    full[5, 7] = np.nan
    gt = np.sort(rng.integers(0, nv, nq)) if grouped else rng.integers(0, nv, nq)
    calls = []

    def score_block(qs, vs):
        calls.append((qs.start, vs.start))
        assert qs.stop - qs.start <= qc and vs.stop - vs.start <= vc
        return torch.from_numpy(full[qs, vs])

    got = chunked_ranks(score_block, nq, nv, gt, query_chunk=qc, video_chunk=vc)
    np.testing.assert_array_equal(got, ranks_from_scores(full, gt))
    assert len(calls) == len(set(calls)) == -(-nq // qc) * -(-nv // vc)  # every block exactly once
    # and the pessimistic ranks agree with a plain definition
    for i in range(nq):
        s = np.nan_to_num(full[i], nan=-np.inf)
        assert got[i] == 1 + (s > s[gt[i]]).sum() + (s == s[gt[i]]).sum() - 1


def test_chunked_bad_block_and_bad_gt():
    with pytest.raises(ValueError, match="shape"):
        chunked_ranks(lambda qs, vs: torch.zeros(2, 2), 4, 4, [0, 1, 2, 3], query_chunk=3, video_chunk=3)
    with pytest.raises(ValueError, match="gt"):
        chunked_ranks(lambda qs, vs: torch.zeros(1, 1), 2, 4, [0, 4])
    with pytest.raises(ValueError, match="gt"):
        ranks_from_scores(np.zeros((3, 2)), [0, 1])
