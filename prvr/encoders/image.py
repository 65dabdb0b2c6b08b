"""Frame encoders: the common interface of the extractors, and the open_clip image encoder.

A :class:`FrameEncoder` has a :class:`~prvr.video.decode.FrameSpec` (what the decode workers
prepare for each step), an ``encode`` (a batch of prepared steps → (B, dim) float32 rows),
``dim``, ``batch_size`` and an ``identity`` recorded in the store's attributes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from prvr.video.decode import FrameSpec, recipe_from_transform


class FrameEncoder:
    """Base class: see the module docstring."""

    kind = "?"
    dim: int
    batch_size: int
    spec: FrameSpec
    identity: dict
    device: str = "cpu"

    def autocast(self):
        """fp16 autocast on CUDA; nothing on CPU (bf16 autocast is slower on CPUs here)."""
        if str(self.device).startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def encode(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class ClipFrameEncoder(FrameEncoder):
    """One open_clip image embedding per step: the frame shown at the step's centre.

    Frames go through open_clip's own eval transform on PIL images (executed in the decode
    workers as an equivalent :class:`~prvr.video.decode.PilRecipe` when the transform is the
    usual resize → centre crop → to tensor → normalise, bit-identical to it; else the transform
    object itself). Outputs are raw ``encode_image`` rows (not L2-normalised), as the
    reference teacher features.

    Args:
        cfg: ``model``, ``pretrained``, ``batch_size``, ``channel_order`` (rgb | bgr: swap the
            decoded frame's channels before preprocessing, as the reference script did by
            handing OpenCV's BGR arrays to PIL).
        device: torch device.
        allow_random: accept a model without weights (tests). Folders of ``local-dir:`` models
            that hold the random-weights marker are accepted (the demo).
        name: the encoder's name in chunk arrays.
    """

    kind = "clip"

    def __init__(self, cfg: dict, device: str = "cpu", allow_random: bool = False, name: str = "clip"):
        from prvr.encoders.clip import RANDOM_MARKER, load_clip

        model = cfg.get("model") or "ViT-B-32"
        if model.startswith("local-dir:") and (Path(model[len("local-dir:") :]) / RANDOM_MARKER).exists():
            allow_random = True
        self.bundle = load_clip(model, cfg.get("pretrained"), device=device, allow_random=allow_random)
        self.model = self.bundle.model.eval()
        self.device = device
        self.dim = int(self.bundle.embed_dim)
        self.batch_size = int(cfg.get("batch_size") or 32)
        order = cfg.get("channel_order") or "rgb"
        if order not in ("rgb", "bgr"):
            raise ValueError(f"clip.channel_order must be rgb or bgr, got {order!r}")
        recipe = recipe_from_transform(self.bundle.preprocess) or self.bundle.preprocess
        self.spec = FrameSpec(name=name, recipe=recipe, channel_order=order)
        self.identity = {**self.bundle.identity, "kind": "clip", "dim": self.dim, "channel_order": order,
                         "image_size": self.bundle.image_size, "normalised": False}

    @torch.inference_mode()
    def encode(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 preprocessed frames → (B, embed_dim) float32, un-normalised."""
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        with self.autocast():
            out = self.model.encode_image(x)
        return out.float().cpu().numpy()
