"""Caption files: the MS-SL format and a TSV format.

MS-SL format (``{coll}{split}.caption.txt``): one query per line, ``<cap_id> <text>``, split at
the first space; ``cap_id`` is ``<video_id>#enc#<n>`` and the video id is the text before the
first ``#``.

TSV format: a header line ``query_id<TAB>video_id<TAB>text`` with optional ``start`` and
``end`` columns (seconds of the described moment; kept, never used for training).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path


class CaptionError(ValueError):
    """A caption file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Caption:
    cap_id: str
    video_id: str
    text: str
    start: float | None = None
    end: float | None = None


def video_id_of(cap_id: str) -> str:
    """Video id of an MS-SL caption id: the text before the first ``#``."""
    return cap_id.split("#", 1)[0]


def read_captions(path: str | os.PathLike) -> list[Caption]:
    """Read a caption file (MS-SL ``.txt`` or ``.tsv``), in file order.

    Raises :class:`CaptionError` naming the file and line for an empty text, a missing id,
    a duplicate caption id or a bad TSV row.
    """
    path = Path(path)
    if not path.exists():
        raise CaptionError(f"caption file {path} does not exist")
    caps = _read_tsv(path) if path.suffix == ".tsv" else _read_msrl(path)
    seen: dict[str, int] = {}
    for n, c in enumerate(caps, 1):
        if c.cap_id in seen:
            raise CaptionError(f"{path}: caption id {c.cap_id!r} appears twice (entries {seen[c.cap_id]} and {n})")
        seen[c.cap_id] = n
    if not caps:
        raise CaptionError(f"caption file {path} has no captions")
    return caps


def _read_msrl(path: Path) -> list[Caption]:
    out = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(" ", 1)
            if len(parts) < 2 or not parts[1].strip():
                raise CaptionError(f"{path}:{lineno}: expected '<video_id>#enc#<n> <caption text>', got {line[:80]!r}")
            cap_id, text = parts[0], parts[1].strip()
            vid = video_id_of(cap_id)
            if not vid:
                raise CaptionError(f"{path}:{lineno}: caption id {cap_id!r} has an empty video id")
            out.append(Caption(cap_id, vid, text))
    return out


def _read_tsv(path: Path) -> list[Caption]:
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        need = {"query_id", "video_id", "text"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise CaptionError(f"{path}:1: header must have columns {sorted(need)} (+ optional start, end); got {reader.fieldnames}")
        for lineno, row in enumerate(reader, 2):
            qid, vid, text = ((row.get(k) or "").strip() for k in ("query_id", "video_id", "text"))
            if not qid or not vid or not text:
                raise CaptionError(f"{path}:{lineno}: query_id, video_id and text must all be non-empty")
            try:
                start = float(row["start"]) if row.get("start") not in (None, "") else None
                end = float(row["end"]) if row.get("end") not in (None, "") else None
            except ValueError as exc:
                raise CaptionError(f"{path}:{lineno}: start/end must be numbers ({exc})") from None
            out.append(Caption(qid, vid, text, start, end))
    return out


def write_captions(path: str | os.PathLike, captions: list[Caption]) -> None:
    """Write captions in the MS-SL format (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for c in captions:
            if "\n" in c.text or " " in c.cap_id:
                raise CaptionError(f"caption {c.cap_id!r} cannot be written in the MS-SL format")
            f.write(f"{c.cap_id} {c.text}\n")
    os.replace(tmp, path)


def video_order(captions: list[Caption]) -> list[str]:
    """Unique video ids in order of first appearance (the evaluation gallery order)."""
    return list(dict.fromkeys(c.video_id for c in captions))
