"""Generator of small fake MS-SL / DL-DKD feature releases in the exact on-disk layout (method §2).

Written independently of :mod:`prvr.data.msrl` (plain numpy / h5py writes) so that a round
trip through prvr's import and export is checked against files prvr did not write itself.

Layout written under ``<base>/<collection>/``::

    TextData/{coll}train.caption.txt, {coll}val.caption.txt, {coll}test.caption.txt
    TextData/roberta_{coll}_query_feat.hdf5              one dataset per cap_id, (tokens, Dq)
    TextData/clip_ViT_B_32_{coll}_query_feat.hdf5        one dataset per cap_id, (1, Dc)
    FeatureData/{visual_feature}/shape.txt, id.txt, feature.bin, video2frames.txt
    FeatureData/new_clip_vit_32_{coll}_vid_features.hdf5 one dataset per video id, (n_t, Dc)

The canonical form (the default) is what prvr's export writes: videos in order, each video's
frames contiguous in ``feature.bin``, frame ids ``<vid>_<i>``, ``shape.txt`` = ``"N D"``,
``id.txt`` = the ids joined by single spaces, ``video2frames.txt`` = ``repr`` of the dict.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

DEFAULT_VISUAL = {"tvr": "i3d_resnet", "activitynet": "i3d", "charades": "i3d_rgb_lgi"}
WORDS = "a man woman walks opens door sits table talks phone runs street dog car red blue holds cup".split()


@dataclass
class FakeRelease:
    """What :func:`make_release` wrote (arrays kept only when ``keep=True``)."""

    base: Path  # the VisualSearch-style root (parent of the collection folder)
    root: Path  # the collection folder
    collection: str
    visual_feature: str
    dims: dict[str, int]
    captions: dict[str, list[tuple[str, str]]]  # split -> [(cap_id, text)]
    frame_ids: dict[str, list[str]] = field(default_factory=dict)  # vid -> frame ids (temporal order)
    video_rows: dict[str, np.ndarray] = field(default_factory=dict)  # vid -> (n_s, Dv) float32
    text: dict[str, np.ndarray] = field(default_factory=dict)  # cap_id -> (L, Dq) float32
    clip_video: dict[str, np.ndarray] = field(default_factory=dict)  # vid -> (n_t, Dc) float32
    clip_text: dict[str, np.ndarray] = field(default_factory=dict)  # cap_id -> (1, Dc) float32
    n_rows: int = 0

    @property
    def text_dir(self) -> Path:
        return self.root / "TextData"

    @property
    def bigfile(self) -> Path:
        return self.root / "FeatureData" / self.visual_feature

    def caption_file(self, split: str) -> Path:
        return self.text_dir / f"{self.collection}{split}.caption.txt"

    @property
    def roberta(self) -> Path:
        return self.text_dir / f"roberta_{self.collection}_query_feat.hdf5"

    @property
    def clip_text_file(self) -> Path:
        return self.text_dir / f"clip_ViT_B_32_{self.collection}_query_feat.hdf5"

    @property
    def clip_video_file(self) -> Path:
        return self.root / "FeatureData" / f"new_clip_vit_32_{self.collection}_vid_features.hdf5"

    def videos(self, split: str) -> list[str]:
        return list(dict.fromkeys(c.split("#", 1)[0] for c, _ in self.captions[split]))

    def source(self, **extra) -> dict:
        """A config ``source`` block for this release."""
        return {"format": "msrl", "root": str(self.root), "collection": self.collection, **extra}


def _video_id(collection: str, i: int, rng: np.random.Generator) -> str:
    if collection == "tvr":
        return f"show{i % 3}_s0{1 + i % 2}e{i:02d}_seg02_clip_{i:02d}"
    if collection == "activitynet":
        return "v_" + "".join(rng.choice(list(string.ascii_letters + string.digits + "-_"), 11)) + f"{i}"
    return "".join(rng.choice(list(string.ascii_uppercase + string.digits), 5)) + f"{i}"


def make_release(
    base: str | Path,
    collection: str = "tvr",
    n_videos: int = 8,
    n_test: int | None = None,
    val_equals_test: bool = False,
    video_dim: int = 24,
    text_dim: int = 12,
    clip_dim: int = 8,
    rows: tuple[int, int] = (3, 9),
    caps_per_video: tuple[int, int] = (1, 3),
    tokens: tuple[int, int] = (1, 7),
    teacher_rows: Callable[[int, int], int] | None = None,
    clip: bool = True,
    clip_text_keys: str = "cap",
    clip_text_splits: tuple[str, ...] = ("train", "val", "test"),
    shuffle_rows: bool = False,
    one_token: tuple[str, ...] = ("train",),
    test_queries: int | None = None,
    extra_unreferenced_videos: int = 0,
    seed: int = 0,
    keep: bool = True,
    visual_feature: str | None = None,
) -> FakeRelease:
    """Write a fake release under ``<base>/<collection>/`` and return what was written.

    Args:
        base: the parent folder (the reference's ``VisualSearch`` root).
        collection: file-name prefix (``tvr``, ``activitynet``, ``charades`` or anything).
        n_videos: videos that have captions; ``n_test`` of them (default ~1/4) form the test split.
        val_equals_test: write the val caption file as a byte copy of the test file (as the
            public release probably does); otherwise val gets its own videos (~1/4).
        video_dim, text_dim, clip_dim: feature dimensions (student video, student text, CLIP).
        rows: min/max student rows per video (inclusive).
        caps_per_video, tokens: min/max captions per video and tokens per caption.
        teacher_rows: ``f(video_index, n_s) -> n_t`` (default ``n_t = n_s``).
        clip: write the two CLIP teacher files.
        clip_text_keys: ``cap`` (key = cap_id), ``fallback`` (key = ``<vid>#<n>``) or ``mixed``.
        clip_text_splits: splits whose captions get a CLIP text vector.
        shuffle_rows: store the feature rows in a random order (video2frames still lists each
            video's frames in temporal order), i.e. a non-canonical but valid BigFile.
        one_token: splits whose first caption has exactly one token.
        test_queries: keep only this many test captions (val too when ``val_equals_test``).
        extra_unreferenced_videos: videos in the feature files that no caption mentions.
        seed: random seed.
        keep: keep every array in the returned object (small releases only).
        visual_feature: FeatureData sub-folder (default by collection, else ``i3d``).
    """
    rng = np.random.default_rng(seed)
    base = Path(base)
    vf = visual_feature or DEFAULT_VISUAL.get(collection, "i3d")
    root = base / collection
    rel = FakeRelease(
        base=base, root=root, collection=collection, visual_feature=vf,
        dims={"student_video": video_dim, "student_text": text_dim, "clip": clip_dim},
        captions={"train": [], "val": [], "test": []},
    )
    rel.text_dir.mkdir(parents=True, exist_ok=True)
    rel.bigfile.mkdir(parents=True, exist_ok=True)

    n_total = n_videos + extra_unreferenced_videos
    vids = [_video_id(collection, i, rng) for i in range(n_total)]
    n_test = max(1, n_videos // 4) if n_test is None else n_test
    n_val = 0 if val_equals_test else max(1, n_videos // 4)
    n_train = n_videos - n_test - n_val
    assert n_train >= 1, "make_release: not enough videos for three splits"
    split_of = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test + [None] * extra_unreferenced_videos

    # captions
    for i, vid in enumerate(vids[:n_videos]):
        for n in range(int(rng.integers(caps_per_video[0], caps_per_video[1] + 1))):
            text = " ".join(rng.choice(WORDS, int(rng.integers(3, 9))))
            rel.captions[split_of[i]].append((f"{vid}#enc#{n}", text))
    if test_queries is not None:
        rel.captions["test"] = rel.captions["test"][:test_queries]
    if val_equals_test:
        rel.captions["val"] = list(rel.captions["test"])
    for split in ("train", "test", "val"):
        if split == "val" and val_equals_test:
            rel.caption_file("val").write_bytes(rel.caption_file("test").read_bytes())
            continue
        with open(rel.caption_file(split), "w", encoding="utf-8") as f:
            for cap_id, text in rel.captions[split]:
                f.write(f"{cap_id} {text}\n")

    # student video features (BigFile)
    n_rows = [int(rng.integers(rows[0], rows[1] + 1)) for _ in vids]
    n_tot = sum(n_rows)
    frame_ids = {vid: [f"{vid}_{j}" for j in range(n)] for vid, n in zip(vids, n_rows)}
    order = rng.permutation(n_tot) if shuffle_rows else None
    with open(rel.bigfile / "feature.bin", "wb") as f:
        if order is None:
            for vid, n in zip(vids, n_rows):
                x = rng.standard_normal((n, video_dim), dtype=np.float32)
                f.write(x.astype("<f4").tobytes())
                if keep:
                    rel.video_rows[vid] = x
            all_ids = [fid for vid in vids for fid in frame_ids[vid]]
        else:
            x_all = rng.standard_normal((n_tot, video_dim), dtype=np.float32)
            canon_ids = [fid for vid in vids for fid in frame_ids[vid]]
            # row r of the file holds canonical row order[r]
            f.write(x_all[order].astype("<f4").tobytes())
            all_ids = [canon_ids[k] for k in order]
            start = 0
            for vid, n in zip(vids, n_rows):
                rel.video_rows[vid] = x_all[start : start + n]
                start += n
    (rel.bigfile / "id.txt").write_text(" ".join(all_ids), encoding="utf-8")
    (rel.bigfile / "shape.txt").write_text(f"{n_tot} {video_dim}", encoding="utf-8")
    (rel.bigfile / "video2frames.txt").write_text(repr(frame_ids), encoding="utf-8")
    rel.frame_ids = frame_ids
    rel.n_rows = n_tot

    # student text features (RoBERTa token features)
    all_caps = [c for s in ("train", "val", "test") for c in rel.captions[s]]
    all_caps = list(dict(all_caps).items())
    short = {rel.captions[s][0][0] for s in one_token if rel.captions[s]}
    with h5py.File(rel.roberta, "w") as h:
        for cap_id, _ in all_caps:
            n_tok = 1 if cap_id in short else int(rng.integers(tokens[0], tokens[1] + 1))
            x = rng.standard_normal((n_tok, text_dim), dtype=np.float32)
            h.create_dataset(cap_id, data=x)
            if keep:
                rel.text[cap_id] = x

    # CLIP teacher features
    if clip:
        with h5py.File(rel.clip_video_file, "w") as h:
            for i, (vid, n) in enumerate(zip(vids, n_rows)):
                n_t = teacher_rows(i, n) if teacher_rows else n
                x = rng.standard_normal((n_t, clip_dim), dtype=np.float32)
                h.create_dataset(vid, data=x)
                if keep:
                    rel.clip_video[vid] = x
        want = {c for s in clip_text_splits for c, _ in rel.captions[s]}
        with h5py.File(rel.clip_text_file, "w") as h:
            for k, (cap_id, _) in enumerate(all_caps):
                if cap_id not in want:
                    continue
                x = rng.standard_normal((1, clip_dim), dtype=np.float32)
                fallback = clip_text_keys == "fallback" or (clip_text_keys == "mixed" and k % 2 == 1)
                key = cap_id.replace("#enc#", "#", 1) if fallback else cap_id
                h.create_dataset(key, data=x)
                if keep:
                    rel.clip_text[cap_id] = x
    return rel


def write_streaming_tvr(base: str | Path, n_videos: int, seed: int = 0, video_dim: int = 3072, text_dim: int = 768,
                        clip_dim: int = 512, rows: tuple[int, int] = (60, 90), caps: int = 5,
                        tokens: tuple[int, int] = (8, 20)) -> FakeRelease:
    """A TVR-shaped release for benchmarks: same layout, arrays not kept (bounded memory)."""
    return make_release(
        base, "tvr", n_videos=n_videos, video_dim=video_dim, text_dim=text_dim, clip_dim=clip_dim,
        rows=rows, caps_per_video=(caps, caps), tokens=tokens, val_equals_test=True, keep=False,
        one_token=(), seed=seed,
    )
