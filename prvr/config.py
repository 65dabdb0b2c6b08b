"""Configuration: one validated object from ``config/config.yaml`` to every stage.

The YAML is validated against ``config/schema.yaml`` (JSON Schema draft 2020-12) with
defaults filled in; errors name the offending key path. A dataset block may override any
of the top-level stage blocks (``clip``, ``frames``, ``student_video``, ``student_text``,
``train``); :func:`dataset_config` returns the merged view for one dataset, and
:class:`TrainConfig` is the typed view of the ``train`` block (plus a run's overrides).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "config" / "schema.yaml"
STAGE_BLOCKS = ("clip", "frames", "student_video", "student_text", "train", "extract", "teacher")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key path."""


def _extend_with_default(validator_class):
    """A validator that fills in ``default`` values while validating (jsonschema FAQ recipe)."""
    from jsonschema import validators

    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


def load_schema(path: str | os.PathLike = SCHEMA_PATH) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def validate_config(cfg: dict, schema: dict | None = None) -> dict:
    """Validate (and fill defaults into) a config dict in place; return it.

    Raises :class:`ConfigError` listing every problem as ``key.path: message``.
    """
    from jsonschema import Draft202012Validator

    schema = schema or load_schema()
    validator = _extend_with_default(Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = []
        for e in errors:
            where = ".".join(str(p) for p in e.absolute_path) or "<top level>"
            lines.append(f"  {where}: {e.message}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    for name, ds in cfg.get("datasets", {}).items():
        for block in STAGE_BLOCKS:
            if block in ds and block in cfg:
                merged = deep_merge(cfg[block], ds[block])
                sub = {**schema["properties"][block], "$defs": schema.get("$defs", {})}
                errs = list(Draft202012Validator(sub).iter_errors(merged))
                if errs:
                    raise ConfigError(f"invalid configuration:\n  datasets.{name}.{block}: {errs[0].message}")
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> dict:
    """Read, merge ``overrides`` into, and validate a config file."""
    path = Path(path or ROOT / "config" / "config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if overrides:
        cfg = deep_merge(cfg, overrides)
    return validate_config(cfg)


def deep_merge(base: Any, over: Any) -> Any:
    """Recursively merge dict ``over`` into a copy of ``base`` (lists and scalars replace)."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = copy.deepcopy(base)
        for k, v in over.items():
            out[k] = deep_merge(out[k], v) if k in out else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def dataset_config(cfg: dict, dataset: str) -> dict:
    """The merged view of one dataset: its block plus the stage blocks, dataset values winning."""
    if dataset not in cfg.get("datasets", {}):
        known = ", ".join(sorted(cfg.get("datasets", {}))) or "none"
        raise ConfigError(f"datasets.{dataset}: no such dataset in the config (known: {known})")
    ds = copy.deepcopy(cfg["datasets"][dataset])
    out = {k: v for k, v in cfg.items() if k not in ("datasets", "runs")}
    out = deep_merge(out, ds)
    out["name"] = dataset
    return out


@dataclass
class TrainConfig:
    """Hyper-parameters of DL-DKD++ training and evaluation (method spec §5, §6).

    Defaults are the reference code's defaults; dataset presets override them (§6.2).
    """

    # student (§5.2)
    hidden: int = 384  # hidden size of every branch
    n_heads: int = 4  # attention heads
    drop: float = 0.2  # dropout inside attention (probs and output)
    input_drop: float = 0.2  # dropout of input projections and positional encodings
    initializer_range: float = 0.02  # std of the N(0, std) init of Linear/Embedding weights
    max_ctx_l: int = 128  # max video rows (uniform_feature_sampling cap)
    max_desc_l: int = 30  # max query tokens
    branches: str = "both"  # both | inheritance | exploration
    # optimisation (§6.1)
    lr: float = 2.5e-4
    weight_decay: float = 0.01  # decoupled, not on biases or LayerNorm weights
    warmup: float = 0.01  # warmup fraction of all steps, then linear decay to 0
    max_grad_norm: float = 1.0  # per parameter tensor, inside the optimiser (-1: off)
    batch_size: int = 128  # videos per batch (all their captions come along)
    n_epoch: int = 120
    max_es_cnt: int = 10  # stop after this many + 1 consecutive non-improving epochs
    seed: int = 9527
    # losses (§5.4)
    margin: float = 0.2
    hard_negative_start_epoch: int = 0
    hard_pool_size: int = 20
    label_style: str = "soft"  # soft (DL-DKD++) | hard (DL-DKD, ICCV)
    nce_weight_inh: float = 0.04
    nce_weight_exp: float = 0.04
    kd: bool = True  # frame-level distillation on the inheritance branch
    kd_weight: float = 0.1  # kl_intra_weight
    kd_temperature: float = 0.2
    kd_decay: str = "exp"  # exp | linear | sigmoid | none
    kd_exp_k: float = 0.95
    alpha0: float = 0.8  # initial fraction of hard-target rows
    beta0: float = 0.8  # initial weight of the ground truth inside a soft target
    alpha_decay: str = "sigmoid"  # exp | linear | sigmoid | cosine | none
    beta_decay: str = "sigmoid"
    alpha_floor: float = 0.0
    beta_floor: float = 0.5
    sigmoid_k: float = 800.0
    detach_self_target: bool = False  # the reference does not detach the exploration self-target
    # evaluation (§1.2-1.3)
    fusion: list[float] = field(default_factory=lambda: [0.7, 0.3])  # inheritance, exploration
    eval_query_chunk: int = 2048
    eval_video_chunk: int = 512
    # execution
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch threads (0: leave torch's default)
    memory_budget_gb: float = 8.0  # features above this are memory-mapped instead of loaded
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict | None) -> TrainConfig:
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"train: unknown key(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_device(name: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but no CUDA device is visible")
    return name
