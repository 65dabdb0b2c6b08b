import json

import pytest
import torch
from safetensors.torch import save_file

from prvr.encoders.clip import RANDOM_MARKER, ModelLoadError, load_clip

TINY = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"size": 32},
}


def test_local_dir_roundtrip(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps(TINY))
    with pytest.raises(ModelLoadError, match="no weights"):
        load_clip(f"local-dir:{tmp_path}")
    a = load_clip(f"local-dir:{tmp_path}", allow_random=True)
    assert a.identity["random_weights"] and a.embed_dim == 32 and a.image_size == 32
    save_file(a.model.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    b = load_clip(f"local-dir:{tmp_path}")
    assert not b.identity["random_weights"]
    for k, v in b.model.state_dict().items():
        assert torch.equal(a.model.state_dict()[k], v), k
    (tmp_path / RANDOM_MARKER).write_text("demo")
    assert load_clip(f"local-dir:{tmp_path}").identity["random_weights"]


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path}")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_clip("ViT-B-32", str(tmp_path / "w.bin"))
