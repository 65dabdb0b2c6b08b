import json

import numpy as np
import pytest
import torch

from prvr import demo
from prvr.data.captions import CaptionError
from prvr.encoders.clip import ModelLoadError, load_clip
from prvr.encoders.text import encode_clip_text, encode_student_text, load_text_encoder
from prvr.store import FeatureStore

torch.set_num_threads(2)

LONG = " ".join(["the green square moves to the left and then"] * 8)  # > 32 tokens
TRAIN = [
    ("v1#enc#0", "a red circle moves left"),
    ("v1#enc#1", "the blue square grows"),
    ("v2#enc#0", LONG),
    ("v2#enc#1", "zebra"),  # short, out-of-vocabulary word
]
VAL = [("v3#enc#0", "a yellow triangle blinks on a striped background"), ("v3#enc#1", "the white circle shrinks")]


def _write(path, rows):
    path.write_text("".join(f"{i} {t}\n" for i, t in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    models = root / "models"
    demo._make_clip_dir(models / "clip", demo.CLIP_CONFIG, seed=0)
    demo._make_roberta_dir(models / "roberta", seed=2)
    files = [_write(root / "train.caption.txt", TRAIN), _write(root / "val.caption.txt", VAL)]
    return root, models, files


def test_student_text_store(setup, tmp_path):
    root, models, files = setup
    cfg = {"model": str(models / "roberta"), "max_tokens": 32, "batch_size": 2}
    info = encode_student_text(files, cfg, tmp_path / "st.zarr", device="cpu")
    st = FeatureStore.open(tmp_path / "st.zarr", expect_dim=64)
    assert st.ids == [i for i, _ in TRAIN + VAL]  # file order, one item per caption
    assert info["n_items"] == 6 and info["n_rows"] == int(st.lengths.sum())
    assert st.attrs["random_weights"] is True and st.attrs["kind"] == "student_text"
    assert st.attrs["special_tokens"] is True and "torch" in st.attrs["versions"]
    tok, model, _ = load_text_encoder(models / "roberta")
    for cap_id, text in TRAIN + VAL:
        ids = tok(text)["input_ids"]
        n = min(len(ids), 32)
        rows = st.get(cap_id)
        assert rows.shape == (n, 64), cap_id
        # direct, unpadded model call on the (truncated) caption
        direct_ids = ids[: n - 1] + [tok.eos_token_id] if len(ids) > 32 else ids
        with torch.inference_mode():
            ref = model(input_ids=torch.tensor([direct_ids])).last_hidden_state[0].numpy()
        np.testing.assert_allclose(rows, ref, atol=2e-5, rtol=1e-4)
    assert len(st.get("v2#enc#0")) == 32  # the long caption was capped

    # special_tokens: false drops the <s>/</s> rows only
    cfg2 = {**cfg, "special_tokens": False}
    encode_student_text(files, cfg2, tmp_path / "st2.zarr", device="cpu", dtype="float16")
    st2 = FeatureStore.open(tmp_path / "st2.zarr")
    assert st2.rows().dtype == np.float16 and st2.attrs["special_tokens"] is False
    for cap_id in st.ids:
        np.testing.assert_allclose(st2.get(cap_id).astype(np.float32), st.get(cap_id)[1:-1], atol=2e-2)


def test_clip_text_store(setup, tmp_path):
    root, models, files = setup
    cfg = {"model": f"local-dir:{models / 'clip'}", "pretrained": None, "batch_size": 4}
    info = encode_clip_text(files, cfg, tmp_path / "ct.zarr", device="cpu")
    st = FeatureStore.open(tmp_path / "ct.zarr", expect_dim=64)
    assert info["n_items"] == 6 and st.ids == [i for i, _ in TRAIN + VAL]
    assert list(st.lengths) == [1] * 6
    assert st.attrs["random_weights"] is True and st.attrs["normalised"] is False
    b = load_clip(f"local-dir:{models / 'clip'}")
    with torch.inference_mode():
        for cap_id, text in TRAIN + VAL:
            tokens = b.tokenizer([text])
            assert tokens.shape == (1, 77)
            ref = b.model.encode_text(tokens).numpy()
            np.testing.assert_allclose(st.get(cap_id), ref, atol=1e-5, rtol=1e-4)
    assert np.linalg.norm(st.get("v1#enc#0")) != pytest.approx(1.0, abs=1e-3)  # raw, not normalised


def test_clip_text_refuses_random_weights_without_marker(setup, tmp_path):
    _, _, files = setup
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(demo.CLIP_CONFIG))
    with pytest.raises(ModelLoadError, match="no weights"):
        encode_clip_text(files, {"model": f"local-dir:{folder}"}, tmp_path / "x.zarr", device="cpu")
    assert not (tmp_path / "x.zarr").exists()


def test_errors_name_the_problem(setup, tmp_path):
    root, models, files = setup
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match="no_such_model"):
        load_text_encoder(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        encode_student_text(files, {"model": str(tmp_path / "empty")}, tmp_path / "a.zarr", device="cpu")
    dup = _write(tmp_path / "dup.caption.txt", [TRAIN[0]])
    with pytest.raises(CaptionError, match="dup.caption.txt"):
        encode_student_text(files + [dup], {"model": str(models / "roberta")}, tmp_path / "b.zarr", device="cpu")
    with pytest.raises(ModelLoadError, match="max_tokens"):
        encode_student_text(
            files, {"model": str(models / "roberta"), "max_tokens": 999}, tmp_path / "c.zarr", device="cpu"
        )
    for name in ("a.zarr", "b.zarr", "c.zarr"):
        assert not (tmp_path / name).exists()
