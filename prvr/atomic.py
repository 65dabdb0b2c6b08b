"""Atomic file and folder writes: write next to the target, then rename into place.

A reader (or Snakemake) never sees a half-written output: either the old file or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path


def temp_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A unique hidden name beside ``path`` (same filesystem, so ``os.replace`` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


def write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_json(path: str | os.PathLike, obj, fsync: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n", fsync=fsync)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move folder ``tmp`` to ``final``, replacing an old ``final`` (removed only afterwards)."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = temp_sibling(final, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final
