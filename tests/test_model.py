"""The DL-DKD++ student (method spec §3.1, §5.2) against counts and a plain-numpy forward."""

import numpy as np
import pytest
import torch

from prvr.model import BRANCHES, DLDKDStudent

torch.set_num_threads(2)


def tiny(**kw):
    args = dict(video_dim=12, query_dim=10, hidden=8, n_heads=2, max_ctx_l=7, max_desc_l=5)
    args.update(kw)
    return DLDKDStudent(**args)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("dims,total", [((3072, 768), 5_755_392), ((1024, 1024), 4_371_968)])
def test_parameter_counts(dims, total):
    model = DLDKDStudent(*dims)
    assert n_params(model) == total
    single = DLDKDStudent(*dims, branches=("exploration",))
    assert n_params(single) == total // 2
    assert single.branches == ("exploration",)


def test_branch_order_and_bad_branches():
    assert tiny(branches=("exploration", "inheritance")).branches == BRANCHES
    for bad in [(), ("teacher",), ("inheritance", "inheritance")]:
        with pytest.raises(ValueError, match="branches"):
            tiny(branches=bad)


def test_init():
    model = DLDKDStudent(64, 48, hidden=32, n_heads=4, initializer_range=0.02)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm):
            assert name.endswith("LayerNorm")
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
        if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
            assert torch.all(mod.bias == 0)
    w = torch.cat([p.flatten() for n, p in model.named_parameters()
                   if n.endswith("weight") and "LayerNorm" not in n])
    assert abs(w.mean().item()) < 2e-3 and abs(w.std().item() - 0.02) < 1e-3
    assert model.inheritance.query_pool.bias is None
    assert model.inheritance.video_output.bias is not None


def test_no_parameter_sharing():
    model = tiny()
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(ptrs) == len(set(ptrs))
    names = {n.split(".", 1)[1] for n, _ in model.named_parameters()}
    for b in BRANCHES:  # both branches are complete and parameterised alike
        assert {n.split(".", 1)[1] for n, _ in model.named_parameters() if n.startswith(b + ".")} == names


def _np_params(model, branch):
    return {k.split(".", 1)[1]: v.double().numpy() for k, v in model.state_dict().items() if k.startswith(branch + ".")}


def _np_ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_encode(P, side, x, mask, n_heads):
    """Plain-numpy forward of one side ('query' or 'video') of one branch, eval mode."""
    h = _np_ln(x, P[f"{side}_input_proj.LayerNorm.weight"], P[f"{side}_input_proj.LayerNorm.bias"])
    h = np.maximum(h @ P[f"{side}_input_proj.linear.weight"].T + P[f"{side}_input_proj.linear.bias"], 0)
    h = h + P[f"{side}_pos_embed.position_embeddings.weight"][: h.shape[1]]
    h = _np_ln(h, P[f"{side}_pos_embed.LayerNorm.weight"], P[f"{side}_pos_embed.LayerNorm.bias"])
    n, length, hid = h.shape
    d = hid // n_heads
    out = np.zeros_like(h)
    for i in range(n):
        proj = {k: h[i] @ P[f"{side}_encoder.{k}.weight"].T + P[f"{side}_encoder.{k}.bias"]
                for k in ("query", "key", "value")}
        heads = []
        for a in range(n_heads):
            sl = slice(a * d, (a + 1) * d)
            s = proj["query"][:, sl] @ proj["key"][:, sl].T / np.sqrt(d)
            s = s + np.where(mask[i][None, :], 0.0, -10000.0)
            heads.append(_np_softmax(s) @ proj["value"][:, sl])
        ctx = np.concatenate(heads, axis=1)
        o = ctx @ P[f"{side}_encoder.dense.weight"].T + P[f"{side}_encoder.dense.bias"] + h[i]
        out[i] = _np_ln(o, P[f"{side}_encoder.LayerNorm.weight"], P[f"{side}_encoder.LayerNorm.bias"])
    if side == "video":
        return out @ P["video_output.weight"].T + P["video_output.bias"]
    logits = (out @ P["query_pool.weight"].T)[..., 0]
    logits = np.where(mask, logits, -1e10)
    w = _np_softmax(logits)
    return np.einsum("nl,nlh->nh", w, out)


def _random_params(model, seed=0):
    # Randomise everything (incl. biases and LayerNorm affine) so every parameter matters.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_forward_matches_numpy_reference():
    torch.manual_seed(0)
    model = tiny().eval()
    _random_params(model)
    tokens = torch.randn(3, 5, 10)
    tmask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    frames = torch.randn(2, 7, 12)
    fmask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        q = model.encode_query(tokens, tmask)
        v = model.encode_video(frames, fmask)
    for b in BRANCHES:
        P = _np_params(model, b)
        np.testing.assert_allclose(q[b].numpy(), _np_encode(P, "query", tokens.double().numpy(), tmask.numpy(), 2),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(v[b].numpy(), _np_encode(P, "video", frames.double().numpy(), fmask.numpy(), 2),
                                   rtol=1e-4, atol=1e-5)
    assert not torch.allclose(q["inheritance"], q["exploration"])


def test_padding_does_not_change_outputs():
    torch.manual_seed(1)
    model = tiny().eval()
    tokens = torch.randn(1, 2, 10)
    frames = torch.randn(1, 3, 12)
    with torch.no_grad():
        q1 = model.encode_query(tokens, torch.ones(1, 2))
        v1 = model.encode_video(frames, torch.ones(1, 3))
        q2 = model.encode_query(torch.cat([tokens, 50 * torch.randn(1, 3, 10)], 1), torch.tensor([[1, 1, 0, 0, 0.0]]))
        v2 = model.encode_video(torch.cat([frames, 50 * torch.randn(1, 4, 12)], 1),
                                torch.tensor([[1, 1, 1, 0, 0, 0, 0]]))
    for b in BRANCHES:
        torch.testing.assert_close(q1[b], q2[b], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v1[b], v2[b][:, :3], rtol=1e-5, atol=1e-6)


def test_edge_shapes_single_query_single_token_single_frame():
    model = tiny().eval()
    q = model.encode_query(torch.randn(1, 1, 10), torch.ones(1, 1, dtype=torch.bool))
    v = model.encode_video(torch.randn(1, 1, 12), torch.ones(1, 1, dtype=torch.bool))
    for b in BRANCHES:
        assert q[b].shape == (1, 8) and v[b].shape == (1, 1, 8)
        assert torch.isfinite(q[b]).all() and torch.isfinite(v[b]).all()


def test_bad_inputs_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match="10"):
        model.encode_query(torch.randn(2, 3, 11), torch.ones(2, 3))
    with pytest.raises(ValueError, match="position slots"):
        model.encode_query(torch.randn(2, 6, 10), torch.ones(2, 6))
    with pytest.raises(ValueError, match="position slots"):
        model.encode_video(torch.randn(2, 8, 12), torch.ones(2, 8))
    with pytest.raises(ValueError, match="mask"):
        model.encode_video(torch.randn(2, 4, 12), torch.ones(2, 3))


def test_dropout_only_in_train_mode_and_gradients_reach_every_parameter():
    torch.manual_seed(2)
    model = tiny(drop=0.5, input_drop=0.5)
    tokens, tmask = torch.randn(4, 5, 10), torch.ones(4, 5)
    frames, fmask = torch.randn(3, 7, 12), torch.ones(3, 7)
    model.eval()
    with torch.no_grad():
        a = model.encode_query(tokens, tmask)["inheritance"]
        assert torch.equal(a, model.encode_query(tokens, tmask)["inheritance"])
    model.train()
    q, v = model(frames, fmask, tokens, tmask)
    assert not torch.allclose(q["inheritance"], a)
    (sum(x.sum() for x in q.values()) + sum((x ** 2).sum() for x in v.values())).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    nodrop = tiny(drop=0.0, input_drop=0.0)
    torch.testing.assert_close(nodrop.train().encode_video(frames, fmask)["exploration"],
                               nodrop.eval().encode_video(frames, fmask)["exploration"])
