"""Feature extraction: teacher/student alignment, values, failures, shards, kill + resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from videos import make_fifo, write_video

from prvr.encoders.clip import RANDOM_MARKER, load_clip
from prvr.encoders.i3d import write_demo_checkpoint
from prvr.extract import ExtractError, extract, gather, n_shards, shard_block
from prvr.store import FeatureStore
from prvr.video import list_videos, probe_videos, read_manifest, step_times
from prvr.video.probe import write_manifest

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]

TINY_CLIP = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"size": 32},
}
LENGTHS = {"a": 25, "b": 50, "c": 65, "d": 85, "e": 30}  # frames at 25 fps


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    vids = root / "videos"
    for name, n in LENGTHS.items():
        write_video(vids / f"{name}.mp4", n_frames=n, size=(96, 40) if name == "e" else (64, 48))
    # decord fails on this one part-way (damage mid-file); PyAV takes over
    src = write_video(root / "tmp.mp4", n_frames=60, gop=10).read_bytes()
    i = src.index(b"mdat") + len(src) // 2
    (vids / "f_damaged.mp4").write_bytes(src[:i] + bytes(800) + src[i + 800 :])
    (vids / "g_broken.mp4").write_bytes(b"not a video")
    manifest = root / "manifest.tsv"
    probe_videos(list_videos(vids), manifest, timeout_s=30, workers=2, progress=False)
    # models: tiny CLIP (weights saved, so every load is the same), random I3D, random ResNet-18
    clip_dir = root / "clip"
    clip_dir.mkdir()
    (clip_dir / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    bundle = load_clip(f"local-dir:{clip_dir}", allow_random=True)
    from safetensors.torch import save_file

    save_file(bundle.model.state_dict(), str(clip_dir / "open_clip_model.safetensors"))
    (clip_dir / RANDOM_MARKER).write_text("test")
    i3d = write_demo_checkpoint(root / "i3d")
    import torchvision

    torch.manual_seed(0)
    (root / "resnet").mkdir()
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), root / "resnet" / "r18.pth")
    (root / "resnet" / RANDOM_MARKER).write_text("test")
    cfg = {
        "device": "cpu",
        "clip": {"model": f"local-dir:{clip_dir}", "pretrained": None, "batch_size": 4, "channel_order": "rgb"},
        "frames": {"fps": 2.0, "max_steps": 6},
        "student_video": [
            {"kind": "i3d", "checkpoint": str(i3d), "snippet": 4, "resize": 40, "crop": 32, "batch_size": 3},
            {"kind": "resnet", "arch": "resnet18", "checkpoint": str(root / "resnet" / "r18.pth"), "resize": 40,
             "crop": 32, "batch_size": 4},
        ],
        "extract": {"workers": 2, "timeout_s": 30, "dtype": "float32"},
    }
    return {"root": root, "manifest": manifest, "cfg": cfg, "bundle": bundle}


@pytest.fixture(scope="module")
def full_stores(setup):
    """Uninterrupted, unsharded runs of both kinds (the reference)."""
    out = {}
    for kind in ("clip_frames", "student_video"):
        path = setup["root"] / f"full_{kind}.zarr"
        stats = extract(kind, setup["manifest"], setup["cfg"], path, progress=False)
        out[kind] = (path, stats)
    return out


def test_manifest_of_the_fixture(setup):
    rows = {r["video_id"]: r for r in read_manifest(setup["manifest"])}
    assert rows["g_broken"]["status"] == "error"
    assert all(rows[v]["status"] == "ok" for v in ("a", "b", "c", "d", "e", "f_damaged"))
    assert n_shards(setup["manifest"], 4) == 2 and n_shards(setup["manifest"], 100) == 1
    assert [shard_block(6, (k, 4)) for k in range(4)] == [(0, 1), (1, 3), (3, 4), (4, 6)]


@pytest.mark.slow
def test_teacher_rows_equal_student_rows(setup, full_stores):
    rows = {r["video_id"]: r for r in read_manifest(setup["manifest"])}
    teacher = FeatureStore.open(full_stores["clip_frames"][0])
    student = FeatureStore.open(full_stores["student_video"][0])
    assert teacher.ids == student.ids == ["a", "b", "c", "d", "e", "f_damaged"]
    assert teacher.dim == 32 and student.dim == 1024 + 512
    assert student.attrs["dims"] == [1024, 512] and teacher.attrs["dims"] == [32]
    for vid in teacher.ids:
        want = step_times(rows[vid]["duration"], 2.0, 6)
        assert len(teacher.get(vid)) == len(student.get(vid)) == len(want)
        np.testing.assert_allclose(teacher.timestamps(vid), want, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(teacher.timestamps(vid), student.timestamps(vid))
    assert len(teacher.get("d")) == 6  # 3.4 s at 2 fps = 7 centres > max_steps: 6 spread uniformly
    np.testing.assert_allclose(teacher.timestamps("d"), (np.arange(6) + 0.5) * 3.4 / 6, atol=1e-6)
    for store, kind in ((teacher, "clip_frames"), (student, "student_video")):
        a = store.attrs
        assert a["kind"] == kind and a["fps"] == 2.0 and a["max_steps"] == 6 and a["failed"] == []
        assert "torch" in a["versions"] and a["timeline"]
        assert all(e["random_weights"] and len(e["weights_sha256"]) == 16 for e in a["extractors"])
        assert list(a["decode_backends"]) == ["f_damaged"] and "pyav" in a["decode_backends"]["f_damaged"]
    assert teacher.attrs["channel_order"] == "rgb" and teacher.attrs["extractors"][0]["normalised"] is False
    assert [e["kind"] for e in student.attrs["extractors"]] == ["i3d", "resnet"]
    stats = full_stores["student_video"][1]
    assert stats["videos"] == 6 and stats["steps"] == len(student.load())
    assert stats["frames"] == stats["steps"] * (4 + 1) and stats["failed"] == []
    assert not Path(f"{full_stores['student_video'][0]}.work").exists()
    assert Path(f"{full_stores['student_video'][0]}.failed.tsv").read_text() == "video_id\treason\n"


def _frame_at(path, t):
    import decord

    vr = decord.VideoReader(str(path))
    starts = vr.get_frame_timestamp(range(len(vr)))[:, 0]
    i = int(np.searchsorted(np.round(starts, 4), round(t, 4), side="right") - 1)
    return vr[max(0, i)].asnumpy()


@pytest.mark.slow
def test_values_match_direct_computation(setup, full_stores):
    from PIL import Image

    teacher = FeatureStore.open(full_stores["clip_frames"][0])
    student = FeatureStore.open(full_stores["student_video"][0])
    bundle = setup["bundle"]
    path = setup["root"] / "videos" / "e.mp4"
    t = float(teacher.timestamps("e")[1])
    frame = _frame_at(path, t)
    with torch.inference_mode():
        want = bundle.model.encode_image(bundle.preprocess(Image.fromarray(frame)).unsqueeze(0))[0].numpy()
    np.testing.assert_allclose(teacher.get("e")[1], want, rtol=1e-4, atol=1e-5)
    # the I3D half: a 4-frame snippet at the video's 25 fps around the centre, resize 40, crop 32
    from prvr.encoders.i3d import load_i3d

    model, _ = load_i3d(setup["cfg"]["student_video"][0]["checkpoint"])
    clips = []
    for j in range(4):
        img = Image.fromarray(_frame_at(path, t + (j - 1.5) / 25.0))
        w, h = img.size
        img = img.resize((int(40 * w / h), 40), Image.BILINEAR)  # wide video: height is the shorter side
        a = np.asarray(img)
        top, left = int(round((a.shape[0] - 32) / 2)), int(round((a.shape[1] - 32) / 2))
        clips.append(a[top : top + 32, left : left + 32])
    x = torch.from_numpy(np.stack(clips)[None]).permute(0, 4, 1, 2, 3).float() / 255.0 * 2 - 1
    with torch.inference_mode():
        want = model.features(x)[0].numpy()
    np.testing.assert_allclose(student.get("e")[1][:1024], want, rtol=1e-4, atol=1e-5)
    # the ResNet half: torchvision's ImageNet eval transform on the centre frame, pooled features
    import torchvision
    from torchvision import transforms as T

    net = torchvision.models.resnet18(weights=None)
    net.load_state_dict(torch.load(setup["cfg"]["student_video"][1]["checkpoint"]))
    net.fc = torch.nn.Identity()
    tf = T.Compose([T.Resize(40), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.inference_mode():
        want = net.eval()(tf(Image.fromarray(frame)).unsqueeze(0))[0].numpy()
    np.testing.assert_allclose(student.get("e")[1][1024:], want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_bgr_channel_order(setup, full_stores, tmp_path):
    cfg = json.loads(json.dumps(setup["cfg"]))
    cfg["clip"]["channel_order"] = "bgr"
    rows = [r for r in read_manifest(setup["manifest"]) if r["video_id"] in ("a", "e")]
    write_manifest(rows, tmp_path / "m.tsv")
    extract("clip_frames", tmp_path / "m.tsv", cfg, tmp_path / "bgr.zarr", progress=False)
    bgr = FeatureStore.open(tmp_path / "bgr.zarr")
    rgb = FeatureStore.open(full_stores["clip_frames"][0])
    assert bgr.attrs["channel_order"] == "bgr"
    assert not np.allclose(bgr.get("e"), rgb.get("e"))
    from PIL import Image

    b = setup["bundle"]
    frame = _frame_at(setup["root"] / "videos" / "e.mp4", float(bgr.timestamps("e")[0]))
    with torch.inference_mode():
        want = b.model.encode_image(b.preprocess(Image.fromarray(frame[..., ::-1].copy())).unsqueeze(0))[0].numpy()
    np.testing.assert_allclose(bgr.get("e")[0], want, rtol=1e-4, atol=1e-5)


def test_failures_during_extraction_are_recorded_and_skipped(setup, tmp_path):
    cfg = json.loads(json.dumps(setup["cfg"]))
    cfg["extract"]["timeout_s"] = 2.5
    rows = [r for r in read_manifest(setup["manifest"]) if r["status"] == "ok"][:4]
    shutil.copy(rows[1]["path"], tmp_path / "gone.mp4")
    rows[1] = {**rows[1], "path": str(tmp_path / "gone.mp4")}
    (tmp_path / "gone.mp4").write_bytes(b"garbage now")  # changed after probing
    rows[2] = {**rows[2], "path": str(make_fifo(tmp_path / "hang.mp4"))}  # hangs the decoder
    write_manifest(rows, tmp_path / "m.tsv")
    stats = extract("clip_frames", tmp_path / "m.tsv", cfg, tmp_path / "t.zarr", progress=False)
    failed = {f["video_id"]: f["reason"] for f in stats["failed"]}
    assert set(failed) == {rows[1]["video_id"], rows[2]["video_id"]}
    assert "Invalid data" in failed[rows[1]["video_id"]] or "Error reading" in failed[rows[1]["video_id"]]
    assert "timed out" in failed[rows[2]["video_id"]]
    store = FeatureStore.open(tmp_path / "t.zarr")
    assert store.ids == [rows[0]["video_id"], rows[3]["video_id"]]
    assert {f["video_id"] for f in store.attrs["failed"]} == set(failed)
    tsv = (tmp_path / "t.zarr.failed.tsv").read_text().splitlines()
    assert tsv[0] == "video_id\treason" and len(tsv) == 3


def test_config_errors(setup, tmp_path):
    cfg = json.loads(json.dumps(setup["cfg"]))
    with pytest.raises(ExtractError, match="unknown extraction kind"):
        extract("frames", setup["manifest"], cfg, tmp_path / "x.zarr", progress=False)
    cfg["student_video"] = [{"kind": "i3d", "checkpoint": None}]
    from prvr.encoders.clip import ModelLoadError

    with pytest.raises(ModelLoadError, match="no checkpoint"):
        extract("student_video", setup["manifest"], cfg, tmp_path / "x.zarr", progress=False)


KILL_SCRIPT = """
import json, os, signal, sys
import torch
from prvr.extract import extract
torch.set_num_threads(2)  # as in the test process: same kernels, same values
cfg = json.loads(sys.argv[1])
def on_video(vid, n):
    if n == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # a hard kill right after the first finished video
extract("student_video", sys.argv[2], cfg, sys.argv[3], shard=(0, 2), progress=False, on_video=on_video)
"""


@pytest.mark.slow
def test_sharded_killed_and_resumed_run_is_identical(setup, full_stores, tmp_path):
    cfg = setup["cfg"]
    s0, s1 = tmp_path / "s0.zarr", tmp_path / "s1.zarr"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg), str(setup["manifest"]), str(s0)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not s0.exists()
    done = list(Path(f"{s0}.work/done").glob("*.npz"))
    assert len(done) == 1
    before = done[0].stat().st_mtime_ns
    assert torch.get_num_threads() == 2  # as in KILL_SCRIPT (conftest pins it): the resume key includes it
    stats0 = extract("student_video", setup["manifest"], cfg, s0, shard=(0, 2), progress=False, keep_work=True)
    assert stats0["resumed"] == 1 and stats0["videos"] == 2  # shard 0 = a, b, c
    assert done[0].stat().st_mtime_ns == before  # the finished video was not recomputed
    stats1 = extract("student_video", setup["manifest"], cfg, s1, shard=(1, 2), progress=False)
    assert stats1["resumed"] == 0 and stats1["videos"] == 3
    final = tmp_path / "gathered.zarr"
    gather([s0, s1], final, setup["manifest"])
    ref = FeatureStore.open(full_stores["student_video"][0])
    got = FeatureStore.open(final)
    assert got.ids == ref.ids
    np.testing.assert_array_equal(got.offsets, ref.offsets)
    np.testing.assert_array_equal(got.load(None), ref.load(None))  # value for value
    np.testing.assert_array_equal(got.timestamps(), ref.timestamps())
    for k in ("kind", "dims", "extractors", "fps", "max_steps", "failed", "decode_backends"):
        assert got.attrs[k] == ref.attrs[k], k
    assert got.attrs["shards"] == 2 and got.attrs["device"] == ref.attrs["device"] == "cpu"
    # shards of different extractions do not mix
    with pytest.raises(ExtractError, match="differs"):
        gather([s0, full_stores["clip_frames"][0]], tmp_path / "bad.zarr")
    with pytest.raises(ExtractError, match="in no shard"):
        gather([s1], tmp_path / "bad.zarr", setup["manifest"])
