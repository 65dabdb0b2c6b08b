"""Inception-v1 I3D (Carreira & Zisserman, CVPR 2017) as a torch module, and its feature encoder.

The module's parameter names and shapes are those of the widely used PyTorch port of the
DeepMind Kinetics model (``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_4f.b1b.bn.running_var``,
``logits.conv3d.bias``, ...: 344 state-dict keys), so its public checkpoints load with
``strict=True``. As in TensorFlow, convolutions and max-pools use "SAME" padding computed from
the input size (the extra pixel goes at the end), BatchNorm has eps 1e-3.

Features: the output of ``Mixed_5c`` averaged over time and space, (N, 1024) per snippet. For a
16 x 224 x 224 snippet this equals the port's ``avg_pool`` (kernel 2 x 7 x 7) output; longer
snippets are averaged over all their time steps. Inputs are RGB in [-1, 1], shape
(N, 3, T, H, W).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prvr.encoders.clip import RANDOM_MARKER, ModelLoadError, file_digest, state_digest
from prvr.encoders.image import FrameEncoder
from prvr.video.decode import FrameSpec, PilRecipe

log = logging.getLogger(__name__)

FEATURE_DIM = 1024
N_STATE_KEYS = 344


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (front, back) of one axis: output size ``ceil(size / stride)``."""
    if size % stride == 0:
        total = max(kernel - stride, 0)
    else:
        total = max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    t, h, w = x.shape[2:]
    pt, ph, pw = (same_padding(s, k, st) for s, k, st in zip((t, h, w), kernel, stride))
    if any(pt + ph + pw):
        x = F.pad(x, (*pw, *ph, *pt))
    return x


class MaxPool3dSame(nn.Module):
    """3-D max-pool with TF "SAME" padding (zeros: every input here follows a ReLU, so zero
    padding equals TensorFlow's padding that ignores the border)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class Unit3D(nn.Module):
    """Conv3d (TF "SAME" padding) → BatchNorm3d (eps 1e-3) → ReLU; parameters ``conv3d.*``, ``bn.*``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        batch_norm: bool = True,
        bias: bool = False,
        activation: bool = True,
    ):
        super().__init__()
        self.kernel, self.stride, self.activation = tuple(kernel), tuple(stride), activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class InceptionModule(nn.Module):
    """Four branches concatenated on channels: 1x1 | 1x1→3x3 | 1x1→3x3 | pool→1x1.

    ``out`` = (b0, b1a, b1b, b2a, b2b, b3b) channel counts; output channels b0 + b1b + b2b + b3b.
    """

    def __init__(self, in_channels: int, out: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, out[0])
        self.b1a = Unit3D(in_channels, out[1])
        self.b1b = Unit3D(out[1], out[2], (3, 3, 3))
        self.b2a = Unit3D(in_channels, out[3])
        self.b2b = Unit3D(out[3], out[4], (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, out[5])
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# (name, kind, args): the endpoints of the network in order
_ENDPOINTS = [
    ("Conv3d_1a_7x7", "conv", (64, (7, 7, 7), (2, 2, 2))),
    ("MaxPool3d_2a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
    ("Conv3d_2b_1x1", "conv", (64, (1, 1, 1), (1, 1, 1))),
    ("Conv3d_2c_3x3", "conv", (192, (3, 3, 3), (1, 1, 1))),
    ("MaxPool3d_3a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
    ("Mixed_3b", "mix", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", "mix", (128, 128, 192, 32, 96, 64)),
    ("MaxPool3d_4a_3x3", "pool", ((3, 3, 3), (2, 2, 2))),
    ("Mixed_4b", "mix", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", "mix", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", "mix", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", "mix", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", "mix", (256, 160, 320, 32, 128, 128)),
    ("MaxPool3d_5a_2x2", "pool", ((2, 2, 2), (2, 2, 2))),
    ("Mixed_5b", "mix", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", "mix", (384, 192, 384, 48, 128, 128)),
]


class InceptionI3d(nn.Module):
    """Inception-v1 I3D.

    Args:
        num_classes: classes of the ``logits`` layer (400 for Kinetics-400 checkpoints).
        in_channels: 3 for RGB, 2 for optical flow.
        dropout: dropout probability before the logits (the port's ``1 - keep_prob``).
    """

    def __init__(self, num_classes: int = 400, in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        self.num_classes, self.in_channels, self.dropout = num_classes, in_channels, dropout
        self.endpoints = [name for name, _, _ in _ENDPOINTS]
        ch = in_channels
        for name, kind, args in _ENDPOINTS:
            if kind == "conv":
                out, k, s = args
                self.add_module(name, Unit3D(ch, out, k, s))
                ch = out
            elif kind == "pool":
                self.add_module(name, MaxPool3dSame(*args))
            else:
                mod = InceptionModule(ch, args)
                self.add_module(name, mod)
                ch = mod.out_channels
        assert ch == FEATURE_DIM
        self.logits = Unit3D(FEATURE_DIM, num_classes, batch_norm=False, bias=True, activation=False)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) → ``Mixed_5c`` output (N, 1024, ⌈T/8⌉, ⌈H/32⌉, ⌈W/32⌉)."""
        for name in self.endpoints:
            x = getattr(self, name)(x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) in [-1, 1] → (N, 1024) snippet features (mean over time and space)."""
        return self.trunk(x).mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) → per-time logits (N, num_classes, T'), as the port computes them
        (average pool 2 x 7 x 7 with stride 1, dropout, 1x1x1 conv, spatial squeeze)."""
        h = self.trunk(x)
        k = (min(2, h.shape[2]), min(7, h.shape[3]), min(7, h.shape[4]))
        h = F.avg_pool3d(h, k, stride=1)
        h = self.logits(F.dropout(h, self.dropout, self.training))
        return h.mean(dim=(3, 4))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{path}: not a state dict")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_checkpoint_into(model: nn.Module, checkpoint: str | os.PathLike, what: str) -> None:
    """Load a local weights file into ``model`` with ``strict=True``; errors name the file."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ModelLoadError(f"{what}: checkpoint {path} does not exist")
    try:
        sd = _read_state_dict(path)
        model.load_state_dict(sd, strict=True)
    except ModelLoadError:
        raise
    except Exception as exc:  # RuntimeError with missing/unexpected keys, unpickling errors
        raise ModelLoadError(f"{what}: cannot load {path} strictly: {exc}") from exc


def weights_identity(model: nn.Module, checkpoint: str | None, name: str) -> dict:
    """Identity recorded in stores: model name, weights file, sha256 prefix, random flag."""
    if checkpoint:
        random_weights = (Path(checkpoint).parent / RANDOM_MARKER).exists()
        if random_weights:
            log.warning("!!! %s: %s marks %s as RANDOM demo weights: features carry no meaning !!!",
                        name, RANDOM_MARKER, checkpoint)
        return {"model": name, "checkpoint": str(checkpoint), "weights_sha256": file_digest(checkpoint),
                "random_weights": random_weights}
    log.warning("!!! %s uses RANDOM weights (allow_random): features carry no meaning !!!", name)
    return {"model": name, "checkpoint": "RANDOM", "weights_sha256": state_digest(model), "random_weights": True}


def load_i3d(checkpoint: str | os.PathLike | None, device: str = "cpu", allow_random: bool = False) -> tuple[InceptionI3d, dict]:
    """An I3D in eval mode from a local checkpoint (strict), and its identity.

    The number of classes and input channels are read from the checkpoint's shapes.

    Raises:
        ModelLoadError: no checkpoint (and ``allow_random`` is False), missing file, or keys
            or shapes that do not match.
    """
    if checkpoint is None:
        if not allow_random:
            raise ModelLoadError(
                "i3d: no checkpoint given (set `checkpoint:` to a local weights file, e.g. the PyTorch "
                "port's rgb_imagenet.pt); random weights are only for tests and the demo"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # reproducible random init without touching the global RNG
            model = InceptionI3d()
    else:
        sd = _read_state_dict(Path(checkpoint)) if Path(checkpoint).is_file() else {}
        w = sd.get("logits.conv3d.weight")
        c = sd.get("Conv3d_1a_7x7.conv3d.weight")
        model = InceptionI3d(
            num_classes=int(w.shape[0]) if w is not None else 400, in_channels=int(c.shape[1]) if c is not None else 3
        )
        load_checkpoint_into(model, checkpoint, "i3d")
    identity = weights_identity(model, None if checkpoint is None else str(checkpoint), "inception_i3d")
    return model.eval().to(device), identity


def write_demo_checkpoint(folder: str | os.PathLike, seed: int = 0, num_classes: int = 400) -> Path:
    """Random-init I3D weights in ``folder/i3d.pt`` plus the random-weights marker (demo only)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InceptionI3d(num_classes=num_classes)
    path = folder / "i3d.pt"
    tmp = folder / ".i3d.pt.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    (folder / RANDOM_MARKER).write_text("Random-init I3D weights made by prvr for the demo: features carry no meaning.\n")
    return path


class I3DEncoder(FrameEncoder):
    """Snippet features: ``snippet`` frames around each step centre at ``snippet_fps`` (default:
    the video's own rate), shorter side resized to ``resize`` (PIL bilinear), centre crop
    ``crop``, scaled to [-1, 1] → (1024,) per step.

    Config keys (student_video entry with ``kind: i3d``): checkpoint, snippet (16),
    snippet_fps (null), resize (256), crop (224), batch_size (8).
    """

    kind = "i3d"

    def __init__(self, cfg: dict, device: str = "cpu", allow_random: bool = False):
        self.model, identity = load_i3d(cfg.get("checkpoint"), device=device, allow_random=allow_random)
        self.device = device
        self.dim = FEATURE_DIM
        self.batch_size = int(cfg.get("batch_size") or 8)
        snippet, rate = int(cfg.get("snippet") or 16), cfg.get("snippet_fps")
        resize, crop = int(cfg.get("resize") or 256), int(cfg.get("crop") or 224)
        self.spec = FrameSpec(
            name=cfg.get("name") or "i3d",
            recipe=PilRecipe(resize=resize, interpolation="bilinear", crop=(crop, crop), output="uint8"),
            snippet=snippet,
            rate=float(rate) if rate else None,
        )
        self.identity = {**identity, "kind": "i3d", "dim": self.dim, "snippet": snippet, "snippet_fps": rate,
                         "resize": resize, "crop": crop, "input": "RGB (x/255)*2-1"}

    @torch.inference_mode()
    def encode(self, batch: np.ndarray) -> np.ndarray:
        """(B, T, H, W, 3) uint8 snippets → (B, 1024) float32."""
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        x = (x.permute(0, 4, 1, 2, 3).float() / 255.0) * 2 - 1
        with self.autocast():
            out = self.model.features(x)
        return out.float().cpu().numpy()
