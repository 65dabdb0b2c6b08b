"""DL-DKD++ training loop (method spec §1.4, §5, §6.1).

One call of :func:`train` runs (or resumes) a whole training run in ``out_dir``:

* data: the train split with its teacher targets (:class:`prvr.data.dataset.PRVRData`, loaded
  once), the val split without teacher;
* every epoch: shuffled batches of ``batch_size`` videos → student → :func:`prvr.losses.dldkdpp_loss`
  → BertAdam (warmup-linear over ``batches/epoch × n_epoch`` steps); then val SumR of the fused
  score (0.7/0.3); the best epoch's weights go to ``best.safetensors`` (+ ``model.json``);
  training stops once ``max_es_cnt + 1`` consecutive epochs did not improve val SumR;
* files: ``config.json`` (resolved config), ``log.csv`` (one row per epoch: every loss term's
  mean, α, β, KD weight, lr, val R@1/5/10/100/SumR, seconds), ``last.pt`` (model, optimiser,
  every RNG state, counters, written atomically after every epoch), ``summary.json`` at the end.

A run killed at any point and restarted resumes from ``last.pt`` and ends with the same
weights and metrics, bit for bit on CPU, as an uninterrupted run: the epoch's video order is
a function of (seed, epoch), and the dropout / negative-sampling RNG states are restored.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

import numpy as np
import torch

from prvr.atomic import temp_sibling, write_bytes, write_text
from prvr.config import ConfigError, TrainConfig, resolve_device
from prvr.data.captions import read_captions
from prvr.data.dataset import PRVRData
from prvr.evaluate import evaluate_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
#: TrainConfig keys that change how a run executes but not its results (ignored when resuming).
EXECUTION_KEYS = ("device", "threads", "progress", "memory_budget_gb", "eval_query_chunk", "eval_video_chunk")
TERMS = ("loss", "trip_inh", "nce_inh", "kd", "trip_exp", "nce_exp")
VAL_KEYS = ("R@1", "R@5", "R@10", "R@100", "SumR")
LOG_COLUMNS = ("epoch", *TERMS, "alpha", "beta", "kd_w", "lr", *(f"val_{k}" for k in VAL_KEYS), "seconds")


@dataclass
class TrainPaths:
    """Inputs of a training run.

    Attributes:
        student_video: student video store; student_text: student token store.
        teacher_dir: folder holding ``train.zarr`` of :func:`prvr.teacher.teacher_similarity`
            (None: no teacher; only valid for runs that need none).
        captions: {"train": path, "val": path, "test": path (unused here)}.
    """

    student_video: str
    student_text: str
    teacher_dir: str | None
    captions: dict[str, str]

    @classmethod
    def of(cls, paths: TrainPaths | dict) -> TrainPaths:
        if isinstance(paths, TrainPaths):
            return paths
        missing = [k for k in ("student_video", "student_text", "captions") if k not in paths]
        if missing:
            raise ConfigError(f"train paths: missing {missing}")
        return cls(str(paths["student_video"]), str(paths["student_text"]),
                   None if paths.get("teacher_dir") is None else str(paths["teacher_dir"]),
                   {k: str(v) for k, v in paths["captions"].items()})  # fmt: skip


def branch_names(cfg: TrainConfig) -> tuple[str, ...]:
    """``cfg.branches`` (both | inheritance | exploration) as a tuple of branch names."""
    if cfg.branches == "both":
        return ("inheritance", "exploration")
    if cfg.branches in ("inheritance", "exploration"):
        return (cfg.branches,)
    raise ConfigError(f"train.branches: {cfg.branches!r} is not one of both, inheritance, exploration")


def _semantic_config(cfg: TrainConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in EXECUTION_KEYS}


def _fingerprint(*datas: PRVRData) -> str:
    h = hashlib.sha256()
    for d in datas:
        h.update("\n".join(d.video_ids).encode())
        h.update("\n".join(d.query_ids).encode())
        h.update(np.asarray([d.video_dim, d.query_dim], dtype=np.int64).tobytes())
        h.update(d.videos.lengths.tobytes())
        h.update(json.dumps(d.sources, sort_keys=True).encode())  # re-extracted features: no resume
    return h.hexdigest()[:16]


def _rng_state(loss_gen: torch.Generator) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": repr(random.getstate()),
        "loss_gen": loss_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, loss_gen: torch.Generator) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(ast.literal_eval(state["python"]))
    loss_gen.set_state(state["loss_gen"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Run ``it`` in a background thread, ``depth`` items ahead (batches are collated while the GPU works)."""
    q: Queue = Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for x in it:
                q.put(x)
        except BaseException as exc:  # noqa: BLE001 (re-raised in the consumer)
            q.put(exc)
        q.put(done)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    while True:
        x = q.get()
        if x is done:
            break
        if isinstance(x, BaseException):
            raise x
        yield x
    t.join()


def _mmap_large_allocations(threshold: int = 1 << 20) -> bool:
    """glibc: serve allocations >= ``threshold`` bytes with mmap, returned to the OS on free.

    CPU training allocates and frees many 100-MB activation tensors per step; glibc's default
    (a dynamic threshold that grows to 32 MB) keeps them in fragmented heaps and the resident
    set grows by ~0.6 GB over a few TVR-sized steps. Measured: same speed, lower peak RSS.
    Returns False where it does not apply (no glibc).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold)))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def current_lr(opt: torch.optim.Optimizer) -> float:
    """Learning rate the optimiser applied at its last step (BertAdam's schedule included)."""
    for name in ("get_lr", "current_lr"):
        fn = getattr(opt, name, None)
        if callable(fn):
            lr = fn()
            return float(lr[0] if isinstance(lr, (list, tuple)) else lr)
    return float(opt.param_groups[0]["lr"])


def build_model(cfg: TrainConfig, video_dim: int, query_dim: int):
    from prvr.model import DLDKDStudent

    return DLDKDStudent(**architecture(cfg, video_dim, query_dim))


def architecture(cfg: TrainConfig, video_dim: int, query_dim: int) -> dict:
    """Constructor arguments of the student (saved in ``model.json``)."""
    return {
        "video_dim": int(video_dim),
        "query_dim": int(query_dim),
        "hidden": cfg.hidden,
        "n_heads": cfg.n_heads,
        "drop": cfg.drop,
        "input_drop": cfg.input_drop,
        "max_ctx_l": cfg.max_ctx_l,
        "max_desc_l": cfg.max_desc_l,
        "initializer_range": cfg.initializer_range,
        "branches": list(branch_names(cfg)),
    }


def _md5(path: str) -> str | None:
    try:
        return hashlib.md5(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


class Trainer:
    """State of one training run; :func:`train` is the entry point."""

    def __init__(self, paths: TrainPaths, cfg: TrainConfig, out_dir: Path, skip_missing: bool = False):
        from prvr.losses import LossParams
        from prvr.optim import BertAdam, param_groups

        self.paths, self.cfg, self.out = paths, cfg, out_dir
        self.device = resolve_device(cfg.device)
        self.branches = branch_names(cfg)
        self.loss_params = LossParams.from_config(cfg)
        needs_teacher = "inheritance" in self.branches and (cfg.label_style == "soft" or cfg.kd)
        if needs_teacher and not paths.teacher_dir:
            raise ConfigError("train: the inheritance branch with soft targets or KD needs teacher targets (teacher_dir)")
        cache = out_dir / ".cache"
        caps_train = read_captions(paths.captions["train"])
        caps_val = read_captions(paths.captions["val"])
        # With teacher targets the student rows are aligned to the teacher's length, also for
        # runs that use no teacher term (as the reference loader always does in training).
        self.train_data = PRVRData.load(
            caps_train, paths.student_video, paths.student_text, teacher=paths.teacher_dir, max_ctx_l=cfg.max_ctx_l,
            max_desc_l=cfg.max_desc_l, memory_budget_gb=cfg.memory_budget_gb, cache_dir=cache,
            skip_missing=skip_missing, split=paths.captions["train"],
        )  # fmt: skip
        self.val_data = PRVRData.load(
            caps_val, paths.student_video, paths.student_text, max_ctx_l=cfg.max_ctx_l, max_desc_l=cfg.max_desc_l,
            memory_budget_gb=max(0.0, self.train_data.memory_left_gb), cache_dir=cache, skip_missing=skip_missing,
            split=paths.captions["val"],
        )  # fmt: skip
        self.val_equals_test = (
            "test" in paths.captions and _md5(paths.captions["val"]) is not None
            and _md5(paths.captions["val"]) == _md5(paths.captions["test"])
        )  # fmt: skip
        if self.val_equals_test:
            log.warning("the val and test caption files are identical: model selection happens on the test split")
        # model and optimiser: a fixed seed makes the initial weights a function of cfg.seed
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, self.train_data.video_dim, self.train_data.query_dim).to(self.device)
        self.batches_per_epoch = self.train_data.n_batches(cfg.batch_size)
        self.t_total = self.batches_per_epoch * cfg.n_epoch
        self.opt = BertAdam(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, warmup=cfg.warmup,
                            t_total=self.t_total, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)  # fmt: skip
        self.loss_gen = torch.Generator(device=self.device)
        self.loss_gen.manual_seed(cfg.seed + 1)
        self.epoch = 0
        self.best_sumr = -math.inf
        self.best_epoch = -1
        self.es_cnt = 0
        self.rows: list[dict] = []
        self.elapsed = 0.0
        self.finished = False
        self.stopped_early = False
        self.fingerprint = _fingerprint(self.train_data, self.val_data)
        self.data_on_device = False
        if str(self.device).startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(self.device))
            need = self.train_data.nbytes + self.val_data.nbytes
            if need < 0.5 * free:
                self.train_data.to(self.device)
                self.val_data.to(self.device)
                self.data_on_device = True
            log.info("features: %.2f GB in memory, %s", need / 1e9,
                     "moved to the GPU" if self.data_on_device else "kept on the host (batches prefetched)")  # fmt: skip

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": _semantic_config(self.cfg),
            "fingerprint": self.fingerprint,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": _rng_state(self.loss_gen),
            "best_sumr": self.best_sumr,
            "best_epoch": self.best_epoch,
            "es_cnt": self.es_cnt,
            "rows": self.rows,
            "elapsed": self.elapsed,
            "finished": self.finished,
            "stopped_early": self.stopped_early,
        }

    def save_last(self) -> None:
        buf = io.BytesIO()
        torch.save(self._checkpoint(), buf)
        write_bytes(self.out / "last.pt", buf.getvalue())

    def try_resume(self) -> bool:
        """Load ``last.pt`` when it exists and belongs to this config and data; True if resumed."""
        path = self.out / "last.pt"
        if not path.exists():
            return False
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 (a broken checkpoint restarts the run)
            log.warning("cannot read %s (%s); starting from scratch", path, exc)
            return False
        if ck.get("format") != CHECKPOINT_FORMAT or ck.get("fingerprint") != self.fingerprint:
            log.warning("%s belongs to other data or an older format; starting from scratch", path)
            return False
        old, new = ck.get("config", {}), _semantic_config(self.cfg)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            log.warning("%s was written with another config (%s); starting from scratch",
                        path, ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff))  # fmt: skip
            return False
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        _set_rng_state(ck["rng"], self.loss_gen)
        self.epoch = int(ck["epoch"])
        self.best_sumr = float(ck["best_sumr"])
        self.best_epoch = int(ck["best_epoch"])
        self.es_cnt = int(ck["es_cnt"])
        self.rows = list(ck["rows"])
        self.elapsed = float(ck["elapsed"])
        self.finished = bool(ck["finished"])
        self.stopped_early = bool(ck.get("stopped_early", False))
        log.info("resumed %s at epoch %d (best val SumR %.2f at epoch %d)", path, self.epoch, self.best_sumr, self.best_epoch)
        return True

    def save_best(self, val: dict) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        tmp = temp_sibling(self.out / "best.safetensors")
        save_file(state, str(tmp), metadata={"epoch": str(self.epoch), "val_SumR": repr(val["SumR"])})
        os.replace(tmp, self.out / "best.safetensors")
        meta = {
            "format": 1,
            "architecture": architecture(self.cfg, self.train_data.video_dim, self.train_data.query_dim),
            "fusion": list(self.cfg.fusion),
            "weights": "best.safetensors",
            "best_epoch": self.epoch,
            "val_SumR": val["SumR"],
            "val": val,
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
            "train_config": self.cfg.to_dict(),
        }
        write_text(self.out / "model.json", json.dumps(meta, indent=2) + "\n")

    def write_log(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in LOG_COLUMNS})
        write_text(self.out / "log.csv", buf.getvalue())

    # ------------------------------------------------------------------ epochs
    def train_epoch(self) -> dict:
        cfg, dev = self.cfg, self.device
        from prvr.losses import dldkdpp_loss

        self.model.train()
        batches = self.train_data.train_batches(cfg.batch_size, cfg.seed, self.epoch, device=dev)
        if str(dev).startswith("cuda") and not self.data_on_device:
            batches = _prefetch(batches, depth=2)  # host gathers the next batches while the GPU works
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.batches_per_epoch, desc=f"epoch {self.epoch}", leave=False, dynamic_ncols=True)
        sums: dict[str, torch.Tensor] = {}
        n = 0
        out = {}
        for batch in batches:
            batch = batch.to(dev)
            q = self.model.encode_query(batch.query, batch.query_mask)
            v = self.model.encode_video(batch.video, batch.video_mask)
            out = dldkdpp_loss(q, v, batch.video_mask, batch.labels, batch.teacher_raw, batch.teacher_pos_cos,
                               self.epoch, self.loss_params, generator=self.loss_gen)  # fmt: skip
            self.opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            self.opt.step()
            for k in TERMS:
                if k in out:
                    sums[k] = sums.get(k, 0.0) + out[k].detach()
            n += 1
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        row = {k: float(v) / max(n, 1) for k, v in sums.items()}
        for k in ("alpha", "beta", "kd_w"):
            if k in out:
                row[k] = float(out[k])
        row["lr"] = current_lr(self.opt)
        return row

    def validate(self) -> dict:
        res = evaluate_model(self.model, self.val_data, self.device, self.cfg.fusion,
                             self.cfg.eval_query_chunk, self.cfg.eval_video_chunk)  # fmt: skip
        return res["fused"]

    def run(self, stop_after_epochs: int | None = None, on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
        cfg = self.cfg
        done_here = 0
        while not self.finished and self.epoch < cfg.n_epoch:
            t0 = time.time()
            row = {"epoch": self.epoch, **self.train_epoch()}
            val = self.validate()
            row.update({f"val_{k}": val[k] for k in VAL_KEYS})
            improved = val["SumR"] > self.best_sumr
            if improved:
                self.best_sumr, self.best_epoch, self.es_cnt = float(val["SumR"]), self.epoch, 0
                self.save_best(val)
            else:
                self.es_cnt += 1
            row["seconds"] = round(time.time() - t0, 3)
            self.elapsed += time.time() - t0
            self.rows.append(row)
            log.info("epoch %d: loss %.4f, val SumR %.2f%s (%.1f s)", self.epoch, row.get("loss", float("nan")),
                     val["SumR"], " *" if improved else f" (no improvement {self.es_cnt})", row["seconds"])  # fmt: skip
            self.epoch += 1
            if cfg.max_es_cnt != -1 and self.es_cnt > cfg.max_es_cnt:
                self.stopped_early = True
                self.finished = True
            if self.epoch >= cfg.n_epoch:
                self.finished = True
            self.write_log()
            self.save_last()
            if on_epoch_end is not None:
                on_epoch_end(self.epoch - 1, row)
            done_here += 1
            if stop_after_epochs is not None and done_here >= stop_after_epochs and not self.finished:
                return {"interrupted": True, "epochs_run": self.epoch}
        return self.summary()

    def summary(self) -> dict:
        s = {
            "best_epoch": self.best_epoch,
            "best_val_SumR": self.best_sumr,
            "best_val": next((
                {k: r[f"val_{k}"] for k in VAL_KEYS} for r in self.rows if r["epoch"] == self.best_epoch), None),
            "epochs_run": self.epoch,
            "stopped_early": self.stopped_early,
            "seconds": round(self.elapsed, 3),
            "seconds_per_epoch": round(self.elapsed / max(1, len(self.rows)), 3),
            "batches_per_epoch": self.batches_per_epoch,
            "t_total": self.t_total,
            "n_train_videos": self.train_data.n_videos,
            "n_train_queries": self.train_data.n_queries,
            "n_val_videos": self.val_data.n_videos,
            "n_val_queries": self.val_data.n_queries,
            "val_equals_test": self.val_equals_test,
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
        }  # fmt: skip
        write_text(self.out / "summary.json", json.dumps(s, indent=2) + "\n")
        return s

    def close(self) -> None:
        self.train_data.close()
        self.val_data.close()
        shutil.rmtree(self.out / ".cache", ignore_errors=True)


def train(
    paths: TrainPaths | dict,
    cfg: TrainConfig | dict,
    out_dir: str | os.PathLike,
    *,
    resume: bool = True,
    stop_after_epochs: int | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    skip_missing: bool = False,
) -> dict:
    """Train (or resume) a DL-DKD++ student; see the module docstring for what is written.

    Args:
        paths: :class:`TrainPaths` or a dict with the same keys.
        cfg: :class:`prvr.config.TrainConfig` (or a dict of its fields).
        out_dir: run folder (created).
        resume: continue from ``out_dir/last.pt`` when it matches the config and the data.
        stop_after_epochs: return after this many epochs of this call (checkpoint written), as
            a kill would; a later call resumes.
        on_epoch_end: called as ``f(epoch, log_row)`` after each epoch's checkpoint.
        skip_missing: drop captions whose features are missing (warning) instead of failing.

    Returns:
        The summary (also ``summary.json``): best epoch, best val SumR, epochs run, seconds, ...;
        ``{"interrupted": True, ...}`` when stopped by ``stop_after_epochs``.
    """
    cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
    paths = TrainPaths.of(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    write_text(out / "config.json", json.dumps({"train": cfg.to_dict(), "paths": dataclasses.asdict(paths)}, indent=2) + "\n")
    if resolve_device(cfg.device) == "cpu":
        _mmap_large_allocations()
    trainer = Trainer(paths, cfg, out, skip_missing=skip_missing)
    try:
        if not (resume and trainer.try_resume()):
            for stale in ("best.safetensors", "model.json", "log.csv", "summary.json"):
                (out / stale).unlink(missing_ok=True)
        if trainer.finished and (out / "summary.json").exists():
            return json.loads((out / "summary.json").read_text())
        return trainer.run(stop_after_epochs, on_epoch_end)
    finally:
        trainer.close()
