"""open_clip models: loading through the real paths (names, tags, local files, local-dir folders).

``load_clip(model, pretrained)`` accepts:

* an open_clip model name plus a tag (``ViT-B-32``, ``openai``): needs the weights in open_clip's
  cache or the network;
* an open_clip model name plus a local checkpoint file (``.bin``, ``.pt``, ``.safetensors``);
* ``local-dir:<folder>`` holding ``open_clip_config.json`` and (normally) weights
  (``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``); ``pretrained`` is ignored.

Random weights are refused unless ``allow_random=True`` (the demo), and then said loudly.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

RANDOM_MARKER = "DEMO_RANDOM_WEIGHTS.txt"  # present in folders of random-init demo models
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.bin")


class ModelLoadError(RuntimeError):
    """A model could not be loaded from what the config names."""


@dataclass
class ClipBundle:
    model: torch.nn.Module
    preprocess: object  # PIL image -> (3, S, S) tensor (open_clip's eval transform)
    tokenizer: object
    identity: dict  # recorded in store attributes: model, pretrained, weights sha256 (prefix)
    image_size: int
    embed_dim: int


def file_digest(path: str | os.PathLike, n: int = 16) -> str:
    """Short sha256 of a file's bytes (identity of a weights file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def state_digest(module: torch.nn.Module, n: int = 16) -> str:
    """Short sha256 of a module's parameters (identity when no single weights file exists)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:n]


def _local_weights(folder: Path) -> Path | None:
    for name in WEIGHT_FILES:
        if (folder / name).exists():
            return folder / name
    return None


def load_clip(
    model: str,
    pretrained: str | None = None,
    device: str = "cpu",
    allow_random: bool = False,
) -> ClipBundle:
    """Load an open_clip model in eval mode with its eval preprocess and tokenizer.

    Args:
        model: open_clip model name or ``local-dir:<folder>``.
        pretrained: tag or local checkpoint file (ignored for ``local-dir:``); None = no weights.
        device: torch device.
        allow_random: accept a model without weights (demo / tests only).

    Raises:
        ModelLoadError: the folder, file or tag cannot be loaded, or weights are missing and
            ``allow_random`` is False.
    """
    import open_clip

    weights = None
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:") :])
        if not (folder / "open_clip_config.json").exists():
            raise ModelLoadError(f"clip.model {model!r}: no open_clip_config.json in {folder}")
        weights = _local_weights(folder)
        pretrained = None
    elif pretrained and (os.sep in pretrained or Path(pretrained).suffix in (".bin", ".pt", ".pth", ".safetensors")):
        if not Path(pretrained).exists():
            raise ModelLoadError(f"clip.pretrained: weights file {pretrained} does not exist")
        weights = Path(pretrained)
    if weights is None and not pretrained and not allow_random:
        raise ModelLoadError(
            f"clip model {model!r} has no weights (pretrained is empty and no weights file found); "
            "random weights are only allowed for the demo"
        )
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(model)
    except Exception as exc:  # open_clip raises RuntimeError/ValueError/FileNotFoundError/HF errors
        raise ModelLoadError(f"cannot load open_clip model {model!r} (pretrained={pretrained!r}): {exc}") from exc
    net.eval()
    if weights is not None:
        digest = file_digest(weights)
        source = str(weights)
    elif pretrained:
        digest = state_digest(net)
        source = pretrained
    else:
        digest = state_digest(net)
        source = "RANDOM"
        log.warning("!!! clip model %s uses RANDOM weights (demo): features carry no semantics !!!", model)
    size = net.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    embed_dim = int(getattr(net, "text_projection", None).shape[1]) if getattr(net, "text_projection", None) is not None else int(net.visual.output_dim)
    random_weights = source == "RANDOM" or (weights is not None and (weights.parent / RANDOM_MARKER).exists())
    if random_weights and source != "RANDOM":
        log.warning("!!! clip model %s: %s marks these weights as RANDOM demo weights !!!", model, weights)
    identity = {"model": model, "pretrained": source, "weights_sha256": digest, "random_weights": random_weights}
    return ClipBundle(net, preprocess, tokenizer, identity, size, embed_dim)
