"""BertAdam (method spec §6.1, §11.4) against a hand-written pure-python reference."""

import math

import pytest
import torch

from prvr.model import DLDKDStudent
from prvr.optim import BertAdam, param_groups, total_steps, warmup_linear

torch.set_num_threads(2)


def test_warmup_linear_values():
    assert warmup_linear(0.0) == 0.0
    assert warmup_linear(0.005) == pytest.approx(0.5)
    assert warmup_linear(0.01) == pytest.approx(1.0)
    assert warmup_linear(0.505) == pytest.approx(0.5)
    assert warmup_linear(1.0) == 0.0
    assert warmup_linear(1.3) == 0.0
    assert warmup_linear(0.2, warmup=0.1) == pytest.approx(0.8 / 0.9)
    assert total_steps(137, 120) == 16440


def reference_bertadam(p0, grads, lr, t_total, warmup, wd, clip, b1=0.9, b2=0.999, e=1e-6):
    """Pure-python BertAdam on one tensor (a list of floats), one gradient list per step."""
    p, m, v = list(p0), [0.0] * len(p0), [0.0] * len(p0)
    for step, g in enumerate(grads):
        if clip > 0:
            coef = min(1.0, clip / (math.sqrt(sum(x * x for x in g)) + 1e-6))
            g = [x * coef for x in g]
        m = [b1 * a + (1 - b1) * x for a, x in zip(m, g)]
        v = [b2 * a + (1 - b2) * x * x for a, x in zip(v, g)]
        upd = [a / (math.sqrt(b) + e) + wd * w for a, b, w in zip(m, v, p)]
        if t_total == -1:
            mult = 1.0
        else:
            x = step / t_total
            mult = x / warmup if x < warmup else max((x - 1) / (warmup - 1), 0.0)
        p = [w - lr * mult * u for w, u in zip(p, upd)]
    return p


@pytest.mark.parametrize("wd,clip,t_total", [(0.01, 1.0, 10), (0.0, -1, 10), (0.3, 0.5, -1), (0.01, 1.0, 4)])
def test_matches_reference(wd, clip, t_total):
    p0 = [0.5, -1.5, 2.0]
    grads = [[3.0, -4.0, 0.5], [0.1, 0.2, -0.3], [-2.0, 1.0, 6.0], [0.0, 0.0, 1e-3], [1.0, 1.0, 1.0]]
    w = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    opt = BertAdam([w], lr=0.1, warmup=0.25, t_total=t_total, weight_decay=wd, max_grad_norm=clip)
    for g in grads:
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    ref = reference_bertadam(p0, grads, 0.1, t_total, 0.25, wd, clip)
    assert w.tolist() == pytest.approx(ref, rel=1e-12, abs=1e-14)


def test_first_scheduled_step_moves_nothing_and_no_bias_correction():
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = BertAdam([w], lr=1.0, warmup=0.5, t_total=4, weight_decay=0.0, max_grad_norm=-1)
    w.grad = torch.tensor([0.3, -0.4], dtype=torch.float64)
    opt.step()
    assert w.tolist() == [1.0, -2.0]  # multiplier 0 at progress 0 (§11.4)
    st = opt.state[w]
    assert st["step"] == 1
    torch.testing.assert_close(st["next_m"], torch.tensor([0.03, -0.04], dtype=torch.float64))
    opt.step()  # progress 1/4 → multiplier 0.5; m/√v without bias correction
    m = 0.9 * torch.tensor([0.03, -0.04]) + 0.1 * torch.tensor([0.3, -0.4])
    v = 0.999 * 0.001 * torch.tensor([0.09, 0.16]) + 0.001 * torch.tensor([0.09, 0.16])
    expected = torch.tensor([1.0, -2.0]) - 0.5 * m / (v.sqrt() + 1e-6)
    torch.testing.assert_close(w.detach().float(), expected)
    assert opt.current_lr() == [pytest.approx(1.0)]  # progress 2/4 = warmup end


def test_param_groups_by_name():
    model = DLDKDStudent(12, 10, hidden=8, n_heads=2, max_ctx_l=7, max_desc_l=5)
    groups = param_groups(model, 0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    ids = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        exempt = name.endswith(".bias") or ("LayerNorm" in name)
        assert ids[id(p)] == (0.0 if exempt else 0.01), name
    n_ln = sum(1 for _, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm))
    n_bias = sum(1 for n, _ in model.named_parameters() if n.endswith("bias"))
    assert len(groups[1]["params"]) == n_ln + n_bias  # every LayerNorm weight is caught by name
    model.inheritance.query_pool.weight.requires_grad_(False)
    assert sum(len(g["params"]) for g in param_groups(model, 0.01)) == len(list(model.parameters())) - 1


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        frames, tokens = torch.randn(3, 7, 12, generator=g), torch.randn(4, 5, 10, generator=g)
        q, v = model(frames, torch.ones(3, 7), tokens, torch.ones(4, 5))
        loss = sum((x ** 2).mean() for x in q.values()) + sum(x.abs().mean() for x in v.values())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    def make():
        torch.manual_seed(0)
        model = DLDKDStudent(12, 10, hidden=8, n_heads=2, drop=0.0, input_drop=0.0, max_ctx_l=7, max_desc_l=5)
        return model, BertAdam(param_groups(model, 0.01), lr=1e-2, warmup=0.1, t_total=20)

    a, opt_a = make()
    _train(a, opt_a, 3, seed=1)
    torch.save({"model": a.state_dict(), "optim": opt_a.state_dict()}, tmp_path / "ckpt.pt")
    lr_at_ckpt = opt_a.current_lr()
    assert lr_at_ckpt == [pytest.approx(1e-2 * warmup_linear(3 / 20, 0.1))] * 2
    _train(a, opt_a, 4, seed=2)

    b, opt_b = make()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["optim"])
    assert opt_b.current_lr() == lr_at_ckpt
    assert all(st["step"] == 3 for st in opt_b.state.values())
    _train(b, opt_b, 4, seed=2)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    assert opt_a.current_lr() == opt_b.current_lr()


def test_bad_arguments():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="schedule"):
        BertAdam([w], lr=1e-3, schedule="cosine_magic")
    with pytest.raises(ValueError, match="lr"):
        BertAdam([w], lr=-1.0)
