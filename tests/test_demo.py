import json
from collections import Counter
from pathlib import Path

import decord
import numpy as np
import pytest
import torch

from prvr import demo
from prvr.data.captions import read_captions
from prvr.encoders.clip import RANDOM_MARKER, load_clip, state_digest

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    info = demo.make_demo_dataset(out, n_videos=6, seed=3)
    return out, info


def _decode(path):
    vr = decord.VideoReader(str(path))
    return vr.get_batch(list(range(len(vr)))).asnumpy(), vr.get_avg_fps()


def _all_captions(out):
    return {s: read_captions(out / f"demo{s}.caption.txt") for s in ("train", "val", "test")}


def test_structure(ds):
    out, info = ds
    caps = _all_captions(out)
    man = json.loads((out / "demo.json").read_text())
    vids = {v["video_id"]: v for v in man["videos"]}
    split_vids = {s: {c.video_id for c in cs} for s, cs in caps.items()}
    # every video in exactly one split, all splits non-empty
    assert all(split_vids.values())
    assert sum(len(v) for v in split_vids.values()) == len(vids) == 6
    assert split_vids["train"] | split_vids["val"] | split_vids["test"] == set(vids)
    assert not split_vids["val"] & split_vids["test"] and not split_vids["train"] & (
        split_vids["val"] | split_vids["test"]
    )
    per_video = Counter(c.video_id for cs in caps.values() for c in cs)
    assert all(2 <= n <= 5 for n in per_video.values())
    moments = demo.read_moments(out / "moments.tsv")
    assert set(moments) == {c.cap_id for cs in caps.values() for c in cs}
    assert info["n_captions"] == len(moments)
    for cs in caps.values():
        for c in cs:
            vid, k = c.cap_id.split("#enc#")
            assert vid == c.video_id and k.isdigit()
            assert c.video_id not in c.text  # captions never name their video
    for vid, v in vids.items():
        evs = v["events"]
        assert len({e["colour"] for e in evs}) == len(evs)  # distinct events
        for k, e in enumerate(evs):
            mv, start, end = moments[f"{vid}#enc#{k}"]
            assert mv == vid and 0 <= start < end <= v["duration"]
            if k:
                assert start >= moments[f"{vid}#enc#{k - 1}"][2]  # events do not overlap
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_videos_decode_and_show_the_events(ds):
    out, _ = ds
    man = json.loads((out / "demo.json").read_text())
    for v in man["videos"]:
        frames, fps = _decode(out / "videos" / f"{v['video_id']}.mp4")
        assert fps == pytest.approx(demo.FPS)
        assert frames.shape == (v["n_frames"], demo.HEIGHT, demo.WIDTH, 3)
        assert len(frames) == pytest.approx(v["duration"] * demo.FPS)
        assert demo.MIN_SECONDS <= v["duration"] <= demo.MAX_SECONDS
        covered = np.zeros(len(frames), bool)
        for e in v["events"]:
            covered[e["start_frame"] : e["end_frame"]] = True
            f = frames[e["start_frame"]].astype(int)  # first frame: visible for every action
            close = np.abs(f - np.array(demo.COLOURS[e["colour"]])).max(-1) < 40
            assert close.sum() > 20, (v["video_id"], e)  # the smallest shape covers ~60 px
        # outside the events only the muted background: no saturated pixels
        quiet = frames[~covered].astype(int)
        if len(quiet):
            assert (quiet.max(-1) - quiet.min(-1)).max() < 60


def test_deterministic(ds, tmp_path):
    out, _ = ds
    again = demo.make_demo_dataset(tmp_path / "again", n_videos=6, seed=3)
    for name in ("demotrain.caption.txt", "demoval.caption.txt", "demotest.caption.txt", "moments.tsv", "demo.json"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    for p in sorted((out / "videos").iterdir()):
        a, _ = _decode(p)
        b, _ = _decode(again["videos"] / p.name)
        assert np.array_equal(a, b), p.name
    other = demo.make_demo_dataset(tmp_path / "other", n_videos=6, seed=4, captions_dir=tmp_path / "other" / "caps")
    assert other["captions"]["train"].parent == tmp_path / "other" / "caps"
    assert other["captions"]["train"].read_bytes() != (out / "demotrain.caption.txt").read_bytes()


def test_rewrite_in_place_and_bad_args(tmp_path):
    a = demo.make_demo_dataset(tmp_path, n_videos=3, seed=0)
    assert sorted(p.name for p in a["videos"].iterdir()) == ["demo0000.mp4", "demo0001.mp4", "demo0002.mp4"]
    b = demo.make_demo_dataset(tmp_path, n_videos=4, seed=0)
    assert len(list(b["videos"].iterdir())) == 4 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="n_videos"):
        demo.make_demo_dataset(tmp_path / "x", n_videos=2)


def test_split_sizes_and_vocabulary():
    ids = [f"v{i}" for i in range(40)]
    s = demo.split_videos(ids, 0)
    assert [len(s[k]) for k in ("train", "val", "test")] == [24, 8, 8]
    assert s == demo.split_videos(ids, 0) and s != demo.split_videos(ids, 1)
    # captions share one vocabulary across videos: every word of every caption is a demo word
    vocab = {w for t in demo.demo_vocabulary_texts() for w in t.split()}
    words = Counter(w for i in range(40) for e in demo.describe_video(0, i).events for w in e.caption.split())
    assert set(words) <= vocab
    assert sum(n > 1 for n in words.values()) / len(words) > 0.9


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    return out, demo.make_demo_models(out, seed=0)


def test_demo_models_load_through_real_paths(models):
    from prvr.encoders.text import load_text_encoder

    out, info = models
    for name in ("clip", "student_clip", "roberta"):
        assert (out / name / RANDOM_MARKER).exists()
        assert "RANDOM" in (out / name / RANDOM_MARKER).read_text()
    teacher = load_clip(f"local-dir:{out / 'clip'}")
    student = load_clip(f"local-dir:{out / 'student_clip'}")
    assert teacher.identity["random_weights"] and student.identity["random_weights"]
    assert teacher.embed_dim == 64 and student.embed_dim == 128 and teacher.image_size == 64
    assert teacher.identity["weights_sha256"] != student.identity["weights_sha256"]
    assert info["clip"]["params"] == sum(p.numel() for p in teacher.model.parameters())
    with torch.inference_mode():
        img = torch.rand(2, 3, 64, 64)
        assert teacher.model.encode_image(img).shape == (2, 64)
        assert student.model.encode_image(img).shape == (2, 128)
    tok, model, ident = load_text_encoder(out / "roberta")
    assert ident["random_weights"] and ident["hidden_size"] == 64 and ident["model_type"] == "roberta"
    ids = tok("the red circle moves to the left")["input_ids"]
    assert ids[0] == tok.bos_token_id == 0 and ids[-1] == tok.eos_token_id == 2
    assert tok.unk_token_id not in ids
    toks = tok.convert_ids_to_tokens(ids)
    assert "Ġred" in toks and "Ġcircle" in toks  # demo words are single tokens
    with torch.inference_mode():
        h = model(input_ids=torch.tensor([ids])).last_hidden_state
    assert h.shape == (1, len(ids), 64)


def test_demo_models_deterministic(models, tmp_path):
    out, _ = models
    a = demo.train_demo_tokenizer()
    b = demo.train_demo_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    demo._make_clip_dir(tmp_path / "clip", demo.CLIP_CONFIG, seed=0, fit_text=True)
    assert (tmp_path / "clip" / "open_clip_model.safetensors").read_bytes() == (
        out / "clip" / "open_clip_model.safetensors"
    ).read_bytes()
    assert state_digest(load_clip(f"local-dir:{tmp_path / 'clip'}").model)


def test_calibration_frames():
    frames, labels = demo.calibration_frames(5)
    pairs = demo.colour_shape_pairs()
    assert frames.shape == (420, demo.HEIGHT, demo.WIDTH, 3) and frames.dtype == np.uint8
    assert np.bincount(labels + 1).tolist() == [84] + [16] * len(pairs)  # background + 4x4 per pair
    again, labels2 = demo.calibration_frames(5)
    assert np.array_equal(frames, again) and np.array_equal(labels, labels2)
    assert not np.array_equal(frames, demo.calibration_frames(6)[0])
    for f, k in zip(frames, labels):
        if k < 0:  # background only: nothing saturated
            assert (f.max(-1).astype(int) - f.min(-1)).max() < 60
        else:  # the pair's colour is shown
            close = np.abs(f.astype(int) - np.array(demo.COLOURS[pairs[k][0]])).max(-1) < 40
            assert close.sum() > 20
    texts, idx = demo.demo_phrasings()
    assert len(texts) == len(idx) == 1764 and sorted(set(idx)) == list(range(len(pairs)))
    vocab = set(texts)
    assert all(e.caption in vocab for i in range(30) for e in demo.describe_video(0, i).events if "background" not in e.caption)


def test_demo_models_are_calibrated(models):
    """Held-out frames: centred image features; the teacher's captions point at their colour."""
    from PIL import Image

    out, info = models
    assert info["clip"]["calibration"]["mean_cosine_before"] > 0.8  # what the centring removes
    assert info["clip"]["calibration"]["text_fit_cosine"] > 0.6
    frames, labels = demo.calibration_frames(123)  # other frames than the calibration's own
    pairs = demo.colour_shape_pairs()
    feats = {}
    for name in ("clip", "student_clip"):
        bundle = load_clip(f"local-dir:{out / name}")
        with torch.inference_mode():
            x = torch.stack([bundle.preprocess(Image.fromarray(f)) for f in frames])
            f = torch.nn.functional.normalize(bundle.model.encode_image(x), dim=-1)
        feats[name] = f
        assert float((f @ f.T).mean()) < 0.2  # measured 0.04-0.05 (0.95-0.96 before centring)
    teacher = load_clip(f"local-dir:{out / 'clip'}")
    lab = torch.from_numpy(labels)
    means = torch.nn.functional.normalize(torch.stack([feats["clip"][lab == k].mean(0) for k in range(len(pairs))]), dim=-1)
    events = [e for i in range(40) for e in demo.describe_video(7, i).events]
    with torch.inference_mode():
        q = torch.nn.functional.normalize(teacher.model.encode_text(teacher.tokenizer([e.caption for e in events])), dim=-1)
    pred = (q @ means.T).argmax(1).tolist()
    colour_hits = np.mean([pairs[p][0] == e.colour for p, e in zip(pred, events)])
    pair_hits = np.mean([pairs[p] == (e.colour, e.shape) for p, e in zip(pred, events)])
    # measured: colour 0.72 (chance 1/7), colour and shape 0.34 (chance 1/21)
    assert colour_hits > 0.45 and pair_hits > 0.15, (colour_hits, pair_hits)
