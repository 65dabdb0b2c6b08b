import numpy as np
import pytest

from prvr.store import FeatureStore, StoreError, StoreWriter, write_store


def test_roundtrip_ragged(tmp_path):
    rng = np.random.default_rng(0)
    items = [(f"v{i}", rng.standard_normal((n, 5)).astype("float32")) for i, n in enumerate([3, 0, 7, 20000, 1])]
    write_store(tmp_path / "a.zarr", items, dim=5, attrs={"model": "x"})
    s = FeatureStore.open(tmp_path / "a.zarr", expect_dim=5)
    assert s.ids == [k for k, _ in items]
    assert list(s.lengths) == [3, 0, 7, 20000, 1]
    for k, v in items:
        np.testing.assert_array_equal(s[k], v)
    np.testing.assert_array_equal(s.load(), np.concatenate([v for _, v in items]))
    assert s.attrs["model"] == "x"


def test_timestamps_and_float16(tmp_path):
    with StoreWriter(tmp_path / "b.zarr", 2, dtype="float16", timestamps=True) as w:
        w.append("a", np.ones((2, 2)), [0.5, 1.5])
        w.append("b", np.zeros((1, 2)), [0.5])
    s = FeatureStore.open(tmp_path / "b.zarr")
    assert s["a"].dtype == np.float16
    np.testing.assert_allclose(s.timestamps("a"), [0.5, 1.5])
    np.testing.assert_allclose(s.timestamps(), [0.5, 1.5, 0.5])


def test_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path / "c.zarr", 2) as w:
            w.append("a", np.ones((2, 2)))
            raise RuntimeError("killed")
    assert not (tmp_path / "c.zarr").exists()
    assert not list(tmp_path.iterdir())


def test_incomplete_store_is_refused(tmp_path):
    w = StoreWriter(tmp_path / "d.zarr", 2)
    w.append("a", np.ones((2, 2)))
    w._flush(final=True)
    with pytest.raises(StoreError, match="does not exist"):
        FeatureStore.open(tmp_path / "d.zarr")
    with pytest.raises(StoreError, match="not a complete"):
        FeatureStore.open(w.tmp)


def test_errors_name_the_problem(tmp_path):
    write_store(tmp_path / "e.zarr", [("a", np.ones((1, 3)))], dim=3)
    with pytest.raises(StoreError, match="dimension 3, but 4"):
        FeatureStore.open(tmp_path / "e.zarr", expect_dim=4, name="clip_frames")
    with pytest.raises(StoreError, match="shape"):
        write_store(tmp_path / "f.zarr", [("a", np.ones((1, 2)))], dim=3)
    with pytest.raises(StoreError, match="duplicate"):
        write_store(tmp_path / "g.zarr", [("a", np.ones((1, 3))), ("a", np.ones((1, 3)))], dim=3)


def test_rewrite_replaces(tmp_path):
    write_store(tmp_path / "h.zarr", [("a", np.ones((1, 3)))], dim=3)
    write_store(tmp_path / "h.zarr", [("b", np.zeros((2, 3)))], dim=3)
    assert FeatureStore.open(tmp_path / "h.zarr").ids == ["b"]


def test_uid_changes_on_rewrite_and_chunks_scale_with_dim(tmp_path):
    write_store(tmp_path / "u.zarr", [("a", np.ones((1, 3)))], dim=3)
    first = FeatureStore.open(tmp_path / "u.zarr").uid
    write_store(tmp_path / "u.zarr", [("a", np.ones((1, 3)))], dim=3)
    assert first and FeatureStore.open(tmp_path / "u.zarr").uid != first
    assert StoreWriter(tmp_path / "w1.zarr", 3072).chunk_rows == 341
    assert StoreWriter(tmp_path / "w2.zarr", 64, dtype="float16").chunk_rows == 8192
