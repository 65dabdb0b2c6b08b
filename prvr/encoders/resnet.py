"""2-D ResNet frame features (torchvision architecture, local weights): TVR's 2048-d half.

The frame shown at each step's centre goes through torchvision's standard ImageNet eval
transform (shorter side → ``resize`` with PIL bilinear, centre crop ``crop``, ImageNet mean/std;
run in the decode workers as a bit-identical :class:`~prvr.video.decode.PilRecipe`), then the
network up to its global average pool: (2048,) for ResNet-50/101/152, (512,) for 18/34.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from prvr.encoders.clip import ModelLoadError
from prvr.encoders.i3d import load_checkpoint_into, weights_identity
from prvr.encoders.image import FrameEncoder
from prvr.video.decode import FrameSpec, PilRecipe

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_resnet(
    checkpoint: str | os.PathLike | None, arch: str = "resnet152", device: str = "cpu", allow_random: bool = False
) -> tuple[nn.Module, dict, int]:
    """A torchvision ResNet from a local checkpoint (strict, with its ``fc``), ``fc`` then removed.

    Returns:
        (model in eval mode mapping (N, 3, H, W) → (N, dim), identity, dim).

    Raises:
        ModelLoadError: unknown arch, no checkpoint (and ``allow_random`` False), or a
            checkpoint that does not match the architecture.
    """
    import torchvision

    if arch not in ARCHS:
        raise ModelLoadError(f"resnet: unknown arch {arch!r} (one of {', '.join(ARCHS)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # reproducible random init (tests, demo) without touching the global RNG
        model = getattr(torchvision.models, arch)(weights=None)
    if checkpoint is None:
        if not allow_random:
            raise ModelLoadError(
                f"resnet: no checkpoint given for {arch} (set `checkpoint:` to a local torchvision weights file, "
                "e.g. resnet152-394f9c45.pth); random weights are only for tests and the demo"
            )
    else:
        load_checkpoint_into(model, checkpoint, f"resnet ({arch})")
    identity = weights_identity(model, None if checkpoint is None else str(checkpoint), arch)
    dim = model.fc.in_features
    model.fc = nn.Identity()
    return model.eval().to(device), identity, dim


class ResNetEncoder(FrameEncoder):
    """Config keys (student_video entry with ``kind: resnet``): checkpoint, arch (resnet152),
    resize (256), crop (224), batch_size (32)."""

    kind = "resnet"

    def __init__(self, cfg: dict, device: str = "cpu", allow_random: bool = False):
        arch = cfg.get("arch") or "resnet152"
        self.model, identity, self.dim = load_resnet(cfg.get("checkpoint"), arch, device, allow_random)
        self.device = device
        self.batch_size = int(cfg.get("batch_size") or 32)
        resize, crop = int(cfg.get("resize") or 256), int(cfg.get("crop") or 224)
        recipe = PilRecipe(resize=resize, interpolation="bilinear", crop=(crop, crop), output="float",
                           mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.spec = FrameSpec(name=cfg.get("name") or "resnet", recipe=recipe)
        self.identity = {**identity, "kind": "resnet", "arch": arch, "dim": self.dim, "resize": resize, "crop": crop}

    @torch.inference_mode()
    def encode(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, crop, crop) float32 → (B, dim) float32."""
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        with self.autocast():
            out = self.model(x)
        return out.float().cpu().numpy()
