"""Import / export of the MS-SL / DL-DKD feature release (prvr.data.msrl) on generated releases."""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from msrl_fixtures import make_release
from prvr.data.captions import read_captions
from prvr.data.msrl import (
    BigFile,
    MissingReleaseFiles,
    ReleaseError,
    ReleaseLayout,
    dataset_paths,
    export_dataset,
    export_release,
    import_release,
    iter_video2frames,
    main,
    plan_import,
)
from prvr.store import FeatureStore, write_store

ROOT = Path(__file__).resolve().parent.parent


def run_import(rel, out: Path, **source_extra) -> dict:
    p = dataset_paths(out)
    teacher = source_extra.get("teacher", "release") == "release"
    return import_release(
        rel.source(**source_extra), p["captions"], p["student_video"], p["student_text"],
        p["clip_frames"] if teacher else None, p["clip_text"] if teacher else None,
        summary=out / "import" / "summary.json", dataset="ds",
    )


# --------------------------------------------------------------------------------------
# video2frames.txt parser
# --------------------------------------------------------------------------------------


def _parse_all(path, **kw):
    return dict(iter_video2frames(path, **kw))


@pytest.mark.parametrize("block", [128, 4 << 20])
def test_video2frames_parser_equals_literal_eval(tmp_path, block):
    rng = np.random.default_rng(0)
    d = {}
    for i in range(60):
        vid = f"v_{i}" if i % 7 else f"we'ird \"id\" \\{i} é"
        d[vid] = [f"{vid}_{j}" for j in range(int(rng.integers(0, 6)))]
    variants = [
        repr(d),  # what the reference wrote (str(dict))
        json.dumps(d, indent=1, ensure_ascii=False),  # double quotes, newlines
        json.dumps(d),  # \u escapes
        "{" + ",\n".join(f"{k!r} : ({', '.join(repr(f) for f in v)}{',' if v else ''})" for k, v in d.items()) + ",}",
    ]
    for k, text in enumerate(variants):
        p = tmp_path / f"v2f{k}.txt"
        p.write_text(text, encoding="utf-8")
        got = _parse_all(p, block_chars=block)
        want = {kk: list(vv) for kk, vv in ast.literal_eval(text).items()}
        assert got == want, k
        assert list(got) == list(want)  # file order kept


def test_video2frames_integer_ids_and_empty(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("{'a': [1, 2, -3], u'b': []}\n\n")
    assert _parse_all(p) == {"a": ["1", "2", "-3"], "b": []}
    p.write_text("{}")
    assert _parse_all(p) == {}


@pytest.mark.parametrize(
    "text, where",
    [
        ("{'a': __import__('os').system('touch PWNED')}", ":1:"),
        ("{'a': ['x'] + ['y']}", ":1:"),
        ("{'a': ['x']}\n{'b': []}", ":2:"),
        ("{'a': ['x'],\n 'a': ['y']}", "appears twice"),
        ("{'a': ['x'", "end of file"),
        ("['a', 'b']", ":1:1"),
    ],
)
def test_video2frames_rejects_non_literals(tmp_path, monkeypatch, text, where):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "video2frames.txt"
    p.write_text(text)
    with pytest.raises(ReleaseError) as e:
        _parse_all(p)
    assert str(p) in str(e.value) and where in str(e.value)
    assert not (tmp_path / "PWNED").exists()


# --------------------------------------------------------------------------------------
# BigFile
# --------------------------------------------------------------------------------------


def test_bigfile_lookup_shuffled_rows(tmp_path):
    rel = make_release(tmp_path, shuffle_rows=True, n_videos=6)
    with BigFile(rel.bigfile) as big:
        assert (big.n_rows, big.dim) == (rel.n_rows, 24)
        for vid, frames in rel.frame_ids.items():
            np.testing.assert_array_equal(big.rows[big.row_index(frames, vid)], rel.video_rows[vid])
        with pytest.raises(ReleaseError, match="does not have"):
            big.row_index(["nope_0"], "nope")


def test_bigfile_errors_name_the_file(tmp_path):
    rel = make_release(tmp_path, n_videos=6)
    feat = rel.bigfile / "feature.bin"
    data = feat.read_bytes()
    feat.write_bytes(data[:-4])
    with pytest.raises(ReleaseError, match=r"feature\.bin: .* bytes, but shape\.txt says"):
        BigFile(rel.bigfile)
    feat.write_bytes(data)
    ids = (rel.bigfile / "id.txt").read_text().split()
    (rel.bigfile / "id.txt").write_text(" ".join(ids[:-1]))
    with pytest.raises(ReleaseError, match=r"id\.txt: .* ids, but shape\.txt says"):
        BigFile(rel.bigfile)
    (rel.bigfile / "id.txt").write_text(" ".join([ids[1]] + ids[1:]))
    with pytest.raises(ReleaseError, match="duplicate frame ids"):
        BigFile(rel.bigfile)
    (rel.bigfile / "shape.txt").write_text("12")
    with pytest.raises(ReleaseError, match=r"shape\.txt: expected one line 'N D'"):
        BigFile(rel.bigfile)


# --------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_import_values_and_layout(tmp_path, shuffle):
    # video 1 has more teacher rows than student rows: stored as they are (the loader aligns)
    rel = make_release(tmp_path / "rel", n_videos=10, shuffle_rows=shuffle, clip_text_keys="mixed",
                       teacher_rows=lambda i, n: n + 3 if i == 1 else max(1, n - 1), extra_unreferenced_videos=2)
    out = tmp_path / "out"
    summary = run_import(rel, out, dims=dict(rel.dims))
    p = dataset_paths(out)
    for s in ("train", "val", "test"):
        caps = read_captions(p["captions"][s])
        assert [(c.cap_id, c.text) for c in caps] == rel.captions[s]
    sv = FeatureStore.open(p["student_video"], expect_dim=24)
    referenced = {v for s in ("train", "val", "test") for v in rel.videos(s)}
    assert set(sv.ids) == referenced  # unreferenced release videos are not imported
    for v in sv.ids:
        np.testing.assert_array_equal(sv.get(v), rel.video_rows[v])
        assert sv.get(v).dtype == np.float32
    cf = FeatureStore.open(p["clip_frames"], expect_dim=8)
    assert set(cf.ids) == referenced
    for v in cf.ids:
        np.testing.assert_array_equal(cf.get(v), rel.clip_video[v])
    v1 = list(rel.frame_ids)[1]
    assert len(cf.get(v1)) == len(sv.get(v1)) + 3
    st = FeatureStore.open(p["student_text"], expect_dim=12)
    ct = FeatureStore.open(p["clip_text"], expect_dim=8)
    all_caps = {c for s in ("train", "val", "test") for c, _ in rel.captions[s]}
    assert set(st.ids) == all_caps == set(ct.ids)  # '#enc#' and fallback '<vid>#<n>' keys both found
    for c in all_caps:
        np.testing.assert_array_equal(st.get(c), rel.text[c])
        np.testing.assert_array_equal(ct.get(c), rel.clip_text[c])
        assert ct.get(c).shape == (1, 8)
    first = rel.captions["train"][0][0]
    assert st.get(first).shape == (1, 12)  # a 1-token caption stays (1, D)
    assert cf.attrs["kind"] == "clip_frames" and not cf.attrs["random_weights"]
    saved = json.loads((out / "import" / "summary.json").read_text())
    assert saved["splits"]["train"]["captions"] == len(rel.captions["train"])
    assert saved["n_release_videos"] == 12 and saved["val_equals_test"] is False
    assert summary["bytes_read"] == sum(
        x.nbytes for d in (rel.video_rows, rel.text, rel.clip_video, rel.clip_text) for k, x in d.items()
        if k in all_caps or k in referenced
    )


def test_import_one_dimensional_datasets(tmp_path):
    """A 1-token caption stored as (D,) and a CLIP text vector stored as (D,) become (1, D)."""
    rel = make_release(tmp_path / "rel", n_videos=6)
    cap = rel.captions["train"][0][0]
    with h5py.File(rel.roberta, "a") as h:
        del h[cap]
        h.create_dataset(cap, data=rel.text[cap][0])
    with h5py.File(rel.clip_text_file, "a") as h:
        del h[cap]
        h.create_dataset(cap, data=rel.clip_text[cap][0].astype(np.float64))
    run_import(rel, tmp_path / "out")
    p = dataset_paths(tmp_path / "out")
    np.testing.assert_array_equal(FeatureStore.open(p["student_text"]).get(cap), rel.text[cap])
    np.testing.assert_array_equal(FeatureStore.open(p["clip_text"]).get(cap), rel.clip_text[cap])


def test_import_float16(tmp_path):
    rel = make_release(tmp_path / "rel", n_videos=6)
    run_import(rel, tmp_path / "out", dtype="float16")
    sv = FeatureStore.open(dataset_paths(tmp_path / "out")["student_video"])
    v = sv.ids[0]
    assert sv.get(v).dtype == np.float16
    np.testing.assert_allclose(sv.get(v).astype(np.float32), rel.video_rows[v], rtol=1e-3, atol=1e-3)


def test_root_may_be_the_visualsearch_parent(tmp_path):
    rel = make_release(tmp_path / "VisualSearch", "charades", n_videos=6)
    lay = ReleaseLayout.from_source({"format": "msrl", "root": str(tmp_path / "VisualSearch"), "collection": "charades"})
    assert lay.root == rel.root and lay.visual_feature == "i3d_rgb_lgi"
    assert lay.missing() == []


def test_val_equals_test_warns_loudly(tmp_path, caplog):
    rel = make_release(tmp_path / "rel", n_videos=8, val_equals_test=True)
    with caplog.at_level(logging.WARNING, logger="prvr.data.msrl"):
        s = run_import(rel, tmp_path / "out")
    assert s["val_equals_test"] is True
    assert any("IDENTICAL" in r.message and "test set" in r.message for r in caplog.records)
    assert any("IDENTICAL" in w for w in s["warnings"])


def test_missing_files_listed_with_how_to_produce_the_teacher(tmp_path):
    rel = make_release(tmp_path / "rel", n_videos=6, clip=False)
    (rel.bigfile / "video2frames.txt").unlink()
    with pytest.raises(MissingReleaseFiles) as e:
        run_import(rel, tmp_path / "out")
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    for p in (rel.clip_text_file, rel.clip_video_file, rel.bigfile / "video2frames.txt"):
        assert str(p) in msg
    assert "videos:" in msg and "source.teacher: videos" in msg and "prvr.data.msrl export" in msg
    assert not (tmp_path / "out").exists()  # nothing written


def test_teacher_from_videos_mode_imports_students_only(tmp_path):
    rel = make_release(tmp_path / "rel", n_videos=6, clip=False)
    s = run_import(rel, tmp_path / "out", teacher="videos")
    p = dataset_paths(tmp_path / "out")
    assert set(s["stores"]) == {"student_video", "student_text"}
    assert FeatureStore.open(p["student_video"]).ids and not p["clip_frames"].exists()


def _drop_video(rel, vid):
    """Remove one video from video2frames.txt (its rows stay in feature.bin)."""
    frames = {k: v for k, v in rel.frame_ids.items() if k != vid}
    (rel.bigfile / "video2frames.txt").write_text(repr(frames))


def test_missing_videos_error_lists_them(tmp_path):
    rel = make_release(tmp_path / "rel", n_videos=8)
    gone = [rel.videos("train")[0], rel.videos("test")[0]]
    for v in gone:
        _drop_video(rel, v)
        rel.frame_ids.pop(v)
    with pytest.raises(ReleaseError) as e:
        run_import(rel, tmp_path / "out")
    assert all(v in str(e.value) for v in gone) and "missing_videos: skip" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_missing_videos_skip_drops_their_captions(tmp_path, caplog):
    rel = make_release(tmp_path / "rel", n_videos=8)
    gone = rel.videos("train")[0]
    _drop_video(rel, gone)
    with caplog.at_level(logging.WARNING, logger="prvr.data.msrl"):
        s = run_import(rel, tmp_path / "out", missing_videos="skip")
    p = dataset_paths(tmp_path / "out")
    kept = read_captions(p["captions"]["train"])
    assert all(c.video_id != gone for c in kept)
    assert len(kept) == len(rel.captions["train"]) - sum(c.startswith(gone + "#") for c, _ in rel.captions["train"])
    assert gone not in FeatureStore.open(p["student_video"])
    assert any("skipped" in w for w in s["warnings"]) and any("skipped" in r.message for r in caplog.records)


def test_training_video_without_teacher(tmp_path):
    rel = make_release(tmp_path / "rel", n_videos=8)
    vid = rel.videos("train")[1]
    with h5py.File(rel.clip_video_file, "a") as h:
        del h[vid]
    with pytest.raises(ReleaseError, match=f"training video.*CLIP teacher file.*{vid}"):
        run_import(rel, tmp_path / "out")
    run_import(rel, tmp_path / "out", missing_videos="skip")
    assert vid not in FeatureStore.open(dataset_paths(tmp_path / "out")["student_video"])


def test_test_captions_without_clip_text_warn(tmp_path):
    """The reference extracted CLIP text for train and val only: test captions may lack it."""
    rel = make_release(tmp_path / "rel", n_videos=8, clip_text_splits=("train", "val"))
    s = run_import(rel, tmp_path / "out")
    ct = FeatureStore.open(dataset_paths(tmp_path / "out")["clip_text"])
    assert len(ct) == len(rel.captions["train"]) + len(rel.captions["val"])
    assert any("teacher features missing" in w for w in s["warnings"])


def test_missing_text_features_listed(tmp_path):
    rel = make_release(tmp_path / "rel", n_videos=6)
    cap = rel.captions["test"][0][0]
    with h5py.File(rel.roberta, "a") as h:
        del h[cap]
    with pytest.raises(ReleaseError, match=f"1 caption id.*roberta_tvr_query_feat.hdf5.*{cap}"):
        run_import(rel, tmp_path / "out")


@pytest.mark.parametrize(
    "dims, where",
    [
        ({"student_video": 3072}, "shape.txt: student video features are 24-d, but the config says datasets.ds.source.dims.student_video = 3072"),
        ({"student_text": 768}, "roberta_tvr_query_feat.hdf5: student text features are 12-d, but the config says datasets.ds.source.dims.student_text = 768"),
        ({"clip": 512}, "features are 8-d, but the config says datasets.ds.source.dims.clip = 512"),
    ],
)
def test_dims_that_disagree_with_the_config(tmp_path, dims, where):
    rel = make_release(tmp_path / "rel", n_videos=6)
    with pytest.raises(ReleaseError) as e:
        run_import(rel, tmp_path / "out", dims=dims)
    assert where in str(e.value)


def test_inconsistent_dims_inside_a_file(tmp_path):
    rel = make_release(tmp_path / "rel", n_videos=6)
    cap = rel.captions["val"][0][0]
    with h5py.File(rel.roberta, "a") as h:
        del h[cap]
        h.create_dataset(cap, data=np.zeros((3, 13), np.float32))
    with pytest.raises(ReleaseError, match=f"dataset '{cap}' has shape \\(3, 13\\)"):
        run_import(rel, tmp_path / "out")


def test_clip_text_with_several_rows_is_an_error(tmp_path):
    rel = make_release(tmp_path / "rel", n_videos=6)
    cap = rel.captions["train"][0][0]
    with h5py.File(rel.clip_text_file, "a") as h:
        del h[cap]
        h.create_dataset(cap, data=np.zeros((2, 8), np.float32))
    with pytest.raises(ReleaseError, match="a CLIP text vector is one row"):
        run_import(rel, tmp_path / "out")


# --------------------------------------------------------------------------------------
# export and round trip
# --------------------------------------------------------------------------------------


def _h5_values(path):
    with h5py.File(path, "r") as h:
        return {k: h[k][()] for k in h}


def test_round_trip_bytes_and_values(tmp_path):
    """write (generated release) -> import -> export -> compare bytes (text/BigFile) and values (HDF5)."""
    rel = make_release(tmp_path / "rel", "activitynet", n_videos=12, val_equals_test=True,
                       teacher_rows=lambda i, n: n + 2 if i % 3 == 0 else n)
    run_import(rel, tmp_path / "out")
    exp = export_dataset(tmp_path / "out", tmp_path / "exp", "activitynet", "i3d")
    assert exp == tmp_path / "exp" / "activitynet"
    same = [
        f"TextData/activitynet{s}.caption.txt" for s in ("train", "val", "test")
    ] + [f"FeatureData/i3d/{n}" for n in ("feature.bin", "id.txt", "shape.txt", "video2frames.txt")]
    for f in same:
        assert (exp / f).read_bytes() == (rel.root / f).read_bytes(), f
    for f in ("TextData/roberta_activitynet_query_feat.hdf5", "TextData/clip_ViT_B_32_activitynet_query_feat.hdf5",
              "FeatureData/new_clip_vit_32_activitynet_vid_features.hdf5"):
        a, b = _h5_values(rel.root / f), _h5_values(exp / f)
        assert set(a) == set(b), f
        for k in a:
            assert a[k].dtype == b[k].dtype == np.float32
            np.testing.assert_array_equal(a[k], b[k])
    # and the export imports again to the same stores
    run_import(type(rel)(**{**rel.__dict__, "root": exp}), tmp_path / "out2")
    for name in ("student_video", "clip_frames", "student_text", "clip_text"):
        s1 = FeatureStore.open(dataset_paths(tmp_path / "out")[name])
        s2 = FeatureStore.open(dataset_paths(tmp_path / "out2")[name])
        assert set(s1.ids) == set(s2.ids)
        for i in s1.ids:
            np.testing.assert_array_equal(s1.get(i), s2.get(i))


def test_round_trip_values_of_a_non_canonical_release(tmp_path):
    """Shuffled rows and fallback CLIP text keys: values survive, layout becomes canonical."""
    rel = make_release(tmp_path / "rel", n_videos=8, shuffle_rows=True, clip_text_keys="fallback")
    run_import(rel, tmp_path / "out")
    exp = export_dataset(tmp_path / "out", tmp_path / "exp", "tvr", "i3d_resnet")
    got = dict(iter_video2frames(exp / "FeatureData/i3d_resnet/video2frames.txt"))
    with BigFile(exp / "FeatureData/i3d_resnet") as big:
        for vid, frames in got.items():
            assert frames == [f"{vid}_{i}" for i in range(len(frames))]
            np.testing.assert_array_equal(big.rows[big.row_index(frames, vid)], rel.video_rows[vid])
    ct = _h5_values(exp / "TextData/clip_ViT_B_32_tvr_query_feat.hdf5")
    assert set(ct) == set(rel.clip_text)  # written under the caption ids
    for k, v in rel.clip_text.items():
        np.testing.assert_array_equal(ct[k], v)


def test_export_of_a_video_dataset_float16_stores(tmp_path):
    """A raw-video dataset (float16 stores, n_t == n_s) exports as float32 in the release layout."""
    rng = np.random.default_rng(0)
    d = tmp_path / "results" / "demo"
    p = dataset_paths(d)
    vids = ["vidA", "vidB", "vidC"]
    for s, vs in (("train", vids[:2]), ("val", vids[2:]), ("test", vids[2:])):
        p["captions"][s].parent.mkdir(parents=True, exist_ok=True)
        p["captions"][s].write_text("".join(f"{v}#enc#0 a person does a thing\n" for v in vs))
    caps = [f"{v}#enc#0" for v in vids]
    video = {v: rng.standard_normal((k + 2, 16)).astype(np.float16) for k, v in enumerate(vids)}
    frames = {v: rng.standard_normal((k + 2, 8)).astype(np.float16) for k, v in enumerate(vids)}
    text = {c: rng.standard_normal((k + 1, 6)).astype(np.float16) for k, c in enumerate(caps)}
    ctext = {c: rng.standard_normal((1, 8)).astype(np.float16) for c in caps}
    write_store(p["student_video"], video.items(), 16, "float16")
    write_store(p["clip_frames"], frames.items(), 8, "float16")
    write_store(p["student_text"], text.items(), 6, "float16")
    write_store(p["clip_text"], ctext.items(), 8, "float16")
    assert main(["export", "--dataset-dir", str(d), "--out", str(tmp_path / "VS"), "--collection", "demo",
                 "--visual-feature", "prvr_clip"]) == 0
    root = tmp_path / "VS" / "demo"
    assert (root / "FeatureData/prvr_clip/shape.txt").read_text() == "9 16"
    with BigFile(root / "FeatureData/prvr_clip") as big:
        for v, frames_ in iter_video2frames(root / "FeatureData/prvr_clip/video2frames.txt"):
            np.testing.assert_array_equal(big.rows[big.row_index(frames_, v)], video[v].astype(np.float32))
    cv = _h5_values(root / "FeatureData/new_clip_vit_32_demo_vid_features.hdf5")
    assert all(cv[v].dtype == np.float32 and np.array_equal(cv[v], frames[v].astype(np.float32)) for v in vids)
    # prvr's own release imports back
    lay_src = {"format": "msrl", "root": str(tmp_path / "VS"), "collection": "demo", "visual_feature": "prvr_clip",
               "dims": {"student_video": 16, "student_text": 6, "clip": 8}}
    _, big, plan = plan_import(lay_src)
    big.close()
    assert plan.videos == vids


def test_export_is_atomic_and_replaces(tmp_path):
    rel = make_release(tmp_path / "rel", n_videos=6)
    run_import(rel, tmp_path / "out")
    p = dataset_paths(tmp_path / "out")
    out = export_release(tmp_path / "exp", "tvr", p["captions"], p["student_video"], p["student_text"])
    assert not (out / "TextData/clip_ViT_B_32_tvr_query_feat.hdf5").exists()  # no teacher given
    (out / "stale.txt").write_text("old")
    export_release(tmp_path / "exp", "tvr", p["captions"], p["student_video"], p["student_text"], p["clip_frames"], p["clip_text"])
    assert not (out / "stale.txt").exists() and (out / "TextData/clip_ViT_B_32_tvr_query_feat.hdf5").exists()
    assert [q.name for q in (tmp_path / "exp").iterdir()] == ["tvr"]  # no temp folders left


def test_cli_check_and_import(tmp_path, capsys):
    rel = make_release(tmp_path / "rel", n_videos=6)
    assert main(["check", "--root", str(rel.base), "--collection", "tvr"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["captions"] == len(rel.captions["train"])
    assert main(["import", "--root", str(rel.root), "--collection", "tvr", "--out", str(tmp_path / "o")]) == 0
    assert FeatureStore.open(tmp_path / "o/features/student_video.zarr").ids
    assert main(["check", "--root", str(tmp_path / "nothing"), "--collection", "tvr"]) == 1
    assert "missing files" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# presets and config
# --------------------------------------------------------------------------------------

PAPER = {  # method spec §7.1, DL-DKD++
    "tvr": {"R@1": 15.3, "R@5": 36.0, "R@10": 47.5, "R@100": 86.0, "SumR": 184.8},
    "activitynet": {"R@1": 8.3, "R@5": 25.5, "R@10": 38.3, "R@100": 77.8, "SumR": 149.9},
    "charades": {"R@1": 1.9, "R@5": 7.1, "R@10": 12.3, "R@100": 49.8, "SumR": 71.1},
}
HYPER = {  # method spec §6.2
    "tvr": {"lr": 3e-4, "drop": 0.2, "input_drop": 0.2, "margin": 0.1, "dims": (3072, 768)},
    "activitynet": {"lr": 2.5e-4, "drop": 0.25, "input_drop": 0.25, "margin": 0.2, "dims": (1024, 1024)},
    "charades": {"lr": 2.4e-4, "drop": 0.15, "input_drop": 0.15, "margin": 0.2, "dims": (1024, 1024)},
}


@pytest.mark.parametrize("name", ["tvr", "activitynet", "charades"])
def test_presets_validate_and_match_the_spec(name):
    from prvr.config import TrainConfig, dataset_config, deep_merge, load_config

    preset = yaml.safe_load((ROOT / "config/datasets" / f"{name}.yaml").read_text())
    cfg = load_config(ROOT / "config/config.yaml", overrides=preset)  # what --configfile does
    assert cfg["targets"] == [name]
    ds = cfg["datasets"][name]
    assert ds["source"]["collection"] == name and ds["source"]["missing_videos"] == "error"
    assert ds["expected"] == PAPER[name]
    tc = TrainConfig.from_dict(dataset_config(cfg, name)["train"])
    h = HYPER[name]
    assert (tc.lr, tc.drop, tc.input_drop, tc.margin) == (h["lr"], h["drop"], h["input_drop"], h["margin"])
    assert (tc.batch_size, tc.n_epoch, tc.max_es_cnt, tc.seed, tc.hidden, tc.n_heads) == (128, 120, 10, 9527, 384, 4)
    assert (ds["source"]["dims"]["student_video"], ds["source"]["dims"]["student_text"]) == h["dims"]
    assert ReleaseLayout.from_source(ds["source"]).visual_feature == {"tvr": "i3d_resnet", "activitynet": "i3d",
                                                                       "charades": "i3d_rgb_lgi"}[name]
    assert deep_merge(cfg, {})["datasets"]["demo"]  # the demo dataset stays defined


def test_schema_source_rules():
    from prvr.config import ConfigError, load_config

    base = ROOT / "config/config.yaml"
    with pytest.raises(ConfigError, match="captions"):
        load_config(base, overrides={"datasets": {"x": {"train": {}}}})
    with pytest.raises(ConfigError, match="datasets.x.source"):
        load_config(base, overrides={"datasets": {"x": {"source": {"format": "msrl", "root": "r"}}}})
    with pytest.raises(ConfigError, match="datasets.x.source.missing_videos"):
        load_config(base, overrides={"datasets": {"x": {"source": {"format": "msrl", "root": "r", "collection": "tvr",
                                                                    "missing_videos": "ignore"}}}})
    cfg = load_config(base, overrides={"datasets": {"x": {"source": {"format": "msrl", "root": "r", "collection": "tvr"}}}})
    assert cfg["datasets"]["x"]["source"]["teacher"] == "release"


# --------------------------------------------------------------------------------------
# the workflow: presets end to end on tiny generated releases
# --------------------------------------------------------------------------------------

TINY_DIMS = {"student_video": 24, "student_text": 12, "clip": 8}
TINY_TRAIN = {"n_epoch": 2, "batch_size": 4, "hidden": 32, "progress": False}


def _tiny_releases(work: Path) -> dict:
    """One tiny release per preset, at the presets' default roots, each with an edge case."""
    base = work / "data" / "VisualSearch"
    return {
        # 9 training videos, batch 4: the last training batch has a single video; one video has
        # more teacher rows than student rows; a 1-token caption in train and in test
        "tvr": make_release(base, "tvr", n_videos=12, val_equals_test=True, seed=1, one_token=("train", "test"),
                            teacher_rows=lambda i, n: n + 4 if i in (1, 10) else n),
        # a test split of a single query (so every evaluation batch holds one query)
        "activitynet": make_release(base, "activitynet", n_videos=10, test_queries=1, seed=2,
                                    teacher_rows=lambda i, n: max(1, n - 2)),
        # shuffled BigFile rows, fallback CLIP text keys, an unreferenced video
        "charades": make_release(base, "charades", n_videos=10, seed=3, shuffle_rows=True,
                                 clip_text_keys="fallback", extra_unreferenced_videos=1),
    }


def _tiny_override(names, **train) -> dict:
    return {
        "targets": list(names),
        "datasets": {n: {"source": {"dims": TINY_DIMS}, "train": {**TINY_TRAIN, **train}} for n in names},
    }


def test_preset_without_release_fails_listing_files(tmp_path):
    from workflow_utils import copy_repo, snakemake

    work = copy_repo(tmp_path / "repo")
    proc = snakemake(work, "-n", "--configfile", "config/datasets/charades.yaml", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "data/VisualSearch/charades/FeatureData/i3d_rgb_lgi/feature.bin" in out
    assert "new_clip_vit_32_charades_vid_features.hdf5" in out and "source.teacher: videos" in out


@pytest.mark.slow
def test_presets_end_to_end(tmp_path):
    """import -> teacher -> train -> evaluate -> report for the three presets in one run, then export."""
    pytest.importorskip("prvr.train")
    pytest.importorskip("prvr.teacher")
    pytest.importorskip("prvr.evaluate")
    from workflow_utils import copy_repo, planned_jobs, snakemake

    work = copy_repo(tmp_path / "repo")
    rels = _tiny_releases(work)
    names = list(rels)
    (work / "tiny.yaml").write_text(yaml.safe_dump(_tiny_override(names)))
    cfgs = [f"config/datasets/{n}.yaml" for n in names] + ["tiny.yaml"]
    # a preset alone plans import -> teacher -> train -> evaluate -> report (one is enough: the
    # run below uses all three preset files)
    (work / "tiny_tvr.yaml").write_text(yaml.safe_dump(_tiny_override(["tvr"])))
    jobs = planned_jobs(work, "--configfile", "config/datasets/tvr.yaml", "tiny_tvr.yaml")
    assert {"import_release", "teacher_similarity", "train", "evaluate", "report"} <= set(jobs), jobs
    assert "probe_videos" not in jobs and "student_text" not in jobs
    proc = snakemake(work, "--cores", "2", "--configfile", *cfgs)
    assert "IDENTICAL" in proc.stderr + proc.stdout  # tvr's val == test, said on the console
    for n in names:
        m = json.loads((work / f"results/{n}/eval/dldkdpp/test_metrics.json").read_text())
        assert 0 <= m["SumR"] <= 400
        report = (work / f"results/{n}/report.md").read_text()
        assert "CLIP teacher alone" in report and "paper (expected)" in report
        paper = " | ".join(f"{v:.1f}" for v in PAPER[n].values())
        assert f"| paper (expected) | {paper} |" in report
        summary = json.loads((work / f"results/{n}/import/summary.json").read_text())
        assert summary["splits"]["train"]["captions"] == len(rels[n].captions["train"])
    assert json.loads((work / "results/activitynet/eval/dldkdpp/test_metrics.json").read_text())["R@1"] in (0.0, 100.0)
    assert planned_jobs(work, "--configfile", *cfgs) == {}  # nothing left to do
    # export the imported tvr back to the release layout (rule export_release)
    snakemake(work, "results/tvr/export/VisualSearch", "--cores", "1", "--configfile", *cfgs)
    exp = work / "results/tvr/export/VisualSearch/tvr"
    for f in ("FeatureData/i3d_resnet/feature.bin", "FeatureData/i3d_resnet/video2frames.txt", "TextData/tvrtest.caption.txt"):
        assert (exp / f).read_bytes() == (rels["tvr"].root / f).read_bytes(), f


def test_export_names():
    from prvr.data.msrl import export_names

    assert export_names("mine", {"student_video": [{"kind": "i3d"}, {"kind": "resnet"}]}) == ("mine", "prvr_i3d_resnet")
    src = {"format": "msrl", "root": "x", "collection": "activitynet"}
    assert export_names("anet", {"source": src}) == ("activitynet", "i3d")


def test_video2frames_frame_unknown_to_id_txt(tmp_path):
    rel = make_release(tmp_path / "rel", n_videos=6)
    vid = rel.videos("train")[0]
    frames = dict(rel.frame_ids)
    frames[vid] = frames[vid] + [f"{vid}_999"]
    (rel.bigfile / "video2frames.txt").write_text(repr(frames))
    with pytest.raises(ReleaseError, match=f"video '{vid}' lists 1 frame id.*id.txt does not have.*{vid}_999"):
        run_import(rel, tmp_path / "out")
