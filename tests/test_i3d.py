"""I3D: the PyTorch port's state-dict layout, TF-SAME padding, strict checkpoint loading, features."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prvr.encoders.clip import RANDOM_MARKER, ModelLoadError
from prvr.encoders.i3d import (
    I3DEncoder,
    InceptionI3d,
    MaxPool3dSame,
    Unit3D,
    load_i3d,
    same_padding,
    write_demo_checkpoint,
)

torch.set_num_threads(2)

# Inception modules of I3D (in, b0, b1a, b1b, b2a, b2b, b3b), from the paper's Inception-v1 table
MIXED = [
    (192, 64, 96, 128, 16, 32, 32),
    (256, 128, 128, 192, 32, 96, 64),
    (480, 192, 96, 208, 16, 48, 64),
    (512, 160, 112, 224, 24, 64, 64),
    (512, 128, 128, 256, 24, 64, 64),
    (512, 112, 144, 288, 32, 64, 64),
    (528, 256, 160, 320, 32, 128, 128),
    (832, 256, 160, 320, 32, 128, 128),
    (832, 384, 192, 384, 48, 128, 128),
]


def expected_params(num_classes=400, in_ch=3):
    def unit(cin, cout, k):
        return cin * cout * k**3 + 2 * cout  # conv without bias + BN weight and bias

    n = unit(in_ch, 64, 7) + unit(64, 64, 1) + unit(64, 192, 3)
    for cin, b0, b1a, b1b, b2a, b2b, b3b in MIXED:
        n += unit(cin, b0, 1) + unit(cin, b1a, 1) + unit(b1a, b1b, 3) + unit(cin, b2a, 1) + unit(b2a, b2b, 3)
        n += unit(cin, b3b, 1)
    return n + 1024 * num_classes + num_classes


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return InceptionI3d().eval()


def test_state_dict_layout_of_the_pytorch_port(model):
    sd = model.state_dict()
    assert len(sd) == 344
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == expected_params() == 12_697_264
    shapes = {
        "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
        "Conv3d_1a_7x7.bn.running_mean": (64,),
        "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
        "Mixed_3b.b0.conv3d.weight": (64, 192, 1, 1, 1),
        "Mixed_4f.b1b.bn.running_var": (320,),
        "Mixed_4f.b1b.conv3d.weight": (320, 160, 3, 3, 3),
        "Mixed_5c.b3b.conv3d.weight": (128, 832, 1, 1, 1),
        "Mixed_5c.b2b.bn.num_batches_tracked": (),
        "logits.conv3d.weight": (400, 1024, 1, 1, 1),
        "logits.conv3d.bias": (400,),
    }
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith(("MaxPool", "avg_pool", "dropout")) or ".b3a." in k for k in sd)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(bns) == 57 and all(m.eps == 1e-3 for m in bns)
    assert sum(1 for k in sd if k.endswith("conv3d.bias")) == 1


def test_tf_same_padding():
    # ceil(size / stride) outputs; the odd pixel goes at the end
    assert same_padding(5, 3, 2) == (1, 1)
    assert same_padding(6, 3, 2) == (0, 1)
    assert same_padding(16, 7, 2) == (2, 3)
    assert same_padding(1, 3, 1) == (1, 1)
    assert same_padding(4, 2, 2) == (0, 0)
    assert same_padding(5, 2, 2) == (0, 1)
    # a 3-tap box filter, stride 2, along time only, computed by hand in numpy
    u = Unit3D(1, 1, (3, 1, 1), (2, 1, 1), batch_norm=False, activation=False)
    torch.nn.init.ones_(u.conv3d.weight)
    for t in (5, 6, 7):
        x = torch.arange(1, t + 1, dtype=torch.float32).view(1, 1, t, 1, 1)
        front, back = same_padding(t, 3, 2)
        xp = np.concatenate([np.zeros(front), np.arange(1, t + 1), np.zeros(back)])
        want = [xp[i : i + 3].sum() for i in range(0, len(xp) - 2, 2)]
        got = u(x).flatten().tolist()
        assert len(got) == -(-t // 2)
        assert got == want
    # max pool: output ceil(size / stride) on every axis
    pool = MaxPool3dSame((3, 3, 3), (2, 2, 2))
    assert pool(torch.rand(1, 2, 5, 6, 7)).shape == (1, 2, 3, 3, 4)
    x = torch.rand(1, 1, 4, 4, 4)
    want = F.max_pool3d(F.pad(x, (0, 1, 0, 1, 0, 1)), 3, 2)
    assert torch.equal(pool(x), want)


def test_features_and_logits_shapes(model):
    x = torch.rand(1, 3, 7, 33, 45) * 2 - 1  # odd sizes: every SAME pad is asymmetric somewhere
    with torch.inference_mode():
        trunk = model.trunk(x)
        feats = model.features(x)
        logits = model(x)
    assert trunk.shape == (1, 1024, 1, 2, 2)  # ceil(7/8), ceil(33/32), ceil(45/32)
    assert feats.shape == (1, 1024)
    torch.testing.assert_close(feats, trunk.mean(dim=(2, 3, 4)))
    assert logits.shape == (1, 400, 1)


def test_checkpoint_strict_roundtrip(model, tmp_path):
    path = tmp_path / "i3d.pt"
    torch.save(model.state_dict(), path)
    loaded, ident = load_i3d(path)
    assert ident["checkpoint"] == str(path) and not ident["random_weights"] and len(ident["weights_sha256"]) == 16
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.rand(1, 3, 8, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.features(x), model.features(x))
    # legacy checkpoints without BatchNorm's num_batches_tracked, wrapped and prefixed, safetensors
    legacy = {f"module.{k}": v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    torch.save({"state_dict": legacy}, tmp_path / "legacy.pth")
    assert torch.equal(load_i3d(tmp_path / "legacy.pth")[0].state_dict()["Mixed_4f.b1b.bn.running_var"],
                       model.state_dict()["Mixed_4f.b1b.bn.running_var"])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "i3d.safetensors"))
    load_i3d(tmp_path / "i3d.safetensors")
    # a charades-style head (157 classes) is read from the checkpoint
    m157 = InceptionI3d(num_classes=157)
    torch.save(m157.state_dict(), tmp_path / "charades.pt")
    assert load_i3d(tmp_path / "charades.pt")[0].num_classes == 157
    # strictness: a missing or renamed key fails and names the file
    bad = dict(model.state_dict())
    bad["Mixed_4f.b1b.bn.running_varx"] = bad.pop("Mixed_4f.b1b.bn.running_var")
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match="bad.pt"):
        load_i3d(tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_i3d(tmp_path / "nope.pt")


def test_random_weights_refused_unless_allowed_or_marked(tmp_path):
    with pytest.raises(ModelLoadError, match="no checkpoint"):
        load_i3d(None)
    _, ident = load_i3d(None, allow_random=True)
    assert ident["random_weights"] and ident["checkpoint"] == "RANDOM"
    path = write_demo_checkpoint(tmp_path / "demo")
    assert (tmp_path / "demo" / RANDOM_MARKER).exists()
    _, ident = load_i3d(path)
    assert ident["random_weights"]


def test_encoder_scales_uint8_snippets(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "w.pt")
    enc = I3DEncoder({"checkpoint": str(tmp_path / "w.pt"), "snippet": 8, "resize": 40, "crop": 32, "batch_size": 2})
    assert enc.spec.snippet == 8 and enc.spec.recipe.crop == (32, 32) and enc.spec.recipe.output == "uint8"
    assert enc.identity["kind"] == "i3d" and enc.dim == 1024
    batch = np.random.default_rng(0).integers(0, 256, (2, 8, 32, 32, 3), dtype=np.uint8)
    out = enc.encode(batch)
    x = torch.from_numpy(batch).permute(0, 4, 1, 2, 3).float() / 255.0 * 2 - 1
    with torch.inference_mode():
        want = model.features(x).numpy()
    assert out.shape == (2, 1024) and out.dtype == np.float32
    np.testing.assert_array_equal(out, want)
