"""Import and export of the MS-SL / DL-DKD feature release (the "msrl" layout, method spec §2).

Most PRVR users start from the public feature release, not from raw videos. This module
reads that release as it is into prvr's own stores (so every later stage is unchanged) and
writes any prvr dataset back into it (so features prvr extracted from raw videos work in
the other PRVR code bases).

Release layout of one collection (``<root>`` = ``<VisualSearch>/<coll>``)::

    TextData/{coll}train.caption.txt, {coll}val.caption.txt, {coll}test.caption.txt
    TextData/roberta_{coll}_query_feat.hdf5                student text: one dataset per cap_id, (tokens, Dq)
    TextData/clip_ViT_B_32_{coll}_query_feat.hdf5          teacher text: one dataset per cap_id, (1, 512)
    FeatureData/{visual_feature}/shape.txt                 "N D"
    FeatureData/{visual_feature}/id.txt                    N whitespace-separated frame ids
    FeatureData/{visual_feature}/feature.bin               N x D little-endian float32, row r <-> id r
    FeatureData/{visual_feature}/video2frames.txt          Python dict literal {vid: [frame ids in time order]}
    FeatureData/new_clip_vit_32_{coll}_vid_features.hdf5   teacher video: one dataset per video id, (n_t, 512)

prvr stores written by :func:`import_release` (the paths the raw-video stages write)::

    captions/{train,val,test}.caption.txt   MS-SL format
    features/student_video.zarr             one item per video, rows = feature steps (video2frames order)
    features/clip_frames.zarr               one item per video, the teacher rows as stored (n_t may differ from n_s)
    text/student_text.zarr                  one item per caption id, rows = tokens (raw)
    text/clip_text.zarr                     one item per caption id, 1 row (raw)

Memory stays bounded: ``feature.bin`` is memory-mapped and read in file order (mapped pages
are released as the import moves on), ``video2frames.txt`` is parsed incrementally by a
safe literal parser (string tokens go through :func:`ast.literal_eval` when they hold escapes;
nothing is ever ``eval``-ed), and frame ids live in one compact numpy byte-string array.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prvr.atomic import replace_dir, write_json
from prvr.data.captions import Caption, CaptionError, read_captions, write_captions
from prvr.store import FeatureStore, StoreWriter

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_VISUAL_FEATURE = {"tvr": "i3d_resnet", "activitynet": "i3d", "charades": "i3d_rgb_lgi"}
CLIP_MODEL = "ViT-B/32 (MS-SL/DL-DKD release features)"
STORE_CHUNK_BYTES = 16 << 20  # target size of one zarr chunk of an imported store
RELEASE_EVERY_BYTES = 64 << 20  # drop mapped release pages from our RSS after this many bytes
DOCS = "docs/reproduce.md"


class ReleaseError(ValueError):
    """The release is malformed or does not fit the config; the message names files, keys and ids."""


class MissingReleaseFiles(ReleaseError, FileNotFoundError):
    """Files of the release are missing; the message lists every one and how to produce it."""


# --------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------


@dataclass
class ReleaseLayout:
    """Paths of one collection of the release.

    Attributes:
        root: the collection folder (holds ``TextData/`` and ``FeatureData/``).
        collection: file-name prefix (``tvr``, ``activitynet``, ``charades``).
        visual_feature: the BigFile sub-folder of ``FeatureData/``.
        captions: split -> caption file.
        student_video: the BigFile folder.
        student_text, clip_text, clip_video: the three HDF5 files.
    """

    root: Path
    collection: str
    visual_feature: str
    captions: dict[str, Path]
    student_video: Path
    student_text: Path
    clip_text: Path
    clip_video: Path

    @classmethod
    def default(cls, root: str | os.PathLike, collection: str, visual_feature: str | None = None) -> ReleaseLayout:
        """The reference file names under the collection folder ``root``."""
        root = Path(root)
        vf = visual_feature or DEFAULT_VISUAL_FEATURE.get(collection)
        if not vf:
            raise ReleaseError(
                f"source.visual_feature: no default for collection {collection!r} "
                f"(known: {DEFAULT_VISUAL_FEATURE}); name the FeatureData sub-folder"
            )
        text = root / "TextData"
        feat = root / "FeatureData"
        return cls(
            root=root,
            collection=collection,
            visual_feature=vf,
            captions={s: text / f"{collection}{s}.caption.txt" for s in SPLITS},
            student_video=feat / vf,
            student_text=text / f"roberta_{collection}_query_feat.hdf5",
            clip_text=text / f"clip_ViT_B_32_{collection}_query_feat.hdf5",
            clip_video=feat / f"new_clip_vit_32_{collection}_vid_features.hdf5",
        )

    @classmethod
    def from_source(cls, source: dict) -> ReleaseLayout:
        """Layout of a config ``source`` block (``root``, ``collection``, ``visual_feature``, ``files``).

        ``root`` is the collection folder or its parent (the reference's ``VisualSearch``
        root, which holds ``<collection>/``). Entries of ``files`` override single paths;
        relative ones are taken under the collection folder.
        """
        fmt = source.get("format", "msrl")
        if fmt != "msrl":
            raise ReleaseError(f"source.format: {fmt!r} is not supported (only 'msrl')")
        coll = source["collection"]
        root = Path(source["root"])
        if not (root / "TextData").exists() and not (root / "FeatureData").exists() and (root / coll).is_dir():
            root = root / coll
        lay = cls.default(root, coll, source.get("visual_feature"))
        files = source.get("files") or {}
        for key, value in files.items():
            p = Path(value)
            p = p if p.is_absolute() else root / p
            if key.startswith("captions_") and key[9:] in SPLITS:
                lay.captions[key[9:]] = p
            elif key in ("student_video", "student_text", "clip_text", "clip_video"):
                setattr(lay, key, p)
            else:
                raise ReleaseError(f"source.files.{key}: unknown file key")
        return lay

    def bigfile_files(self) -> dict[str, Path]:
        return {n: self.student_video / n for n in ("shape.txt", "id.txt", "feature.bin", "video2frames.txt")}

    def files(self, teacher: bool = True) -> dict[str, Path]:
        """Every file the import reads, by role (Snakemake input names)."""
        out = {f"captions_{s}": p for s, p in self.captions.items()}
        out.update({f"student_video_{k.split('.')[0]}": p for k, p in self.bigfile_files().items()})
        out["student_text"] = self.student_text
        if teacher:
            out["clip_text"] = self.clip_text
            out["clip_video"] = self.clip_video
        return out

    def missing(self, teacher: bool = True) -> list[Path]:
        return [p for p in self.files(teacher).values() if not p.is_file()]

    def check(self, teacher: bool = True, dataset: str = "<dataset>") -> None:
        """Raise :class:`MissingReleaseFiles` listing every missing file, with how to get each."""
        missing = self.missing(teacher)
        if not missing:
            return
        clip = {self.clip_text, self.clip_video}
        lines = [f"the {self.collection!r} release under {self.root} is incomplete; missing files:"]
        lines += [f"  - {p}" for p in missing]
        if not self.root.exists():
            lines.append(
                f"The folder {self.root} does not exist: download the MS-SL feature release and unpack "
                f"it so that {self.root}/TextData and {self.root}/FeatureData exist, or set "
                f"datasets.{dataset}.source.root (see {DOCS})."
            )
        elif any(p not in clip for p in missing):
            lines.append(
                "Caption files, RoBERTa text features and the BigFile video features come from the MS-SL "
                f"feature release (see {DOCS}); file names can be overridden with "
                f"datasets.{dataset}.source.files."
            )
        if any(p in clip for p in missing):
            lines.append(
                "The CLIP ViT-B/32 teacher features are not part of the public MS-SL release "
                "(reference issue HuiGuanLab/DL-DKD#2). prvr can produce them from the raw videos:\n"
                f"  (a) add `videos: <folder of the raw videos>` and `source.teacher: videos` to "
                f"datasets.{dataset}: prvr's own clip_frames and clip_text stages then compute the "
                "teacher from the videos and the release provides everything else; or\n"
                "  (b) run prvr on the raw videos as a video dataset (video files named by the release's "
                "video ids, the release's caption files as its captions), then write its features in this "
                "layout with `python -m prvr.data.msrl export --dataset-dir results/<that dataset> "
                f"--out <dir> --collection {self.collection}` and copy {self.clip_text.name} and "
                f"{self.clip_video.name} from there into this release; or\n"
                "  (c) use the feature archive of the DL-DKD++ authors, which includes them."
            )
        raise MissingReleaseFiles("\n".join(lines))


def files_identical(a: str | os.PathLike, b: str | os.PathLike, block: int = 1 << 20) -> bool:
    """Byte equality of two files (size first, then SHA-256 of the contents)."""
    a, b = Path(a), Path(b)
    if a.stat().st_size != b.stat().st_size:
        return False
    digests = []
    for p in (a, b):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
        digests.append(h.hexdigest())
    return digests[0] == digests[1]


VAL_IS_TEST_WARNING = (
    "{val} and {test} are IDENTICAL: model selection (best epoch by val SumR) happens on the "
    "test set, so the test numbers are optimistic. The reference code and the paper's numbers "
    "were produced this way; give a separate validation file (source.files.captions_val) for an "
    "unbiased test."
)


# --------------------------------------------------------------------------------------
# video2frames.txt: incremental safe literal parser
# --------------------------------------------------------------------------------------

_WS = re.compile(r"\s*")
_TOKEN = re.compile(
    r"""(?P<p>[{}\[\]():,])"""
    r"""|(?P<s>[uU]?(?:'[^'\\\n]*(?:\\.[^'\\\n]*)*'|"[^"\\\n]*(?:\\.[^"\\\n]*)*"))"""
    r"""|(?P<n>-?\d+)"""
)
# fast path: a whole list of plain (escape-free) single-quoted strings, e.g. ['v_0', 'v_1']
_PLAIN_LIST = re.compile(r"\[\s*(?:'[^'\\\n]*'\s*,\s*)*(?:'[^'\\\n]*'\s*,?\s*)?\]")
_PLAIN_STR = re.compile(r"'([^'\\\n]*)'")


class _Scanner:
    """Tokens of a Python literal read from a text file in blocks (bounded memory)."""

    def __init__(self, path: Path, block: int = 4 << 20, margin: int = 1 << 20):
        self.path = path
        self.f = open(path, encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.block, self.margin = block, margin
        self.buf, self.pos, self.eof = "", 0, False
        self.lines_before = 0

    def close(self) -> None:
        self.f.close()

    def _fill(self) -> None:
        if self.eof or len(self.buf) - self.pos >= self.margin:
            return
        try:
            chunk = self.f.read(self.block)
        except UnicodeDecodeError as exc:
            raise ReleaseError(f"{self.path}: not valid UTF-8 text ({exc})") from None
        self.lines_before += self.buf.count("\n", 0, self.pos)
        self.buf = self.buf[self.pos :] + chunk
        self.pos = 0
        self.eof = not chunk

    def where(self) -> str:
        line = self.lines_before + self.buf.count("\n", 0, self.pos) + 1
        col = self.pos - (self.buf.rfind("\n", 0, self.pos) + 1) + 1
        return f"{self.path}:{line}:{col}"

    def error(self, msg: str) -> ReleaseError:
        near = self.buf[self.pos : self.pos + 40]
        return ReleaseError(f"{self.where()}: {msg} (near {near!r}); expected a dict literal {{video_id: [frame_id, ...]}}")

    def skip_ws(self) -> None:
        while True:
            self._fill()
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return

    def at_end(self) -> bool:
        self.skip_ws()
        return self.pos >= len(self.buf) and self.eof

    def token(self) -> tuple[str, str]:
        """Next token as (kind, text): kind p (punctuation), s (string literal), n (integer)."""
        self.skip_ws()
        m = _TOKEN.match(self.buf, self.pos)
        if m is None:
            raise self.error("unexpected end of file" if self.pos >= len(self.buf) else "not a literal token")
        self.pos = m.end()
        kind = m.lastgroup
        return kind, m.group(kind)

    def expect(self, chars: str) -> str:
        kind, text = self.token()
        if kind != "p" or text not in chars:
            self.pos -= len(text)
            raise self.error(f"expected one of {list(chars)}")
        return text

    def plain_list(self) -> list[str] | None:
        """Fast path for ``['a', 'b', ...]`` without escapes; None when it does not apply."""
        self.skip_ws()
        m = _PLAIN_LIST.match(self.buf, self.pos)
        if m is None:
            return None
        self.pos = m.end()
        return _PLAIN_STR.findall(m.group(0))


def _string_value(scanner: _Scanner, kind: str, text: str) -> str:
    if kind == "n":
        return text
    if kind != "s":
        raise scanner.error(f"expected a string, got {text!r}")
    body = text[1:] if text[0] in "uU" else text
    if "\\" not in body:
        return body[1:-1]
    try:
        value = ast.literal_eval(body)  # a single string literal: safe, never evaluated code
    except (ValueError, SyntaxError) as exc:
        raise scanner.error(f"bad string literal {text!r} ({exc})") from None
    return value


def iter_video2frames(path: str | os.PathLike, block_chars: int = 4 << 20) -> Iterator[tuple[str, list[str]]]:
    """Yield ``(video_id, [frame_id, ...])`` from a ``video2frames.txt`` dict literal, in file order.

    Accepts what Python's ``repr``/``str`` of a ``dict[str, list[str]]`` produces (single or
    double quotes, escapes, ``u`` prefixes, tuples instead of lists, trailing commas, integer
    ids). Anything else, such as a call or a name, is an error naming the line and column:
    the file is never evaluated. Duplicate video ids are an error. The file is read in blocks
    of ``block_chars`` characters (a token must be shorter than half a block).
    """
    path = Path(path)
    sc = _Scanner(path, block=block_chars, margin=min(1 << 20, block_chars // 2))
    seen: set[str] = set()
    try:
        sc.expect("{")
        while True:
            kind, text = sc.token()
            if kind == "p" and text == "}":
                break
            vid = _string_value(sc, kind, text)
            sc.expect(":")
            frames = sc.plain_list()
            if frames is None:
                close = {"[": "]", "(": ")"}[sc.expect("[(")]
                frames = []
                while True:
                    kind, text = sc.token()
                    if kind == "p" and text == close:
                        break
                    frames.append(_string_value(sc, kind, text))
                    kind, text = sc.token()
                    if kind == "p" and text == close:
                        break
                    if not (kind == "p" and text == ","):
                        sc.pos -= len(text)
                        raise sc.error(f"expected ',' or {close!r} in the frame list of {vid!r}")
            if vid in seen:
                raise sc.error(f"video id {vid!r} appears twice")
            seen.add(vid)
            yield vid, frames
            sep = sc.expect(",}")
            if sep == "}":
                break
        if not sc.at_end():
            raise sc.error("text after the closing '}'")
    finally:
        sc.close()


# --------------------------------------------------------------------------------------
# BigFile
# --------------------------------------------------------------------------------------


def _read_ids(path: Path, block: int = 4 << 20) -> np.ndarray:
    """Whitespace-separated ids of ``id.txt`` as a numpy byte-string array, read in blocks."""
    parts: list[np.ndarray] = []
    rest = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            if not chunk:
                break
            data = rest + chunk
            toks = data.split()
            if toks and not data[-1:].isspace():
                rest = toks.pop()
            else:
                rest = b""
            if toks:
                parts.append(np.array(toks, dtype=np.bytes_))
    if rest:
        parts.append(np.array([rest], dtype=np.bytes_))
    if not parts:
        return np.zeros(0, dtype="S1")
    width = max(p.dtype.itemsize for p in parts)
    return np.concatenate([p.astype(f"S{width}") for p in parts])


class BigFile:
    """Read side of a BigFile folder (``shape.txt``, ``id.txt``, ``feature.bin``, ``video2frames.txt``).

    Rows are memory-mapped; frame ids are kept sorted in one byte-string array for lookups.

    Args:
        folder: the BigFile folder.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        shape_txt = self.folder / "shape.txt"
        try:
            n, d = (int(v) for v in shape_txt.read_text(encoding="ascii").split())
        except (ValueError, UnicodeDecodeError):
            raise ReleaseError(f"{shape_txt}: expected one line 'N D' (rows, dimension)") from None
        self.n_rows, self.dim = n, d
        feat = self.folder / "feature.bin"
        size = feat.stat().st_size
        if size != n * d * 4:
            raise ReleaseError(
                f"{feat}: {size} bytes, but shape.txt says {n} x {d} float32 = {n * d * 4} bytes "
                "(truncated download, or shape.txt of another feature?)"
            )
        ids = _read_ids(self.folder / "id.txt")
        if len(ids) != n:
            raise ReleaseError(f"{self.folder / 'id.txt'}: {len(ids)} ids, but shape.txt says {n} rows")
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]
        del ids
        if n > 1:
            dup = np.flatnonzero(self._sorted[1:] == self._sorted[:-1])
            if len(dup):
                names = [self._sorted[i].decode("latin-1") for i in dup[:5]]
                raise ReleaseError(f"{self.folder / 'id.txt'}: {len(dup)} duplicate frame ids, e.g. {names}")
        self._file = open(feat, "rb")  # noqa: SIM115 (closed in close())
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.rows = (
            np.frombuffer(self._mm, dtype="<f4").reshape(n, d) if self._mm is not None else np.zeros((0, d), "<f4")
        )

    def row_index(self, frames: list[str], video_id: str = "") -> np.ndarray:
        """Rows (int64, in the given order) of frame ids; ReleaseError naming the unknown ones."""
        if not frames:
            return np.zeros(0, dtype=np.int64)
        q = np.array([f.encode("utf-8") for f in frames], dtype=np.bytes_)
        if len(self._sorted) == 0:
            pos, ok = np.zeros(len(q), dtype=np.int64), np.zeros(len(q), dtype=bool)
        else:
            pos = np.minimum(np.searchsorted(self._sorted, q), len(self._sorted) - 1)
            ok = self._sorted[pos] == q
        if not ok.all():
            bad = [frames[i] for i in np.flatnonzero(~ok)[:5]]
            raise ReleaseError(
                f"{self.folder / 'video2frames.txt'}: video {video_id!r} lists {int((~ok).sum())} frame id(s) "
                f"that {self.folder / 'id.txt'} does not have, e.g. {bad}"
            )
        return self._order[pos].astype(np.int64)

    def drop_index(self) -> None:
        """Free the frame-id index (after the last :meth:`row_index`); rows stay readable."""
        self._sorted = self._order = None

    def close(self) -> None:
        self.rows = None
        self.drop_index()
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view; the map goes with it
                pass
        self._file.close()

    def __enter__(self) -> BigFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _chunk_rows(dim: int, itemsize: int) -> int:
    return int(max(256, min(8192, STORE_CHUNK_BYTES // max(1, dim * itemsize))))


# --------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------


def _list_ids(ids: list[str], n: int = 20) -> str:
    head = ", ".join(ids[:n])
    return head + (f" (+{len(ids) - n} more)" if len(ids) > n else "")


@dataclass
class _Plan:
    captions: dict[str, list[Caption]]
    videos: list[str]  # student video ids to import, in feature.bin order
    rows: dict[str, np.ndarray]
    text_ids: list[str]
    clip_videos: list[str] = field(default_factory=list)
    clip_text_keys: dict[str, str] = field(default_factory=dict)  # cap_id -> h5 key
    summary: dict = field(default_factory=dict)


def _h5_keys(path: Path) -> set[str]:
    import h5py

    with h5py.File(path, "r") as h:
        return set(h.keys())


def _h5_dim(path: Path, key: str, what: str) -> int:
    import h5py

    with h5py.File(path, "r") as h:
        shape = h[key].shape
    if len(shape) not in (1, 2) or shape[-1] < 1:
        raise ReleaseError(f"{path}: dataset {key!r} has shape {shape}; {what} must be (rows, dim)")
    return int(shape[-1])


def _check_dim(found: int, want: int | None, what: str, where: Path, key: str) -> None:
    if want is not None and int(want) != found:
        raise ReleaseError(
            f"{where}: {what} features are {found}-d, but the config says {key} = {want} "
            "(wrong feature folder or file, or a preset for another collection?)"
        )


def plan_import(
    source: dict,
    layout: ReleaseLayout | None = None,
    teacher: bool | None = None,
    dataset: str = "<dataset>",
) -> tuple[ReleaseLayout, BigFile, _Plan]:
    """Validate a release against its config ``source`` block and decide what to import.

    Every check runs before anything is written: missing files (all listed), caption
    syntax, feature dimensions against ``source.dims``, caption ids whose video is missing
    from the video features (or, for training captions, from the teacher features), and
    caption ids missing from the text feature files.

    Returns:
        (layout, the opened BigFile, the plan). The caller closes the BigFile.
    """
    t0 = time.time()
    lay = layout or ReleaseLayout.from_source(source)
    teacher = (source.get("teacher", "release") == "release") if teacher is None else teacher
    lay.check(teacher=teacher, dataset=dataset)
    dims = source.get("dims") or {}
    on_missing = source.get("missing_videos", "error")
    prefix = f"datasets.{dataset}.source"
    warnings: list[str] = []

    caps = {}
    for s in SPLITS:
        try:
            caps[s] = read_captions(lay.captions[s])
        except CaptionError as exc:
            raise ReleaseError(str(exc)) from None
    val_is_test = files_identical(lay.captions["val"], lay.captions["test"])
    if val_is_test:
        msg = VAL_IS_TEST_WARNING.format(val=lay.captions["val"], test=lay.captions["test"])
        log.warning("!" * 20 + " " + msg)
        warnings.append(msg)

    big = BigFile(lay.student_video)
    try:
        _check_dim(big.dim, dims.get("student_video"), "student video", lay.student_video / "shape.txt", f"{prefix}.dims.student_video")
        referenced = dict.fromkeys(c.video_id for s in SPLITS for c in caps[s])
        rows: dict[str, np.ndarray] = {}
        n_release_videos = 0
        for vid, frames in iter_video2frames(lay.student_video / "video2frames.txt"):
            n_release_videos += 1
            if vid in referenced:
                r = big.row_index(frames, vid)
                if len(r):
                    rows[vid] = r
        big.drop_index()
        no_video = [v for v in referenced if v not in rows]
        no_teacher: list[str] = []
        clip_keys: set[str] = set()
        if teacher:
            clip_keys = _h5_keys(lay.clip_video)
            no_teacher = [v for v in dict.fromkeys(c.video_id for c in caps["train"]) if v not in clip_keys and v in rows]
        bad = set(no_video) | set(no_teacher)
        if bad:
            problems = []
            if no_video:
                problems.append(
                    f"{len(no_video)} video(s) named by caption ids are missing from the video features "
                    f"{lay.student_video} (video2frames.txt, or listed with no frame): {_list_ids(no_video)}"
                )
            if no_teacher:
                problems.append(
                    f"{len(no_teacher)} training video(s) are missing from the CLIP teacher file "
                    f"{lay.clip_video}: {_list_ids(no_teacher)}"
                )
            if on_missing != "skip":
                log.error("missing videos (complete list): %s", sorted(bad))
                raise ReleaseError("; ".join(problems) + f" — set {prefix}.missing_videos: skip to drop their captions")
            for s in SPLITS:
                before = len(caps[s])
                caps[s] = [c for c in caps[s] if c.video_id not in bad]
                if before != len(caps[s]):
                    msg = f"{s}: skipped {before - len(caps[s])} of {before} captions whose video is missing"
                    log.warning(msg)
                    warnings.append(msg)
                if not caps[s]:
                    raise ReleaseError(f"{lay.captions[s]}: no caption left after skipping missing videos")
            warnings += problems
            log.warning("skipped videos: %s", "; ".join(problems))
        keep_videos = dict.fromkeys(c.video_id for s in SPLITS for c in caps[s])
        videos = sorted(keep_videos, key=lambda v: int(rows[v][0]))

        text_ids = list(dict.fromkeys(c.cap_id for s in SPLITS for c in caps[s]))
        text_keys = _h5_keys(lay.student_text)
        miss_text = [c for c in text_ids if c not in text_keys]
        if miss_text:
            raise ReleaseError(f"{len(miss_text)} caption id(s) are missing from {lay.student_text}: {_list_ids(miss_text)}")
        _check_dim(_h5_dim(lay.student_text, text_ids[0], "text"), dims.get("student_text"), "student text",
                   lay.student_text, f"{prefix}.dims.student_text")

        plan = _Plan(captions=caps, videos=videos, rows={v: rows[v] for v in videos}, text_ids=text_ids)
        if teacher:
            plan.clip_videos = [v for v in videos if v in clip_keys]
            ckeys = _h5_keys(lay.clip_text)
            train_caps = {c.cap_id for c in caps["train"]}
            miss_train = []
            for cap_id in text_ids:
                if cap_id in ckeys:
                    plan.clip_text_keys[cap_id] = cap_id
                elif cap_id.replace("#enc#", "#", 1) in ckeys:
                    plan.clip_text_keys[cap_id] = cap_id.replace("#enc#", "#", 1)
                elif cap_id in train_caps:
                    miss_train.append(cap_id)
            if miss_train:
                raise ReleaseError(
                    f"{len(miss_train)} training caption id(s) have no CLIP text vector in {lay.clip_text} "
                    f"(tried <vid>#enc#<n> and <vid>#<n>): {_list_ids(miss_train)}"
                )
            some = next(iter(plan.clip_text_keys.values()))
            _check_dim(_h5_dim(lay.clip_text, some, "CLIP text"), dims.get("clip"), "CLIP text", lay.clip_text, f"{prefix}.dims.clip")
            _check_dim(_h5_dim(lay.clip_video, plan.clip_videos[0], "CLIP video"), dims.get("clip"), "CLIP video",
                       lay.clip_video, f"{prefix}.dims.clip")
            n_no_ct = len(text_ids) - len(plan.clip_text_keys)
            n_no_cv = len(videos) - len(plan.clip_videos)
            if n_no_ct or n_no_cv:
                msg = (
                    f"teacher features missing for {n_no_ct} val/test caption(s) and {n_no_cv} val/test video(s) "
                    "(the reference extracted the teacher for train and val only); imported without them"
                )
                log.warning(msg)
                warnings.append(msg)
    except BaseException:
        big.close()
        raise
    plan.summary = {
        "collection": lay.collection,
        "root": str(lay.root),
        "visual_feature": lay.visual_feature,
        "files": {k: str(p) for k, p in lay.files(teacher).items()},
        "val_equals_test": val_is_test,
        "teacher": "release" if teacher else "videos",
        "n_release_videos": n_release_videos,
        "splits": {s: {"captions": len(caps[s]), "videos": len({c.video_id for c in caps[s]})} for s in SPLITS},
        "warnings": warnings,
        "plan_seconds": round(time.time() - t0, 3),
    }
    return lay, big, plan


class _Pager:
    """Read-ahead and release of a read-only memory map while a reader moves forward through it.

    Asks the kernel to read the next ``ahead`` bytes asynchronously (``MADV_WILLNEED``), so disk
    reads overlap with the store writes, and drops the pages behind the reader from this
    process (``MADV_DONTNEED``; they stay in the page cache), so the RSS stays bounded.
    """

    def __init__(self, mm: mmap.mmap | None, ahead: int = 64 << 20, release_every: int = RELEASE_EVERY_BYTES):
        self.mm = mm
        self.size = len(mm) if mm is not None else 0
        self.ahead, self.release_every = ahead, release_every
        self.prefetched = 0  # end of the range already advised WILLNEED
        self.released = 0  # position of the last release
        if mm is not None and hasattr(mmap, "MADV_SEQUENTIAL"):
            mm.madvise(mmap.MADV_SEQUENTIAL)

    def _advise(self, flag: str, start: int, end: int) -> None:
        start -= start % mmap.PAGESIZE
        end = min(end, self.size)
        if self.mm is None or end <= start or not hasattr(mmap, flag):
            return
        self.mm.madvise(getattr(mmap, flag), start, end - start)

    def at(self, pos: int) -> None:
        """The reader is at byte ``pos`` (monotone in the common case; any order is correct)."""
        if self.prefetched < self.size and pos + self.ahead // 2 > self.prefetched:
            self._advise("MADV_WILLNEED", max(pos, self.prefetched), pos + self.ahead)
            self.prefetched = min(pos + self.ahead, self.size)
        if pos - self.released >= self.release_every:
            # everything behind, not only the last stretch: rows still buffered by a store writer
            # fault their pages back in when flushed, and those must go too
            self._advise("MADV_DONTNEED", 0, pos)
            self.released = pos - pos % mmap.PAGESIZE

    def done(self) -> None:
        self._advise("MADV_DONTNEED", 0, self.size)


def _import_bigfile(big: BigFile, plan: _Plan, out: Path, dtype: str, attrs: dict) -> dict:
    itemsize = np.dtype(dtype).itemsize
    row_bytes = big.dim * 4
    n_bytes = 0
    t0 = time.time()
    pager = _Pager(big._mm)
    with StoreWriter(out, big.dim, dtype=dtype, attrs=attrs, chunk_rows=_chunk_rows(big.dim, itemsize)) as w:
        for k, vid in enumerate(plan.videos):
            r = plan.rows[vid]
            pager.at(int(r[0]) * row_bytes)
            if r[-1] - r[0] == len(r) - 1 and np.all(np.diff(r) == 1):
                x = big.rows[int(r[0]) : int(r[-1]) + 1]
            else:
                x = big.rows[r]
            w.append(vid, x)
            n_bytes += x.nbytes
            if (k + 1) % 2000 == 0:
                dt = time.time() - t0
                log.info("student_video: %d/%d videos, %.0f MB/s", k + 1, len(plan.videos), n_bytes / 1e6 / max(dt, 1e-9))
    pager.done()
    return {"bytes_read": n_bytes, "seconds": round(time.time() - t0, 3)}


@dataclass(slots=True)
class _H5Item:
    item_id: str
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int | None  # byte offset of a contiguous, unfiltered dataset (read from the map), else None


def _h5_items(h, path: Path, items: list[tuple[str, str]]) -> list[_H5Item]:
    """Shape, dtype and raw-data offset of every dataset (low-level API: ~20 us per dataset)."""
    import h5py

    out = []
    little = sys.byteorder == "little"
    first_type, first_dtype = None, None
    for item_id, key in items:
        try:
            dsid = h5py.h5d.open(h.id, key.encode("utf-8"))
        except KeyError:
            raise ReleaseError(f"{path}: no dataset {key!r}") from None
        shape = tuple(dsid.shape)
        tid = dsid.get_type()
        if first_type is not None and tid == first_type:  # H5Tequal: cheaper than building a numpy dtype
            dt = first_dtype
        else:
            dt = dsid.dtype
            if first_type is None:
                first_type, first_dtype = tid, dt
        offset = None
        native = dt.kind == "f" and (dt.byteorder in "=|" or (dt.byteorder == "<") == little)
        if native and shape and all(shape):
            try:
                offset = dsid.get_offset()  # None unless contiguous and allocated
            except Exception:  # compact or virtual layouts
                offset = None
        out.append(_H5Item(item_id, key, shape, dt, offset))
        dsid.close()
    return out


def _import_h5(path: Path, items: list[tuple[str, str]], out: Path, dtype: str, attrs: dict, what: str,
               dim: int | None, one_row: bool = False) -> dict:
    """Copy HDF5 datasets ``key`` into store items ``item_id`` (``items`` = [(item_id, key)]).

    Contiguous, unfiltered float datasets (what h5py writes by default) are read straight
    from a memory map of the file, in file order; others go through HDF5. The store's items
    are therefore in file order (consumers look items up by id).
    """
    import h5py

    if not items:
        raise ReleaseError(f"{path}: no {what} dataset to import")
    t0 = time.time()
    n_bytes = 0
    x = None
    with h5py.File(path, "r") as h, open(path, "rb") as fh:
        metas = _h5_items(h, path, items)
        metas.sort(key=lambda m: (m.offset is None, m.offset or 0))
        d = int(metas[0].shape[-1]) if metas[0].shape else 0
        if dim is not None and d != dim:
            raise ReleaseError(f"{path}: {what} features are {d}-d, expected {dim}")
        size = os.fstat(fh.fileno()).st_size
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        pager = _Pager(mm)
        itemsize = np.dtype(dtype).itemsize
        try:
            with StoreWriter(out, d, dtype=dtype, attrs=attrs, chunk_rows=_chunk_rows(d, itemsize)) as w:
                for m in metas:
                    shape = m.shape
                    if len(shape) == 1:
                        shape = (1, shape[0])
                    if len(shape) != 2 or shape[1] != d:
                        raise ReleaseError(f"{path}: dataset {m.key!r} has shape {m.shape}; expected (n, {d}) like the others")
                    if shape[0] == 0:
                        raise ReleaseError(f"{path}: dataset {m.key!r} has no rows")
                    if one_row and shape[0] != 1:
                        raise ReleaseError(f"{path}: dataset {m.key!r} has {shape[0]} rows; a CLIP text vector is one row (1, {d})")
                    if m.dtype.kind != "f":
                        raise ReleaseError(f"{path}: dataset {m.key!r} has dtype {m.dtype}; expected floating point")
                    if m.offset is not None and mm is not None:
                        pager.at(m.offset)
                        x = np.frombuffer(mm, dtype=m.dtype, count=shape[0] * shape[1], offset=m.offset).reshape(shape)
                    else:
                        x = h[m.key][()].reshape(shape)
                    w.append(m.item_id, x)
                    n_bytes += x.nbytes
            x = None
        finally:
            pager.done()
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass
    return {"bytes_read": n_bytes, "seconds": round(time.time() - t0, 3)}


def import_release(
    source: dict,
    captions: dict[str, str | os.PathLike],
    student_video: str | os.PathLike,
    student_text: str | os.PathLike,
    clip_frames: str | os.PathLike | None = None,
    clip_text: str | os.PathLike | None = None,
    summary: str | os.PathLike | None = None,
    dataset: str = "<dataset>",
    threads: int = 1,
) -> dict:
    """Import one collection of the release into prvr's stores (the paths the raw-video stages write).

    Args:
        source: the dataset's config ``source`` block: ``root``, ``collection`` and optionally
            ``visual_feature``, ``files``, ``dims`` ({student_video, student_text, clip}),
            ``missing_videos`` (``error`` | ``skip``), ``teacher`` (``release`` | ``videos``),
            ``dtype`` (``float32`` | ``float16``).
        captions: split -> output caption file (MS-SL format).
        student_video, student_text: output stores (rows = feature steps / tokens).
        clip_frames, clip_text: output teacher stores; required unless ``teacher: videos``.
        summary: optional JSON file with counts, warnings, bytes and seconds.
        dataset: dataset name, for messages.
        threads: 2 or more imports the video features and the HDF5 files concurrently.

    Returns:
        The summary dict.

    Raises:
        MissingReleaseFiles: listing every missing file (and how to produce the CLIP teacher).
        ReleaseError: malformed files, dimensions that disagree with ``source.dims``, caption
            ids whose video or text features are missing (unless ``missing_videos: skip``).
    """
    t0 = time.time()
    teacher = source.get("teacher", "release") == "release"
    if teacher and (clip_frames is None or clip_text is None):
        raise ValueError("import_release: clip_frames and clip_text outputs are needed unless source.teacher is 'videos'")
    dtype = source.get("dtype", "float32")
    dims = source.get("dims") or {}
    lay, big, plan = plan_import(source, teacher=teacher, dataset=dataset)
    base_attrs = {"source": "msrl", "collection": lay.collection, "release_root": str(lay.root)}
    clip_attrs = {**base_attrs, "model": CLIP_MODEL, "random_weights": False}
    info = {}

    def video_part() -> None:
        try:
            info["student_video"] = _import_bigfile(
                big, plan, Path(student_video), dtype,
                {**base_attrs, "kind": "student_video", "visual_feature": lay.visual_feature, "file": str(lay.student_video)},
            )
        finally:
            big.close()

    def text_part() -> None:
        info["student_text"] = _import_h5(
            lay.student_text, [(c, c) for c in plan.text_ids], Path(student_text), dtype,
            {**base_attrs, "kind": "student_text", "file": str(lay.student_text)}, "student text", dims.get("student_text"),
        )
        if teacher:
            info["clip_frames"] = _import_h5(
                lay.clip_video, [(v, v) for v in plan.clip_videos], Path(clip_frames), dtype,
                {**clip_attrs, "kind": "clip_frames", "file": str(lay.clip_video)}, "CLIP video", dims.get("clip"),
            )
            info["clip_text"] = _import_h5(
                lay.clip_text, list(plan.clip_text_keys.items()), Path(clip_text), dtype,
                {**clip_attrs, "kind": "clip_text", "file": str(lay.clip_text)}, "CLIP text", dims.get("clip"), one_row=True,
            )

    try:
        for s in SPLITS:
            write_captions(captions[s], plan.captions[s])
    except BaseException:
        big.close()
        raise
    if threads > 1:  # the BigFile and the HDF5 files in parallel (copies and file writes release the GIL)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(video_part), pool.submit(text_part)]
            for f in futures:
                f.result()
    else:
        video_part()
        text_part()
    out = dict(plan.summary)
    out["stores"] = info
    out["seconds"] = round(time.time() - t0, 3)
    out["bytes_read"] = sum(v["bytes_read"] for v in info.values())
    log.info("imported %s: %.1f MB in %.1f s", lay.collection, out["bytes_read"] / 1e6, out["seconds"])
    if summary:
        write_json(summary, out)
    return out


def dataset_paths(dataset_dir: str | os.PathLike) -> dict:
    """The standard prvr paths of one dataset folder (``results/<dataset>``)."""
    d = Path(dataset_dir)
    return {
        "captions": {s: d / "captions" / f"{s}.caption.txt" for s in SPLITS},
        "student_video": d / "features" / "student_video.zarr",
        "clip_frames": d / "features" / "clip_frames.zarr",
        "student_text": d / "text" / "student_text.zarr",
        "clip_text": d / "text" / "clip_text.zarr",
    }


# --------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------


def _iter_items(store: FeatureStore, block_bytes: int = 64 << 20) -> Iterator[tuple[str, np.ndarray]]:
    """``(id, rows)`` of every item in store order, reading big row slices (bounded memory)."""
    arr = store.rows()
    off = store.offsets
    per_block = max(1, block_bytes // max(1, store.dim * 4))
    k = 0
    n = len(store.ids)
    while k < n:
        lo = int(off[k])
        j = k + 1
        while j < n and int(off[j + 1]) - lo <= per_block:
            j += 1
        hi = int(off[j])
        block = np.asarray(arr[lo:hi], dtype=np.float32) if hi > lo else np.zeros((0, store.dim), np.float32)
        for i in range(k, j):
            yield store.ids[i], block[int(off[i]) - lo : int(off[i + 1]) - lo]
        k = j


def _write_h5(path: Path, items: Iterable[tuple[str, np.ndarray]]) -> int:
    import h5py

    n = 0
    with h5py.File(path, "w") as h:
        for key, x in items:
            if "/" in key:
                raise ReleaseError(f"{path}: id {key!r} contains '/', which HDF5 reads as a group path")
            h.create_dataset(key, data=np.ascontiguousarray(x, dtype="<f4"))
            n += 1
    return n


def export_release(
    out_root: str | os.PathLike,
    collection: str,
    captions: dict[str, str | os.PathLike],
    student_video: str | os.PathLike,
    student_text: str | os.PathLike,
    clip_frames: str | os.PathLike | None = None,
    clip_text: str | os.PathLike | None = None,
    visual_feature: str = "prvr",
) -> Path:
    """Write a prvr dataset in the release layout, under ``<out_root>/<collection>/``.

    The result is what MS-SL / DL-DKD / DL-DKD++ read with ``root_path=<out_root>`` and
    ``collection=<collection>``, ``visual_feature=<visual_feature>``. Canonical form:
    ``feature.bin`` holds the videos in store order, each video's rows contiguous, frame ids
    ``<vid>_<i>``; ``id.txt`` joins them with single spaces; ``shape.txt`` is ``"N D"``;
    ``video2frames.txt`` is the ``repr`` of the dict. Every HDF5 dataset is float32; CLIP text
    vectors are (1, D) under the caption id. Written to a temp folder and renamed into place.

    Args:
        out_root: the VisualSearch-style root.
        collection: collection name (file-name prefix).
        captions: split -> prvr caption file.
        student_video, student_text: prvr stores.
        clip_frames, clip_text: prvr teacher stores (skipped when None).
        visual_feature: name of the ``FeatureData`` sub-folder.

    Returns:
        The collection folder.
    """
    t0 = time.time()
    out_root = Path(out_root)
    final = out_root / collection
    tmp = out_root / f".{collection}.tmp-{uuid.uuid4().hex[:8]}"
    text_dir, feat_dir = tmp / "TextData", tmp / "FeatureData"
    big_dir = feat_dir / visual_feature
    big_dir.mkdir(parents=True)
    try:
        for s in SPLITS:
            write_captions(text_dir / f"{collection}{s}.caption.txt", read_captions(captions[s]))
        sv = FeatureStore.open(student_video, name="student video")
        n_rows = 0
        with open(big_dir / "feature.bin", "wb") as fb, open(big_dir / "id.txt", "w", encoding="utf-8") as fi, \
                open(big_dir / "video2frames.txt", "w", encoding="utf-8") as fv:
            fv.write("{")
            for k, (vid, x) in enumerate(_iter_items(sv)):
                x.astype("<f4", copy=False).tofile(fb)
                fids = [f"{vid}_{i}" for i in range(len(x))]
                if fids:
                    fi.write((" " if n_rows else "") + " ".join(fids))
                fv.write((", " if k else "") + f"{vid!r}: {fids!r}")
                n_rows += len(x)
            fv.write("}")
        (big_dir / "shape.txt").write_text(f"{n_rows} {sv.dim}", encoding="utf-8")
        _write_h5(text_dir / f"roberta_{collection}_query_feat.hdf5", _iter_items(FeatureStore.open(student_text, name="student text")))
        if clip_text is not None:
            _write_h5(text_dir / f"clip_ViT_B_32_{collection}_query_feat.hdf5", _iter_items(FeatureStore.open(clip_text, name="CLIP text")))
        if clip_frames is not None:
            _write_h5(feat_dir / f"new_clip_vit_32_{collection}_vid_features.hdf5", _iter_items(FeatureStore.open(clip_frames, name="CLIP frames")))
        final.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s in %.1f s", collection, final, time.time() - t0)
    return final


def export_dataset(dataset_dir: str | os.PathLike, out_root: str | os.PathLike, collection: str,
                   visual_feature: str = "prvr", teacher: bool = True) -> Path:
    """:func:`export_release` of a prvr dataset folder (``results/<dataset>``, standard paths)."""
    p = dataset_paths(dataset_dir)
    return export_release(
        out_root, collection, p["captions"], p["student_video"], p["student_text"],
        p["clip_frames"] if teacher else None, p["clip_text"] if teacher else None, visual_feature,
    )


# --------------------------------------------------------------------------------------
# helpers of the workflow (rules/import.smk): plain functions of config blocks
# --------------------------------------------------------------------------------------


def release_input_files(source: dict, dataset: str, teacher: bool = True) -> dict[str, str]:
    """Every release file the import of ``dataset`` reads, by role; raises listing all missing files."""
    lay = ReleaseLayout.from_source(source)
    lay.check(teacher=teacher, dataset=dataset)
    return {k: str(p) for k, p in lay.files(teacher).items()}


def val_is_test_message(source: dict) -> str | None:
    """The val == test warning for a release whose two caption files are identical, else None."""
    try:
        caps = ReleaseLayout.from_source(source).captions
        same = caps["val"].is_file() and caps["test"].is_file() and files_identical(caps["val"], caps["test"])
    except (OSError, ValueError):
        return None
    return VAL_IS_TEST_WARNING.format(val=caps["val"], test=caps["test"]) if same else None


def export_names(dataset: str, dataset_cfg: dict) -> tuple[str, str]:
    """(collection, visual_feature) under which a dataset is exported.

    An imported dataset keeps its release names; a video dataset is exported as collection
    ``<dataset>`` with features ``prvr_<extractor kinds>`` (e.g. ``prvr_i3d_resnet``).

    Args:
        dataset: the dataset name.
        dataset_cfg: its merged config (``prvr.config.dataset_config``).
    """
    src = dataset_cfg.get("source")
    if src:
        return src["collection"], ReleaseLayout.from_source(src).visual_feature
    kinds = [e["kind"] for e in dataset_cfg.get("student_video") or []]
    return dataset, "prvr_" + "_".join(kinds) if kinds else "prvr"


# --------------------------------------------------------------------------------------
# command line: python -m prvr.data.msrl {check,import,export}
# --------------------------------------------------------------------------------------


def _source_from_args(a) -> dict:
    src = {"format": "msrl", "root": a.root, "collection": a.collection}
    if a.visual_feature:
        src["visual_feature"] = a.visual_feature
    for key in ("missing_videos", "teacher", "dtype"):
        if getattr(a, key, None):
            src[key] = getattr(a, key)
    return src


def main(argv: list[str] | None = None) -> int:
    """``python -m prvr.data.msrl {check,import,export} ...``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m prvr.data.msrl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("check", "validate a release (files, ids, dims) without writing"),
                        ("import", "import a release into a prvr dataset folder")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--root", required=True, help="collection folder (TextData/, FeatureData/) or its parent")
        p.add_argument("--collection", required=True, help="tvr | activitynet | charades | <name>")
        p.add_argument("--visual-feature", help="FeatureData sub-folder (default by collection)")
        p.add_argument("--missing-videos", choices=["error", "skip"])
        p.add_argument("--teacher", choices=["release", "videos"], help="videos: skip the CLIP teacher files")
        if name == "import":
            p.add_argument("--out", required=True, help="prvr dataset folder, e.g. results/tvr")
            p.add_argument("--dtype", choices=["float32", "float16"])
    p = sub.add_parser("export", help="write a prvr dataset folder in the release layout")
    p.add_argument("--dataset-dir", required=True, help="prvr dataset folder, e.g. results/demo")
    p.add_argument("--out", required=True, help="VisualSearch-style root; <out>/<collection>/ is written")
    p.add_argument("--collection", required=True)
    p.add_argument("--visual-feature", default="prvr")
    p.add_argument("--no-teacher", action="store_true", help="do not write the CLIP teacher files")
    a = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if a.cmd == "check":
            src = _source_from_args(a)
            lay, big, plan = plan_import(src)
            big.close()
            print(json.dumps(plan.summary, indent=2))
        elif a.cmd == "import":
            src = _source_from_args(a)
            p = dataset_paths(a.out)
            teacher = src.get("teacher", "release") == "release"
            res = import_release(
                src, p["captions"], p["student_video"], p["student_text"],
                p["clip_frames"] if teacher else None, p["clip_text"] if teacher else None,
                summary=Path(a.out) / "import" / "summary.json",
            )
            print(json.dumps({k: res[k] for k in ("splits", "bytes_read", "seconds", "warnings")}, indent=2))
        else:
            out = export_dataset(a.dataset_dir, a.out, a.collection, a.visual_feature, teacher=not a.no_teacher)
            print(out)
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
