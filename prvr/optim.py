"""BertAdam, the optimiser of MS-SL / DL-DKD / DL-DKD++ (method spec §6.1, §11.4).

Differences from ``torch.optim.AdamW`` that matter for fidelity:

* no bias correction of the moments;
* each parameter tensor's gradient is clipped to norm ``max_grad_norm`` on its own
  (inside the optimiser; ``-1`` turns it off);
* weight decay is decoupled and added to the Adam direction *before* the learning rate
  multiplies it: θ ← θ - lr_t · (m / (√v + ε) + wd · θ);
* the learning-rate schedule lives inside the optimiser: lr_t = lr · schedule(step / t_total,
  warmup) where ``step`` is read *before* it is incremented, so the very first update uses
  progress 0 and multiplier 0 (it moves no parameter, only the moments; §11.4).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def warmup_linear(progress: float, warmup: float = 0.01) -> float:
    """Linear warmup to 1 over the first ``warmup`` fraction, then linear decay to 0 at 1.

    progress/warmup for progress < warmup, else max((1 - progress) / (1 - warmup), 0).
    """
    if progress < warmup:
        return progress / warmup
    return max((progress - 1.0) / (warmup - 1.0), 0.0)


def warmup_constant(progress: float, warmup: float = 0.01) -> float:
    """Linear warmup to 1, then constant."""
    return progress / warmup if progress < warmup else 1.0


SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "warmup_linear": warmup_linear,
    "warmup_constant": warmup_constant,
}

NO_DECAY = ("bias", "LayerNorm.weight")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: ``weight_decay`` for most weights, 0 for biases and LayerNorm weights.

    A parameter is exempt when its name contains ``bias`` or ``LayerNorm.weight`` (the
    reference rule). Frozen parameters are skipped; empty groups are dropped.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(s in name for s in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class BertAdam(torch.optim.Optimizer):
    """Adam without bias correction, per-tensor gradient clipping and decoupled weight decay.

    Args:
        params: parameters or parameter groups (see :func:`param_groups`).
        lr: peak learning rate.
        warmup: warmup fraction of ``t_total`` for the schedule.
        t_total: total number of optimiser steps; -1 = constant lr (no schedule).
        schedule: a key of :data:`SCHEDULES`.
        b1, b2: moment decay rates.
        e: ε added to √v.
        weight_decay: decoupled weight decay.
        max_grad_norm: per-tensor gradient-norm clip; <= 0 disables it.

    The state (per parameter: ``step``, ``next_m``, ``next_v``) round-trips through
    ``state_dict()`` / ``load_state_dict()``.
    """

    def __init__(self, params: Iterable, lr: float, warmup: float = 0.01, t_total: int = -1,
                 schedule: str = "warmup_linear", b1: float = 0.9, b2: float = 0.999, e: float = 1e-6,
                 weight_decay: float = 0.01, max_grad_norm: float = 1.0):
        if lr < 0:
            raise ValueError(f"BertAdam: invalid lr {lr}")
        if schedule not in SCHEDULES:
            raise ValueError(f"BertAdam: unknown schedule {schedule!r}; known: {sorted(SCHEDULES)}")
        if not 0.0 <= warmup < 1.0 and warmup != -1:
            raise ValueError(f"BertAdam: warmup must be in [0, 1) or -1, got {warmup}")
        if not 0.0 <= b1 < 1.0 or not 0.0 <= b2 < 1.0:
            raise ValueError(f"BertAdam: b1, b2 must be in [0, 1), got {b1}, {b2}")
        if e < 0:
            raise ValueError(f"BertAdam: invalid epsilon {e}")
        defaults = dict(lr=lr, schedule=schedule, warmup=warmup, t_total=t_total, b1=b1, b2=b2, e=e,
                        weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    @staticmethod
    def _scheduled_lr(group: dict, step: int) -> float:
        if group["t_total"] == -1:
            return group["lr"]
        return group["lr"] * SCHEDULES[group["schedule"]](step / group["t_total"], group["warmup"])

    def current_lr(self) -> list[float]:
        """The learning rate the next ``step()`` will use, per group (for logging)."""
        out = []
        for group in self.param_groups:
            steps = [self.state[p]["step"] for p in group["params"] if "step" in self.state[p]]
            out.append(self._scheduled_lr(group, max(steps) if steps else 0))
        return out

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2, eps = group["b1"], group["b2"], group["e"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["next_m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["next_v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["max_grad_norm"] > 0:
                    # clip_grad_norm_ on this tensor alone: × max / (‖g‖ + 1e-6) when that is < 1.
                    coef = (group["max_grad_norm"] / (grad.norm() + 1e-6)).clamp(max=1.0)
                    grad = grad * coef
                m, v = state["next_m"], state["next_v"]
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                update = m / (v.sqrt() + eps)
                if group["weight_decay"] > 0.0:
                    update.add_(p, alpha=group["weight_decay"])
                lr = self._scheduled_lr(group, state["step"])  # step read before the increment (§11.4)
                p.add_(update, alpha=-lr)
                state["step"] += 1
        return loss


def total_steps(batches_per_epoch: int, n_epoch: int) -> int:
    """t_total of the schedule: batches per epoch × epochs (§6.1)."""
    return int(batches_per_epoch) * int(n_epoch)
