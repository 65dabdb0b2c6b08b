"""Caption features: student token features (transformers, RoBERTa in the paper) and teacher
CLIP text features (open_clip).

Stores (see :mod:`prvr.store`), one item per caption id:

* ``student_text``: rows = the caption's tokens, dim = the encoder's hidden size; the
  encoder's **last hidden state**, not normalised (the loader L2-normalises each token and keeps
  the first ``max_desc_l`` tokens, method.md §2.3). Which layer and whether ``<s>``/``</s>``
  were included in the reference features is unknown (method.md §10 q7). prvr's choice:
  ``special_tokens: true`` (default) keeps ``<s> … </s>`` as rows, exactly what the tokenizer
  produces with its own special tokens; ``false`` encodes the caption with the special tokens
  (the model always sees them) but stores only the rows of the caption's own tokens.
  ``max_tokens`` caps the tokenised length, special tokens included.
* ``clip_text``: one row per caption, the raw (un-normalised) ``model.encode_text`` output of
  the caption tokenised by the model's own tokenizer (context 77, truncated) (method.md §2.4).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from prvr.data.captions import Caption, CaptionError, read_captions
from prvr.encoders.clip import RANDOM_MARKER, ModelLoadError, file_digest, load_clip, state_digest
from prvr.store import StoreWriter, library_versions

log = logging.getLogger(__name__)

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _device(device: str) -> str:
    from prvr.config import resolve_device

    return resolve_device(device)


def read_all_captions(paths: list[str | os.PathLike]) -> list[Caption]:
    """Captions of several split files, in file order; a caption id found twice is an error.

    Raises:
        CaptionError: a file is missing/malformed, or two files share a caption id (both named).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise CaptionError("no caption files given")
    out: list[Caption] = []
    where: dict[str, Path] = {}
    for p in paths:
        p = Path(p)
        for c in read_captions(p):
            if c.cap_id in where:
                raise CaptionError(f"caption id {c.cap_id!r} appears in both {where[c.cap_id]} and {p}")
            where[c.cap_id] = p
            out.append(c)
    return out


def _weights_digest(folder: Path, model: torch.nn.Module) -> str:
    for name in HF_WEIGHT_FILES:
        if (folder / name).exists():
            return file_digest(folder / name)
    shards = sorted(folder.glob("model-*.safetensors")) or sorted(folder.glob("pytorch_model-*.bin"))
    if shards:
        h = hashlib.sha256()
        for s in shards:
            h.update(file_digest(s, 64).encode())
        return h.hexdigest()[:16]
    return state_digest(model)


def load_text_encoder(path: str | os.PathLike, device: str = "cpu"):
    """Load a transformers text encoder and its tokenizer from a local folder, in eval mode.

    Args:
        path: a folder written by ``save_pretrained`` (``config.json``, weights, tokenizer files).
        device: torch device.

    Returns:
        ``(tokenizer, model, identity)``; identity = {"model", "model_type", "hidden_size",
        "weights_sha256", "random_weights"} (recorded in store attributes).

    Raises:
        ModelLoadError: the folder, its config, weights or tokenizer cannot be loaded (the path
            is named).
    """
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(
            f"student_text.model: {folder} is not a folder (expected a local transformers model folder)"
        )
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"student_text.model: no config.json in {folder} (expected a save_pretrained folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises OSError/ValueError/... for a bad folder
        raise ModelLoadError(f"student_text.model: cannot load the tokenizer from {folder}: {exc}") from exc
    try:
        try:
            model = AutoModel.from_pretrained(str(folder), add_pooling_layer=False)
        except TypeError:  # architectures without a pooler do not take the keyword
            model = AutoModel.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelLoadError(f"student_text.model: cannot load the model from {folder}: {exc}") from exc
    model.eval().to(device)
    random_weights = (folder / RANDOM_MARKER).exists()
    if random_weights:
        log.warning(
            "!!! text model %s is marked %s: RANDOM demo weights, features carry no semantics !!!",
            folder,
            RANDOM_MARKER,
        )
    identity = {
        "model": str(folder),
        "model_type": getattr(model.config, "model_type", None),
        "hidden_size": int(model.config.hidden_size),
        "weights_sha256": _weights_digest(folder, model),
        "random_weights": random_weights,
    }
    return tokenizer, model, identity


def _special_mask(special_ids: set[int], ids: list[int]) -> np.ndarray:
    """True for special tokens (``<s>``, ``</s>``, ``<pad>``...)."""
    return np.asarray([i in special_ids for i in ids], dtype=bool)


def encode_student_text(
    captions: list[str | os.PathLike],
    cfg: dict,
    out_store: str | os.PathLike,
    device: str = "auto",
    dtype: str = "float32",
) -> dict:
    """Token-level features of every caption (last hidden state) into a ragged store.

    Args:
        captions: caption files (MS-SL ``.txt`` or ``.tsv``); all their captions are encoded.
        cfg: the ``student_text`` block: ``model`` (local folder), ``max_tokens`` (default 64,
            special tokens included), ``batch_size`` (default 32), ``special_tokens`` (default
            True: keep ``<s>``/``</s>`` rows; see the module docstring).
        out_store: the ``.zarr`` store to write (atomically).
        device: ``auto``, ``cpu``, ``cuda``...
        dtype: on-disk dtype (``float32`` or ``float16``).

    Returns:
        dict with ``path``, ``n_items``, ``n_rows`` (tokens), ``dim``, ``seconds``.

    The store holds, for caption i, rows of shape (n_i, hidden) with n_i = the tokenised length
    (capped at ``max_tokens``; minus the special tokens when ``special_tokens`` is false).
    Captions are encoded in chunks, sorted by length inside each chunk (little padding), and
    written in file order.
    """
    t0 = time.perf_counter()
    caps = read_all_captions(captions)
    max_tokens = int(cfg.get("max_tokens", 64))
    batch_size = int(cfg.get("batch_size", 32))
    keep_special = bool(cfg.get("special_tokens", True))
    if "model" not in cfg:
        raise ModelLoadError("student_text: the 'model' key (a local transformers model folder) is missing")
    dev = _device(device)
    tokenizer, model, identity = load_text_encoder(cfg["model"], dev)
    dim = int(model.config.hidden_size)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= int(model.config.pad_token_id) + 1  # RoBERTa positions start after the pad id
    if limit is not None and max_tokens > limit:
        raise ModelLoadError(f"student_text.max_tokens={max_tokens} exceeds what {cfg['model']} supports ({limit})")
    attrs = {
        "kind": "student_text",
        **identity,
        "layer": "last_hidden_state",
        "max_tokens": max_tokens,
        "special_tokens": keep_special,
        "caption_files": [str(p) for p in ([captions] if isinstance(captions, (str, os.PathLike)) else captions)],
        "versions": library_versions(),
    }
    enc = tokenizer([c.text for c in caps], truncation=True, max_length=max_tokens, add_special_tokens=True)
    ids_all: list[list[int]] = enc["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    special_ids = set(tokenizer.all_special_ids)
    chunk = max(batch_size * 64, 1)
    n_rows = 0
    with StoreWriter(out_store, dim, dtype=dtype, attrs=attrs) as writer, torch.inference_mode():
        for c0 in range(0, len(caps), chunk):
            idx = list(range(c0, min(c0 + chunk, len(caps))))
            idx_sorted = sorted(idx, key=lambda i: len(ids_all[i]))
            feats: dict[int, np.ndarray] = {}
            for b0 in range(0, len(idx_sorted), batch_size):
                batch = idx_sorted[b0 : b0 + batch_size]
                width = max(len(ids_all[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attn = torch.zeros((len(batch), width), dtype=torch.long)
                for r, i in enumerate(batch):
                    input_ids[r, : len(ids_all[i])] = torch.tensor(ids_all[i])
                    attn[r, : len(ids_all[i])] = 1
                hidden = model(input_ids=input_ids.to(dev), attention_mask=attn.to(dev)).last_hidden_state
                hidden = hidden.float().cpu().numpy()
                for r, i in enumerate(batch):
                    rows = hidden[r, : len(ids_all[i])]
                    if not keep_special:
                        rows = rows[~_special_mask(special_ids, ids_all[i])]
                    feats[i] = rows
            for i in idx:
                writer.append(caps[i].cap_id, feats[i])
                n_rows += len(feats[i])
    seconds = time.perf_counter() - t0
    log.info("student_text: %d captions, %d tokens, dim %d -> %s (%.1f s)", len(caps), n_rows, dim, out_store, seconds)
    return {"path": Path(out_store), "n_items": len(caps), "n_rows": n_rows, "dim": dim, "seconds": seconds}


def encode_clip_text(
    captions: list[str | os.PathLike],
    cfg: dict,
    out_store: str | os.PathLike,
    device: str = "auto",
    dtype: str = "float32",
) -> dict:
    """Teacher text features: one raw ``encode_text`` row (1, embed_dim) per caption.

    Args:
        captions: caption files; all their captions are encoded.
        cfg: the ``clip`` block: ``model`` (open_clip name or ``local-dir:<folder>``),
            ``pretrained`` (tag, local file or null), ``batch_size`` (default 32).
        out_store: the ``.zarr`` store to write (atomically).
        device: ``auto``, ``cpu``, ``cuda``...
        dtype: on-disk dtype.

    Returns:
        dict with ``path``, ``n_items``, ``dim``, ``seconds``.

    Random weights are accepted only for a ``local-dir:`` folder marked ``DEMO_RANDOM_WEIGHTS.txt``
    (the demo); otherwise :func:`prvr.encoders.clip.load_clip` refuses them.
    """
    t0 = time.perf_counter()
    caps = read_all_captions(captions)
    model_name = cfg.get("model")
    if not model_name:
        raise ModelLoadError("clip: the 'model' key is missing")
    batch_size = int(cfg.get("batch_size", 32))
    allow_random = (
        model_name.startswith("local-dir:") and (Path(model_name[len("local-dir:") :]) / RANDOM_MARKER).exists()
    )
    dev = _device(device)
    bundle = load_clip(model_name, cfg.get("pretrained"), device=dev, allow_random=allow_random)
    attrs = {
        "kind": "clip_text",
        **bundle.identity,
        "normalised": False,
        "caption_files": [str(p) for p in ([captions] if isinstance(captions, (str, os.PathLike)) else captions)],
        "versions": library_versions(),
    }
    with StoreWriter(out_store, bundle.embed_dim, dtype=dtype, attrs=attrs) as writer, torch.inference_mode():
        for b0 in range(0, len(caps), batch_size):
            batch = caps[b0 : b0 + batch_size]
            tokens = bundle.tokenizer([c.text for c in batch]).to(dev)
            feats = bundle.model.encode_text(tokens).float().cpu().numpy()
            for c, row in zip(batch, feats):
                writer.append(c.cap_id, row[None, :])
    seconds = time.perf_counter() - t0
    log.info("clip_text: %d captions, dim %d -> %s (%.1f s)", len(caps), bundle.embed_dim, out_store, seconds)
    return {"path": Path(out_store), "n_items": len(caps), "dim": bundle.embed_dim, "seconds": seconds}
