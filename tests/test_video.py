"""Video listing, probing (broken-file corpus, hangs, crashes), timeline, decoding, preprocessing."""

import math
import time

import numpy as np
import pytest
from videos import FPS, count_to, crash, decode_index, make_corpus, make_fifo, sleep_forever, write_video

from prvr.video import list_videos, probe_videos, read_manifest, step_times
from prvr.video.decode import (
    DecodeTask,
    FrameSpec,
    PilRecipe,
    Task,
    WorkerPool,
    decode_size,
    decode_steps,
    recipe_from_transform,
)
from prvr.video.probe import ProbeError
from prvr.video.timeline import frames_at, snippet_times


def run_task(task):
    chunks, gen = [], decode_steps(task)
    while True:
        try:
            chunks.append(next(gen))
        except StopIteration as stop:
            return chunks, stop.value


# ---------------------------------------------------------------- timeline


def naive_steps(duration, fps, max_steps):
    out, k = [], 0
    while (k + 0.5) / fps < duration:
        out.append((k + 0.5) / fps)
        k += 1
    if not out:
        return [duration / 2 if duration > 0 else 0.0]
    if len(out) > max_steps:
        return [(j + 0.5) * duration / max_steps for j in range(max_steps)]
    return out


@pytest.mark.parametrize(
    "duration,fps,max_steps",
    [(3.0, 1.0, 512), (2.5, 1.0, 512), (2.51, 1.0, 512), (0.3, 1.0, 8), (1.2, 2.0, 8), (100.0, 1.0, 4),
     (10.0, 1 / 1.5, 128), (7.0, 3.0, 21), (7.0, 3.0, 20), (0.0, 1.0, 4)],
)
def test_step_times_match_the_rule(duration, fps, max_steps):
    got = step_times(duration, fps, max_steps)
    np.testing.assert_allclose(got, naive_steps(duration, fps, max_steps), rtol=0, atol=1e-12)
    assert 1 <= len(got) <= max_steps


def test_step_times_values():
    np.testing.assert_array_equal(step_times(3.0, 1.0, 10), [0.5, 1.5, 2.5])
    np.testing.assert_array_equal(step_times(2.5, 1.0, 10), [0.5, 1.5])
    np.testing.assert_array_equal(step_times(100.0, 1.0, 4), [12.5, 37.5, 62.5, 87.5])
    np.testing.assert_array_equal(step_times(0.2, 1.0, 4), [0.1])


def test_frames_at_and_snippets():
    starts = np.array([0.0, 0.04, 0.08])
    np.testing.assert_array_equal(frames_at(starts, [-1.0, 0.0, 0.0399, 0.04, 0.0799999, 5.0]), [0, 0, 0, 1, 2, 2])
    np.testing.assert_array_equal(frames_at(np.float32([0, 0.02, 0.08]), [0.02]), [1])  # float32 starts
    sn = snippet_times(np.array([1.0]), 4, 8.0)
    np.testing.assert_allclose(sn, [[1 - 1.5 / 8, 1 - 0.5 / 8, 1 + 0.5 / 8, 1 + 1.5 / 8]])


# ---------------------------------------------------------------- listing


def test_list_videos_folder_and_tsv(tmp_path):
    (tmp_path / "v").mkdir()
    for name in ("b.mp4", "a.MKV", "notes.txt", ".hidden.mp4"):
        (tmp_path / "v" / name).write_bytes(b"x")
    assert list_videos(tmp_path / "v") == [("a", str(tmp_path / "v" / "a.MKV")), ("b", str(tmp_path / "v" / "b.mp4"))]
    (tmp_path / "v" / "a.mp4").write_bytes(b"x")
    with pytest.raises(ValueError, match="'a'"):
        list_videos(tmp_path / "v")
    tsv = tmp_path / "list.tsv"
    tsv.write_text("video_id\tpath\nx\tv/b.mp4\ny\t/abs/y.mp4\n")
    assert list_videos(tsv) == [("x", str(tmp_path / "v" / "b.mp4")), ("y", "/abs/y.mp4")]
    tsv.write_text("video_id\tpath\nx\tv/b.mp4\nx\tv/a.mp4\n")
    with pytest.raises(ValueError, match=r"list.tsv:3: duplicate video id 'x'"):
        list_videos(tsv)
    tsv.write_text("id\tfile\nx\tv/b.mp4\n")
    with pytest.raises(ValueError, match="header"):
        list_videos(tsv)
    with pytest.raises(FileNotFoundError):
        list_videos(tmp_path / "nope")


# ---------------------------------------------------------------- probing the corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    expect = make_corpus(folder)
    make_fifo(folder / "hang.mp4")
    expect["hang"] = "error"
    return folder, expect


def test_probe_quarantines_every_broken_kind(corpus, tmp_path):
    folder, expect = corpus
    videos = list_videos(folder)
    t0 = time.monotonic()
    rows = probe_videos(videos, tmp_path / "m.tsv", timeout_s=2.0, workers=2, progress=False,
                        log_path=tmp_path / "decode.log")
    took = time.monotonic() - t0
    got = {r["video_id"]: r for r in rows}
    assert {k: r["status"] for k, r in got.items()} == expect
    assert read_manifest(tmp_path / "m.tsv") == rows  # round trip, typed
    reasons = {k: r["reason"] for k, r in got.items()}
    assert reasons["empty"] == "empty file (0 bytes)"
    assert "no video stream (streams: audio)" in reasons["audio_only"]
    assert "no frames" in reasons["zero_frames"]
    assert "decord:" in reasons["garbage"] and "pyav:" in reasons["garbage"]
    assert "Invalid data" in reasons["truncated"] and "/" not in reasons["truncated"]
    assert "timed out after 2 s" in reasons["hang"] and "retried with fallback" in reasons["hang"]
    # PyAV rescues the truncated file that has its index at the front, with its real length
    tf = got["truncated_faststart"]
    assert tf["backend"] == "pyav" and "decord:" in tf["reason"] and 0.5 < tf["duration"] < 4.0
    good = got["good"]
    assert (good["backend"], good["n_frames"], good["width"], good["height"]) == ("decord", 75, 64, 48)
    assert good["duration"] == pytest.approx(3.0) and good["fps"] == pytest.approx(25.0)
    assert got["large"]["width"] == 4096 and got["wide"]["width"] == 96
    assert got["vfr"]["n_frames"] == 60 and got["vfr"]["duration"] == pytest.approx(2.36, abs=1e-3)
    for r in rows:
        if r["status"] == "error":
            assert r["reason"] and r["duration"] is None
    assert took < 30


def test_probe_strict_lists_bad_videos_after_writing(corpus, tmp_path):
    folder, _ = corpus
    videos = [(v, str(folder / f"{v}.mp4")) for v in ("good", "empty", "garbage")] + [("missing", str(folder / "no.mp4"))]
    with pytest.raises(ProbeError) as err:
        probe_videos(videos, tmp_path / "m.tsv", timeout_s=10, workers=1, strict=True, progress=False)
    msg = str(err.value)
    assert "3 of 4" in msg and "empty" in msg and "garbage" in msg and "missing" in msg and "file not found" in msg
    assert "good (" not in msg
    assert [r["status"] for r in read_manifest(tmp_path / "m.tsv")] == ["ok", "error", "error", "error"]


# ---------------------------------------------------------------- worker pool


def test_pool_survives_crash_and_hang():
    pool = WorkerPool(2, timeout_s=1.0)
    tasks = [
        Task("crash", crash, ()),
        Task("hang", sleep_forever, (), fallback_args=()),
        Task("stream", count_to, (3,)),
        Task("crash2", crash, (), fallback_args=(1,)),
        Task("after", count_to, (2,)),
    ]
    events = list(pool.imap(tasks))
    failed = {k: v for kind, k, v in events if kind == "failed"}
    assert set(failed) == {"crash", "hang", "crash2"}
    assert "decoder crashed" in failed["crash"] and "SIGSEGV" in failed["crash"]
    assert failed["hang"].count("timed out after 1 s") == 2  # the fallback attempt hangs too
    assert "retried with fallback" in failed["crash2"]
    items = [v for kind, k, v in events if kind == "item" and k == "stream"]
    assert items == [0, 1, 2]
    done = {k: v for kind, k, v in events if kind == "done"}
    assert done == {"stream": 3, "after": 2}
    assert pool.restarts >= 4
    assert all(s.proc is None for s in pool.slots)  # closed


def test_pool_inline_mode():
    events = list(WorkerPool(0).imap([Task("a", count_to, (2,)), Task("b", int, ("x",))]))
    assert events[:3] == [("item", "a", 0), ("item", "a", 1), ("done", "a", 2)]
    assert events[3][0] == "failed" and "ValueError" in events[3][2]


# ---------------------------------------------------------------- decoding


def test_decode_picks_the_frame_shown_at_each_time(tmp_path):
    path = write_video(tmp_path / "v.mp4", n_frames=75)
    times = step_times(3.0, 2.0, 100)  # 0.25, 0.75, ...
    raw = FrameSpec("raw", PilRecipe(output="uint8"))
    snip = FrameSpec("snip", PilRecipe(output="uint8"), snippet=4, rate=12.5)  # every 2nd frame
    bgr = FrameSpec("bgr", PilRecipe(output="uint8"), channel_order="bgr")
    for backends in (("decord",), ("pyav",)):
        task = DecodeTask(str(path), times, [raw, snip, bgr], fps=25.0, backends=backends, chunk_steps=4)
        chunks, info = run_task(task)
        assert info["backend"] == backends[0]
        assert [(c["start"], c["stop"]) for c in chunks] == [(0, 4), (4, 6)]
        got = np.concatenate([c["arrays"]["raw"] for c in chunks])
        assert got.shape == (6, 48, 64, 3)
        assert [decode_index(f) for f in got] == [math.floor(t * FPS) for t in times]
        sn = np.concatenate([c["arrays"]["snip"] for c in chunks])
        assert sn.shape == (6, 4, 48, 64, 3)
        want = [[min(74, max(0, math.floor((t + (j - 1.5) / 12.5) * FPS + 1e-9))) for j in range(4)] for t in times]
        assert [[decode_index(f) for f in s] for s in sn] == want
        b = np.concatenate([c["arrays"]["bgr"] for c in chunks])
        np.testing.assert_array_equal(b, got[..., ::-1])


def test_decode_falls_back_to_pyav_mid_video(corpus):
    folder, _ = corpus
    times = step_times(4.0, 4.0, 100)
    task = DecodeTask(str(folder / "damaged.mp4"), times, [FrameSpec("raw", PilRecipe(output="uint8"))], fps=25.0,
                      chunk_steps=4)
    chunks, info = run_task(task)
    assert info["backend"] == "decord+pyav"
    got = [decode_index(f) for c in chunks for f in c["arrays"]["raw"]]
    assert len(got) == len(times) == 16
    want = [math.floor(t * FPS) for t in times]
    # frames whose packets were destroyed are replaced by the last good frame before them
    assert sum(g == w for g, w in zip(got, want)) >= 12
    assert all(g <= w for g, w in zip(got, want))


def test_decode_large_frames_scaled_down(corpus):
    folder, _ = corpus
    assert decode_size(4096, 2304, 1_000_000) == (1332, 750)
    assert decode_size(640, 360, 1_000_000) is None
    task = DecodeTask(str(folder / "large.mp4"), np.array([0.06]), [FrameSpec("raw", PilRecipe(output="uint8"))],
                      fps=25.0, width=4096, height=2304, max_pixels=1_000_000)
    chunks, info = run_task(task)
    assert chunks[0]["arrays"]["raw"].shape == (1, 750, 1332, 3)
    assert decode_index(chunks[0]["arrays"]["raw"][0]) == 1
    assert "decoded at 1332x750" in info["notes"][0]


# ---------------------------------------------------------------- preprocessing


def test_pil_recipe_is_bit_identical_to_torchvision_and_open_clip():
    from PIL import Image
    from torchvision import transforms as T

    from open_clip.transform import image_transform

    rng = np.random.default_rng(0)
    oc = image_transform(32, is_train=False)
    tv = T.Compose([T.Resize(40), T.CenterCrop(32), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    squash = T.Compose([T.Resize((20, 30), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor()])
    for tf in (oc, tv, squash):
        recipe = recipe_from_transform(tf)
        assert recipe is not None
        for h, w in [(48, 64), (64, 48), (37, 101), (20, 20), (16, 12)]:
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            want = tf(Image.fromarray(img)).numpy()
            got = recipe(img)
            assert got.dtype == np.float32 and got.shape == want.shape == recipe.out_shape(w, h)
            np.testing.assert_array_equal(got, want)
    assert recipe_from_transform(T.Compose([T.RandomCrop(3), T.ToTensor()])) is None
