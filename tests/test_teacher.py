import json

import numpy as np
import pytest
import zarr
from synthetic import make_synthetic

from prvr.data.captions import Caption, read_captions, video_order, write_captions
from prvr.data.dataset import DataError
from prvr.store import FeatureStore, write_store
from prvr.teacher import teacher_metrics, teacher_scores, teacher_similarity


def _naive_ufs(x, L):
    n = len(x)
    if n <= L:
        return x
    b = [min(int(np.round((i / L) * n)), n - 1) for i in range(L + 1)]
    return np.stack([x[b[i] : b[i + 1]].mean(0) if b[i] < b[i + 1] else x[b[i]] for i in range(L)])


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return make_synthetic(root, n_videos={"train": 30, "val": 5, "test": 12}, teacher_rows="mixed", rows=(2, 30), seed=7)


def test_teacher_matrix_matches_naive_numpy(synth, tmp_path):
    out = teacher_similarity(synth.teacher_video, synth.teacher_text, synth.student_video, synth.captions["train"],
                             tmp_path, max_ctx_l=12, query_chunk=7, video_chunk=5)  # fmt: skip
    assert out == tmp_path / "train.zarr"
    assert [p.name for p in tmp_path.iterdir()] == ["train.zarr"]  # no temp folder left
    g = zarr.open_group(str(out), mode="r")
    caps = read_captions(synth.captions["train"])
    vids = video_order(caps)
    assert g.attrs["query_ids"] == [c.cap_id for c in caps] and g.attrs["video_ids"] == vids
    assert g.attrs["complete"] and g.attrs["max_ctx_l"] == 12
    sv, tv, tt = (FeatureStore.open(p) for p in (synth.student_video, synth.teacher_video, synth.teacher_text))
    frames = {}
    for v in vids:
        ns, nt = len(sv[v]), len(tv[v])
        L = min(ns, nt, 12)
        frames[v] = _naive_ufs(tv[v].astype(np.float64), L)
        assert g["aligned_len"][vids.index(v)] == L and g["n_teacher"][vids.index(v)] == nt
    text = np.stack([tt[c.cap_id][0].astype(np.float64) for c in caps])
    raw = np.array([[max(frames[v] @ t) for v in vids] for t in text])
    np.testing.assert_allclose(g["raw_max"][:], raw, rtol=1e-4, atol=1e-4)
    off = g["pos_offsets"][:]
    pos = g["pos_cos"][:]
    for i, (c, t) in enumerate(zip(caps, text)):
        f = frames[c.video_id]
        want = f @ t / np.linalg.norm(f, axis=1) / np.linalg.norm(t)
        np.testing.assert_allclose(pos[off[i] : off[i + 1]], want, rtol=1e-4, atol=1e-5)
    # the teacher is informative: the positive video is usually the raw-max argmax
    gt = np.array([vids.index(c.video_id) for c in caps])
    assert (raw.argmax(1) == gt).mean() > 0.15  # chance 1/30


def test_teacher_text_fallback_key_and_missing(tmp_path):
    rng = np.random.default_rng(0)
    write_store(tmp_path / "f.zarr", [("a", rng.standard_normal((3, 4))), ("b", rng.standard_normal((2, 4)))], dim=4)
    write_store(tmp_path / "s.zarr", [("a", rng.standard_normal((3, 5))), ("b", rng.standard_normal((5, 5)))], dim=5)
    # "a#0" is the reference's fallback key of "a#enc#0"
    write_store(tmp_path / "t.zarr", [("a#0", rng.standard_normal((1, 4))), ("b#enc#0", rng.standard_normal((1, 4)))], dim=4)
    caps = [Caption("a#enc#0", "a", "x"), Caption("b#enc#0", "b", "y")]
    teacher_similarity(tmp_path / "f.zarr", tmp_path / "t.zarr", tmp_path / "s.zarr", caps, tmp_path / "o")
    g = zarr.open_group(str(tmp_path / "o" / "train.zarr"), mode="r")
    assert g["raw_max"].shape == (2, 2) and list(g["aligned_len"][:]) == [3, 2]
    bad = caps + [Caption("c#enc#0", "c", "z")]
    with pytest.raises(DataError, match="1 videos .* missing from teacher video store"):
        teacher_similarity(tmp_path / "f.zarr", tmp_path / "t.zarr", tmp_path / "s.zarr", bad, tmp_path / "o2")
    assert not (tmp_path / "o2" / "train.zarr").exists()


def test_teacher_scores_cosine_all_frames(synth):
    caps = read_captions(synth.captions["test"])
    scores, vids = teacher_scores(synth.teacher_video, synth.teacher_text, caps, query_chunk=5, video_chunk=3)
    tv, tt = FeatureStore.open(synth.teacher_video), FeatureStore.open(synth.teacher_text)
    for i in (0, len(caps) - 1):
        t = tt[caps[i].cap_id][0]
        for j, v in enumerate(vids):
            f = tv[v]
            want = max(f @ t / np.linalg.norm(f, axis=1) / np.linalg.norm(t))
            assert scores[i, j] == pytest.approx(want, abs=1e-5)


def test_teacher_metrics_json(synth, tmp_path):
    m = teacher_metrics(synth.teacher_video, synth.teacher_text, synth.captions["test"], tmp_path / "m.json")
    saved = json.loads((tmp_path / "m.json").read_text())
    for k in ("R@1", "R@5", "R@10", "R@100", "SumR", "medr", "meanr"):
        assert k in saved and saved[k] == pytest.approx(m[k])
    assert saved["R@100"] == 100.0  # 12-video gallery
    n = saved["n_queries"]
    # teacher is informative: far above chance (R@1 chance = 100/12)
    assert saved["R@1"] > 100 / 12 * 2 and n == len(read_captions(synth.captions["test"]))


def test_write_captions_roundtrip_of_synthetic(synth):
    caps = read_captions(synth.captions["train"])
    assert len(video_order(caps)) == 30
    write_captions(synth.root / "copy.txt", caps)
    assert read_captions(synth.root / "copy.txt") == caps
