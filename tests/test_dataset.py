import numpy as np
import pytest
import torch
from synthetic import make_synthetic

from prvr.data.captions import Caption, read_captions, write_captions
from prvr.data.dataset import (
    DataError,
    PRVRData,
    align_teacher,
    average_to_fixed_length,
    l2_normalize,
    uniform_feature_sampling,
)
from prvr.store import write_store


def _reference_ufs(x, max_len):
    """The reference loop, written independently (float64 (i/L)*n boundaries, half-even rounding)."""
    n = len(x)
    if n <= max_len:
        return x
    idx = [int(np.round((i / max_len) * n)) for i in range(max_len + 1)]
    idx = [min(b, n - 1) for b in idx]
    out = []
    for i in range(max_len):
        s, e = idx[i], idx[i + 1]
        out.append(np.mean(x[s:e], axis=0) if s < e else x[s])
    return np.asarray(out)


def test_boundary_rounding_example_of_spec():
    # §11.3: L=10, n=45, i=7 -> (7/10)*45 = 31.4999... -> 31 (an exact 7*45/10 = 31.5 would give 32)
    x = np.arange(45, dtype=np.float64)[:, None]
    out = uniform_feature_sampling(x, 10)[:, 0]
    # segment 6 is [b6, b7) = [27, 31): mean 28.5; segment 7 is [31, 36): mean 33
    assert out[6] == pytest.approx(28.5) and out[7] == pytest.approx(33.0)
    # half-to-even: (1/10)*45 = 4.5 -> 4
    assert out[0] == pytest.approx(np.mean(np.arange(0, 4)))


@pytest.mark.parametrize("n,L", [(45, 10), (129, 128), (200, 128), (1000, 128), (7, 3), (300, 7), (128, 128), (5, 128)])
def test_uniform_feature_sampling_matches_reference_loop(n, L):
    x = np.random.default_rng(n).standard_normal((n, 6)).astype(np.float32)
    got = uniform_feature_sampling(x, L)
    want = _reference_ufs(x, L)
    assert got.shape == (min(n, L), 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_uniform_feature_sampling_leaves_short_alone_and_drops_last_row():
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    assert uniform_feature_sampling(x, 5) is x
    # n=6, L=3: boundaries 0,2,4,6->5; the last segment is rows 4..4 (row 5 left out, as the reference)
    y = np.arange(6, dtype=np.float32)[:, None]
    np.testing.assert_allclose(uniform_feature_sampling(y, 3)[:, 0], [0.5, 2.5, 4.0])


def test_average_to_fixed_length_up_and_down():
    x = np.arange(3, dtype=np.float32)[:, None]
    # n=3 -> M=6: boundaries round(i/6*3) = 0,0(0.5),1,2(1.5),2,2(2.5)->2, 3->2
    np.testing.assert_allclose(average_to_fixed_length(x, 6)[:, 0], [0, 0, 1, 2, 2, 2])
    y = np.random.default_rng(1).standard_normal((100, 4)).astype(np.float32)
    np.testing.assert_allclose(average_to_fixed_length(y, 32), _reference_ufs(y, 32), rtol=1e-5, atol=1e-6)


def test_l2_normalize_eps():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    out = l2_normalize(x)
    np.testing.assert_allclose(out[0], [3 / (5 + 1e-5), 4 / (5 + 1e-5)], rtol=1e-6)
    np.testing.assert_array_equal(out[1], [0, 0])


def _seq(n, d=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_align_student_longer_than_teacher_two_passes():
    s, t = _seq(300), _seq(200, 2, 1)
    a, b = align_teacher(s, t, 128)
    assert a.shape == (128, 3) and b.shape == (128, 2)
    np.testing.assert_allclose(a, _reference_ufs(_reference_ufs(s, 200), 128), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, _reference_ufs(t, 128), rtol=1e-5, atol=1e-6)
    # two passes differ from one direct pass (the reason for §11.2)
    assert not np.allclose(a, _reference_ufs(s, 128))


def test_align_student_longer_short_teacher():
    s, t = _seq(50), _seq(20, 2, 1)
    a, b = align_teacher(s, t, 128)
    assert a.shape == (20, 3) and b.shape == (20, 2)
    np.testing.assert_allclose(a, _reference_ufs(s, 20), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(b, t)


def test_align_teacher_longer_than_student_is_resampled():
    s, t = _seq(20), _seq(50, 2, 1)
    a, b = align_teacher(s, t, 128)
    np.testing.assert_array_equal(a, s)
    assert b.shape == (20, 2)
    np.testing.assert_allclose(b, _reference_ufs(t, 20), rtol=1e-5, atol=1e-6)


def test_align_both_above_cap():
    s, t = _seq(150), _seq(400, 2, 1)
    a, b = align_teacher(s, t, 128)
    assert a.shape == (128, 3) and b.shape == (128, 2)
    np.testing.assert_allclose(a, _reference_ufs(s, 128), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, _reference_ufs(t, 128), rtol=1e-5, atol=1e-6)


def test_align_teacher_above_cap_student_below():
    s, t = _seq(90), _seq(300, 2, 1)
    a, b = align_teacher(s, t, 128)
    assert a.shape == (90, 3) and b.shape == (90, 2)
    np.testing.assert_array_equal(a, s)
    np.testing.assert_allclose(b, _reference_ufs(t, 90), rtol=1e-5, atol=1e-6)


def test_align_equal_lengths_is_identity_and_empty_fails():
    s, t = _seq(30), _seq(30, 2, 1)
    a, b = align_teacher(s, t, 128)
    np.testing.assert_array_equal(a, s)
    np.testing.assert_array_equal(b, t)
    with pytest.raises(DataError):
        align_teacher(s[:0], t)


# ---------------------------------------------------------------------------------- loader


def _tiny(tmp_path, lens=(3, 5, 2, 4), caps=(2, 1, 3, 2), toks=None, dv=4, dq=3):
    rng = np.random.default_rng(0)
    vids = [f"v{i}" for i in range(len(lens))]
    write_store(tmp_path / "sv.zarr", [(v, rng.standard_normal((n, dv)) * 3) for v, n in zip(vids, lens)], dim=dv)
    captions, text = [], []
    k = 0
    for v, c in zip(vids, caps):
        for j in range(c):
            cid = f"{v}#enc#{j}"
            captions.append(Caption(cid, v, "x"))
            n_tok = toks[k] if toks else 2 + (k % 4)
            text.append((cid, rng.standard_normal((n_tok, dq)) * 2))
            k += 1
    write_store(tmp_path / "st.zarr", text, dim=dq)
    write_captions(tmp_path / "c.txt", captions)
    return vids, captions


def test_collation_order_labels_masks(tmp_path):
    vids, _ = _tiny(tmp_path)
    d = PRVRData.load(read_captions(tmp_path / "c.txt"), tmp_path / "sv.zarr", tmp_path / "st.zarr", max_desc_l=4)
    assert d.video_ids == vids and d.n_queries == 8
    b = d.collate(np.array([0, 1, 2, 3]))
    # sorted by caption count desc, stable: v2 (3), v0 (2), v3 (2), v1 (1)
    assert list(b.video_idx) == [2, 0, 3, 1]
    assert [d.query_ids[i] for i in b.query_idx] == [
        "v2#enc#0", "v2#enc#1", "v2#enc#2", "v0#enc#0", "v0#enc#1", "v3#enc#0", "v3#enc#1", "v1#enc#0",
    ]  # fmt: skip
    assert b.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 3]
    assert b.video.shape == (4, 5, 4) and b.video_mask.tolist() == [
        [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1],
    ]  # fmt: skip
    assert b.video[0, 2:].abs().sum() == 0
    # rows are L2-normalised
    assert torch.allclose(b.video[3].norm(dim=-1), torch.ones(5), atol=1e-4)
    # queries capped at max_desc_l=4 and normalised; lengths 2+(k%4) -> k=0..7: 2,3,4,5->4,2,3,4,5->4
    qlen = b.query_mask.sum(1).tolist()
    want = {f"{v}#enc#{j}": n for (v, j), n in zip(
        [("v0", 0), ("v0", 1), ("v1", 0), ("v2", 0), ("v2", 1), ("v2", 2), ("v3", 0), ("v3", 1)], [2, 3, 4, 4, 2, 3, 4, 4])}
    assert qlen == [want[d.query_ids[i]] for i in b.query_idx]
    assert b.query.shape == (8, 4, 3)
    assert b.teacher_raw is None and b.teacher_pos_cos is None
    # a stable order: ties keep the shuffled order
    b2 = d.collate(np.array([3, 1, 0]))
    assert list(b2.video_idx) == [3, 0, 1]


def test_epoch_order_deterministic_and_batches_cover(tmp_path):
    _tiny(tmp_path, lens=tuple(range(2, 12)), caps=(1,) * 10)
    d = PRVRData.load(read_captions(tmp_path / "c.txt"), tmp_path / "sv.zarr", tmp_path / "st.zarr")
    a, b, c = d.epoch_order(1, 0), d.epoch_order(1, 0), d.epoch_order(1, 1)
    assert (a == b).all() and not (a == c).all() and sorted(a) == list(range(10))
    batches = list(d.train_batches(4, seed=1, epoch=0))
    assert [len(x.video_idx) for x in batches] == [4, 4, 2]
    assert sorted(np.concatenate([x.video_idx for x in batches])) == list(range(10))


def test_missing_ids_error_and_skip(tmp_path):
    _tiny(tmp_path)
    caps = read_captions(tmp_path / "c.txt") + [Caption(f"zz{i}#enc#0", f"zz{i}", "x") for i in range(12)]
    with pytest.raises(DataError, match=r"12 videos missing .*zz0.*\(\+2 more\)"):
        PRVRData.load(caps, tmp_path / "sv.zarr", tmp_path / "st.zarr")
    d = PRVRData.load(caps, tmp_path / "sv.zarr", tmp_path / "st.zarr", skip_missing=True)
    assert d.n_videos == 4 and d.n_queries == 8


def test_memmap_above_budget_gives_same_batches(tmp_path):
    _tiny(tmp_path)
    caps = read_captions(tmp_path / "c.txt")
    a = PRVRData.load(caps, tmp_path / "sv.zarr", tmp_path / "st.zarr")
    b = PRVRData.load(caps, tmp_path / "sv.zarr", tmp_path / "st.zarr", memory_budget_gb=0.0, cache_dir=tmp_path / "cache")
    assert isinstance(b.videos.values, np.ndarray) and list((tmp_path / "cache").iterdir())
    x, y = a.collate(np.array([1, 3])), b.collate(np.array([1, 3]))
    assert torch.equal(x.video, y.video) and torch.equal(x.query, y.query)
    b.close()
    assert not list((tmp_path / "cache").iterdir())


def test_one_token_and_single_video_batch(tmp_path):
    _tiny(tmp_path, lens=(3,), caps=(1,), toks=[1])
    d = PRVRData.load(read_captions(tmp_path / "c.txt"), tmp_path / "sv.zarr", tmp_path / "st.zarr")
    b = d.collate(np.array([0]))
    assert b.video.shape == (1, 3, 4) and b.query.shape == (1, 1, 3) and b.labels.tolist() == [0]


def test_float16_store_and_training_alignment(tmp_path):
    from prvr.teacher import teacher_similarity

    p = make_synthetic(tmp_path, n_videos={"train": 12, "val": 3, "test": 3}, teacher_rows="mixed", dtype="float16",
                       rows=(3, 40), seed=3)  # fmt: skip
    teacher_similarity(p.teacher_video, p.teacher_text, p.student_video, p.captions["train"], tmp_path / "teacher",
                       max_ctx_l=16)  # fmt: skip
    caps = read_captions(p.captions["train"])
    d = PRVRData.load(caps, p.student_video, p.student_text, teacher=tmp_path / "teacher", max_ctx_l=16)
    from prvr.store import FeatureStore

    sv, tv = FeatureStore.open(p.student_video), FeatureStore.open(p.teacher_video)
    for i, v in enumerate(d.video_ids):
        s = sv[v].astype(np.float32)
        a, _ = align_teacher(s, tv[v].astype(np.float32), 16)
        rows, mask = d.videos.padded(np.array([i]))
        assert rows.dtype == torch.float32 and mask.sum() == len(a)
        # float16 store: averaged rows are rounded once to float16 before normalising
        np.testing.assert_allclose(rows[0].numpy(), l2_normalize(a), rtol=2e-3, atol=2e-3)
        if len(a) == len(s):  # not averaged: exactly the float32 path
            np.testing.assert_allclose(rows[0].numpy(), l2_normalize(s), rtol=1e-6, atol=1e-7)
    assert d.videos.values.dtype == torch.float16 and d.texts.values.dtype == torch.float16
    f = PRVRData.load(caps, p.student_video, p.student_text, teacher=tmp_path / "teacher", max_ctx_l=16, storage="float32")
    assert f.videos.values.dtype == torch.float32
    x, y = d.collate(np.arange(5)), f.collate(np.arange(5))
    torch.testing.assert_close(x.video, y.video, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(x.query, y.query, rtol=0, atol=0)
    b = d.collate(np.arange(d.n_videos))
    assert b.teacher_raw.shape == (d.n_queries, d.n_videos)
    assert b.teacher_pos_cos.shape == (d.n_queries, b.video.shape[1])
    # pos_cos is zero beyond the positive video's length and within [-1, 1]
    vm = b.video_mask[b.labels]
    assert (b.teacher_pos_cos[vm == 0] == 0).all() and b.teacher_pos_cos.abs().max() <= 1 + 1e-5
    # without teacher: eval-style rows (cap only, no pooling to n_t)
    e = PRVRData.load(caps, p.student_video, p.student_text, max_ctx_l=16)
    assert (e.videos.lengths == np.minimum(sv.lengths[[sv.index(v) for v in e.video_ids]], 16)).all()
