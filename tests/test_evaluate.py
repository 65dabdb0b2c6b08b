import json

import numpy as np
import pytest
import torch
from synthetic import make_synthetic

from prvr.config import TrainConfig
from prvr.data.captions import read_captions
from prvr.data.dataset import PRVRData
from prvr.evaluate import encode_split, evaluate, load_trained, score_ranks
from prvr.teacher import teacher_metrics, teacher_similarity
from prvr.train import train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    p = make_synthetic(root, n_videos={"train": 30, "val": 8, "test": 12}, rows=(2, 9), tokens=(1, 5),
                       dv=10, dq=8, dt=8, latent=6, seed=4)  # fmt: skip
    teacher_similarity(p.teacher_video, p.teacher_text, p.student_video, p.captions["train"], root / "teacher", max_ctx_l=8)
    cfg = TrainConfig(hidden=16, n_heads=2, batch_size=10, n_epoch=2, lr=2e-3, progress=False, threads=1, seed=0,
                      max_ctx_l=8, max_desc_l=4)  # fmt: skip
    train(p.as_train_paths(root / "teacher"), cfg, root / "run")
    return p, root


def _naive_ranks(model, data):
    """Full score matrices in float64 numpy, from per-video / per-query encodings."""
    model.eval()
    qv, vv = {}, {}
    with torch.no_grad():
        for i in range(data.n_queries):
            tok, m = data.texts.padded(np.array([i]))
            for b, x in model.encode_query(tok, m).items():
                qv.setdefault(b, []).append(x[0].double().numpy())
        for j in range(data.n_videos):
            fr, m = data.videos.padded(np.array([j]))
            for b, x in model.encode_video(fr, m).items():
                vv.setdefault(b, []).append(x[0].double().numpy())
    scores = {}
    for b, rows in qv.items():
        q = np.stack(rows)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        s = np.zeros((len(q), data.n_videos))
        for j, f in enumerate(vv[b]):
            f = f / np.linalg.norm(f, axis=1, keepdims=True)
            s[:, j] = (q @ f.T).max(1)
        scores[b] = s
    scores["fused"] = 0.7 * scores["inheritance"] + 0.3 * scores["exploration"]
    gt = data.query_video
    return {k: 1 + (s > s[np.arange(len(gt)), gt][:, None]).sum(1) for k, s in scores.items()}


def test_chunked_ranks_equal_naive(trained):
    p, root = trained
    model, _ = load_trained(root / "run")
    data = PRVRData.load(read_captions(p.captions["test"]), p.student_video, p.student_text, max_ctx_l=8, max_desc_l=4)
    q, v, vmask = encode_split(model, data, "cpu", video_batch=5, query_batch=7)
    ranks = score_ranks(q, v, vmask, torch.from_numpy(data.query_video), query_chunk=3, video_chunk=2)
    want = _naive_ranks(model, data)
    for k in ("fused", "inheritance", "exploration"):
        np.testing.assert_array_equal(ranks[k], want[k], err_msg=k)


def test_evaluate_json_and_markdown(trained, tmp_path):
    p, root = trained
    teacher_metrics(p.teacher_video, p.teacher_text, p.captions["test"], tmp_path / "teacher.json")
    expected = {"R@1": 15.3, "R@5": 36.0, "R@10": 47.5, "R@100": 86.0, "SumR": 184.8}
    out = evaluate(root / "run", p.student_video, p.student_text, p.captions["test"], tmp_path / "m.json",
                   out_md=tmp_path / "m.md", device="cpu", expected=expected, teacher_json=tmp_path / "teacher.json")  # fmt: skip
    saved = json.loads((tmp_path / "m.json").read_text())
    for k in ("R@1", "R@5", "R@10", "R@100", "SumR", "medr", "meanr"):
        assert saved[k] == pytest.approx(out[k])
    assert saved["SumR"] == pytest.approx(sum(saved[f"R@{k}"] for k in (1, 5, 10, 100)))
    assert set(saved["branches"]) == {"inheritance", "exploration"}
    assert saved["n_videos"] == 12 and saved["R@100"] == 100.0
    md = (tmp_path / "m.md").read_text()
    for row in ("prvr DL-DKD++ (fused)", "inheritance branch", "exploration branch", "CLIP teacher alone", "paper (expected)"):
        assert row in md
    assert "| 15.3 | 36.0 | 47.5 | 86.0 | 184.8 |" in md


def test_single_query_and_one_token(trained, tmp_path):
    p, root = trained
    caps = read_captions(p.captions["test"])
    from prvr.store import FeatureStore

    st = FeatureStore.open(p.student_text)
    one_tok = [c for c in caps if len(st[c.cap_id]) == 1]
    assert one_tok, "the synthetic set has 1-token captions"
    out = evaluate(root / "run", p.student_video, p.student_text, one_tok[:1], tmp_path / "one.json", device="cpu")
    assert out["n_queries"] == 1 and out["n_videos"] == 1 and out["R@1"] == 100.0
    out = evaluate(root / "run", p.student_video, p.student_text, caps[:1], tmp_path / "q1.json", query_chunk=1, video_chunk=1)
    assert out["n_queries"] == 1


def test_dimension_mismatch_is_reported(trained, tmp_path):
    _, root = trained
    other = make_synthetic(tmp_path / "o", n_videos={"train": 2, "val": 2, "test": 2}, dv=7, seed=1)
    with pytest.raises(ValueError, match="do not match the trained model"):
        evaluate(root / "run", other.student_video, other.student_text, other.captions["test"], tmp_path / "x.json")
