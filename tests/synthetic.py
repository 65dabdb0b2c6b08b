"""Small synthetic PRVR feature sets with planted structure, written as prvr stores.

Used by the tests, ``bench/train_speed.py`` and ``bench/ablation.py``.

Planted structure. Every video is a timeline [0, 1) cut into 2-4 segments (moments); every
moment carries a latent event vector z ∈ R^k (k = ``latent``) and every video a background
vector (irrelevant to its captions, so a caption matches only part of its video). A caption
describes one moment: its latent is that moment's z plus noise. Features are random linear
maps of latents plus noise:

* student video row at time t:   A_v · (z(t) + 0.7·bg) + noise          (dim ``dv``)
* student text token:            A_q · (z_q + token noise) + noise       (dim ``dq``)
* teacher (CLIP) frame at time t: A_t · (P·z(t) + 0.7·P·bg) + noise       (dim ``dt``)
* teacher text:                   A_t · P·z_q + noise

where P keeps only the first ``teacher_share`` fraction of the latent coordinates: the
teacher is informative (it ranks well above chance) but blind to the rest of the signal,
which the student can learn from its own features.

Student rows are sampled at ``n_s`` uniform time centres; teacher rows at ``n_t`` centres
(``teacher_rows``: ``same`` → n_t = n_s, ``fewer``/``more`` → scaled, ``mixed`` → random per
video), so the alignment rules of :mod:`prvr.data.dataset` are exercised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prvr.data.captions import Caption, write_captions
from prvr.store import StoreWriter

SPLITS = ("train", "val", "test")


@dataclass
class SyntheticPaths:
    """Paths of one generated set (same names as the workflow's inputs)."""

    root: Path
    student_video: Path
    teacher_video: Path
    student_text: Path
    teacher_text: Path
    captions: dict[str, Path]

    def as_train_paths(self, teacher_dir: Path | None = None) -> dict:
        return {
            "student_video": str(self.student_video),
            "student_text": str(self.student_text),
            "teacher_dir": None if teacher_dir is None else str(teacher_dir),
            "captions": {k: str(v) for k, v in self.captions.items()},
        }


def make_synthetic(
    root: str | Path,
    *,
    n_videos: dict[str, int] | None = None,
    captions_per_video: tuple[int, int] = (2, 5),
    rows: tuple[int, int] = (6, 24),
    tokens: tuple[int, int] = (1, 12),
    dv: int = 48,
    dq: int = 32,
    dt: int = 24,
    latent: int = 16,
    teacher_share: float = 0.5,
    teacher_rows: str = "same",
    noise: float = 0.3,
    token_noise: float = 0.8,
    teacher_noise: float = 0.3,
    val_is_test: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    chunk_rows: int | None = None,
) -> SyntheticPaths:
    """Write a synthetic set under ``root`` and return its paths.

    Args:
        n_videos: videos per split (default train 120, val 40, test 40).
        captions_per_video: inclusive range of captions per video.
        rows: inclusive range of student rows per video.
        tokens: inclusive range of tokens per caption.
        dv, dq, dt: student video, student token and teacher dimensions.
        latent: latent event dimension k.
        teacher_share: fraction of latent coordinates the teacher sees.
        teacher_rows: ``same`` | ``fewer`` | ``more`` | ``mixed`` (teacher rows relative to student rows).
        noise, token_noise, teacher_noise: noise levels.
        val_is_test: write the test captions as the val file too (as in the public releases).
        dtype: on-disk dtype of the stores.
        seed: everything is a function of it.
        chunk_rows: row chunk of the stores (default: the store's default).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    n_videos = n_videos or {"train": 120, "val": 40, "test": 40}
    k = latent
    k_t = max(1, round(teacher_share * k))
    a_v = rng.standard_normal((k, dv)).astype(np.float32) / np.sqrt(k)
    a_q = rng.standard_normal((k, dq)).astype(np.float32) / np.sqrt(k)
    a_t = rng.standard_normal((k, dt)).astype(np.float32) / np.sqrt(k) * 4.0  # raw CLIP-like scale
    proj = np.zeros(k, dtype=np.float32)
    proj[:k_t] = 1.0
    kw = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    paths = SyntheticPaths(
        root=root,
        student_video=root / "features" / "student.zarr",
        teacher_video=root / "features" / "clip.zarr",
        student_text=root / "text" / "student.zarr",
        teacher_text=root / "text" / "clip.zarr",
        captions={s: root / "captions" / f"synth{s}.caption.txt" for s in SPLITS},
    )
    attrs = {"synthetic": True, "seed": seed}
    sv = StoreWriter(paths.student_video, dv, dtype=dtype, attrs={**attrs, "kind": "student_video"}, **kw)
    tv = StoreWriter(paths.teacher_video, dt, dtype=dtype, attrs={**attrs, "kind": "clip_frames"}, **kw)
    st = StoreWriter(paths.student_text, dq, dtype=dtype, attrs={**attrs, "kind": "student_text"}, **kw)
    tt = StoreWriter(paths.teacher_text, dt, dtype=dtype, attrs={**attrs, "kind": "clip_text"}, **kw)
    caps: dict[str, list[Caption]] = {s: [] for s in SPLITS}
    splits = [s for s in SPLITS if not (val_is_test and s == "val")]
    for split in splits:
        for v in range(n_videos[split]):
            vid = f"{split}{v:05d}"
            n_seg = int(rng.integers(2, 5))
            cuts = np.sort(rng.uniform(0.1, 0.9, n_seg - 1))
            edges = np.concatenate([[0.0], cuts, [1.0]])
            events = rng.standard_normal((n_seg, k)).astype(np.float32)
            bg = rng.standard_normal(k).astype(np.float32)
            n_s = int(rng.integers(rows[0], rows[1] + 1))
            if teacher_rows == "same":
                n_t = n_s
            elif teacher_rows == "fewer":
                n_t = max(1, n_s // 2)
            elif teacher_rows == "more":
                n_t = n_s * 2 + 1
            elif teacher_rows == "mixed":
                n_t = int(rng.integers(max(1, rows[0] // 2), 2 * rows[1] + 1))
            else:
                raise ValueError(f"teacher_rows must be same|fewer|more|mixed, got {teacher_rows!r}")

            def latents(n, edges=edges, events=events, bg=bg):
                t = (np.arange(n) + 0.5) / n
                seg = np.searchsorted(edges, t, side="right") - 1
                return events[seg] + 0.7 * bg

            zs = latents(n_s)
            sv.append(vid, zs @ a_v + noise * rng.standard_normal((n_s, dv)).astype(np.float32))
            zt = latents(n_t) * proj
            tv.append(vid, zt @ a_t + teacher_noise * rng.standard_normal((n_t, dt)).astype(np.float32))
            n_c = int(rng.integers(captions_per_video[0], captions_per_video[1] + 1))
            for c in range(n_c):
                cid = f"{vid}#enc#{c}"
                zq = events[int(rng.integers(n_seg))] + 0.3 * rng.standard_normal(k).astype(np.float32)
                n_tok = int(rng.integers(tokens[0], tokens[1] + 1))
                tok = (zq[None] + token_noise * rng.standard_normal((n_tok, k)).astype(np.float32)) @ a_q
                st.append(cid, tok + noise * rng.standard_normal((n_tok, dq)).astype(np.float32))
                tt.append(cid, ((zq * proj) @ a_t + teacher_noise * rng.standard_normal(dt).astype(np.float32))[None])
                caps[split].append(Caption(cid, vid, f"synthetic caption {c} of {vid}"))
    if val_is_test:
        caps["val"] = caps["test"]
    for w in (sv, tv, st, tt):
        w.close()
    for split in SPLITS:
        write_captions(paths.captions[split], caps[split])
    return paths
