import csv
import json

import numpy as np
import pytest
import torch
from synthetic import make_synthetic

from prvr.config import ConfigError, TrainConfig
from prvr.data.captions import read_captions
from prvr.data.dataset import PRVRData
from prvr.evaluate import evaluate, evaluate_model
from prvr.teacher import teacher_similarity
from prvr.train import LOG_COLUMNS, build_model, train

torch.set_num_threads(1)

TINY = {"hidden": 16, "n_heads": 2, "drop": 0.1, "input_drop": 0.1, "batch_size": 16, "lr": 2e-3, "progress": False,
        "threads": 1}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    p = make_synthetic(root, n_videos={"train": 40, "val": 10, "test": 10}, rows=(3, 10), tokens=(1, 6),
                       dv=12, dq=8, dt=8, latent=6, teacher_rows="mixed", seed=1)  # fmt: skip
    teacher_similarity(p.teacher_video, p.teacher_text, p.student_video, p.captions["train"], root / "teacher")
    return p, root / "teacher"


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _cfg(**kw):
    return TrainConfig(**{**TINY, "n_epoch": 4, "max_es_cnt": 10, "seed": 5, **kw})


def test_train_writes_everything(tiny_set, tmp_path):
    p, teacher = tiny_set
    s = train(p.as_train_paths(teacher), _cfg(), tmp_path)
    for f in ("best.safetensors", "model.json", "log.csv", "config.json", "last.pt", "summary.json"):
        assert (tmp_path / f).exists(), f
    assert not (tmp_path / ".cache").exists()
    rows = _rows(tmp_path / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3] and tuple(rows[0]) == LOG_COLUMNS
    for r in rows:
        for k in ("loss", "trip_inh", "nce_inh", "kd", "trip_exp", "nce_exp", "alpha", "beta", "kd_w", "lr", "val_SumR"):
            assert np.isfinite(float(r[k])), (k, r[k])
    # schedules of §5.4 / §6.1: kd_w = 0.1 * 0.95^e, alpha(0) = 0.799
    assert float(rows[2]["kd_w"]) == pytest.approx(0.1 * 0.95**2, rel=1e-5)
    assert float(rows[0]["alpha"]) == pytest.approx(0.7990, abs=1e-4)
    assert s["epochs_run"] == 4 and s["batches_per_epoch"] == 3 and s["t_total"] == 12
    best = max(range(4), key=lambda e: (float(rows[e]["val_SumR"]), -e))
    assert s["best_epoch"] == best and s["best_val_SumR"] == pytest.approx(float(rows[best]["val_SumR"]))
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["architecture"]["video_dim"] == 12 and meta["architecture"]["branches"] == ["inheritance", "exploration"]
    assert json.loads((tmp_path / "summary.json").read_text())["best_epoch"] == best
    # calling again on a finished run returns its summary without training
    assert train(p.as_train_paths(teacher), _cfg(), tmp_path)["best_epoch"] == best


def test_early_stopping_counts_exactly(tiny_set, tmp_path):
    p, teacher = tiny_set
    # lr 0: no epoch after the first can improve; stop at the (max_es_cnt + 1)-th non-improving epoch
    s = train(p.as_train_paths(teacher), _cfg(lr=0.0, n_epoch=20, max_es_cnt=2), tmp_path)
    assert s["epochs_run"] == 4 and s["stopped_early"] and s["best_epoch"] == 0


def _state(path):
    return torch.load(path, weights_only=True)["model"]


def test_resume_is_bit_identical(tiny_set, tmp_path, monkeypatch):
    p, teacher = tiny_set
    cfg = _cfg(n_epoch=5)
    train(p.as_train_paths(teacher), cfg, tmp_path / "full")
    # (a) stop after 2 epochs, resume
    r = train(p.as_train_paths(teacher), cfg, tmp_path / "a", stop_after_epochs=2)
    assert r["interrupted"] and len(_rows(tmp_path / "a" / "log.csv")) == 2
    train(p.as_train_paths(teacher), cfg, tmp_path / "a")
    # (b) killed in the middle of epoch 3 (after two batches), resume
    import prvr.losses

    real, calls = prvr.losses.dldkdpp_loss, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3 * 3 + 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(prvr.losses, "dldkdpp_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        train(p.as_train_paths(teacher), cfg, tmp_path / "b")
    monkeypatch.setattr(prvr.losses, "dldkdpp_loss", real)
    assert len(_rows(tmp_path / "b" / "log.csv")) == 3
    train(p.as_train_paths(teacher), cfg, tmp_path / "b")

    ref_rows = _rows(tmp_path / "full" / "log.csv")
    ref_state = _state(tmp_path / "full" / "last.pt")
    from safetensors.torch import load_file

    ref_best = load_file(str(tmp_path / "full" / "best.safetensors"))
    for run in ("a", "b"):
        rows = _rows(tmp_path / run / "log.csv")
        assert len(rows) == len(ref_rows)
        for x, y in zip(rows, ref_rows):
            assert {k: v for k, v in x.items() if k != "seconds"} == {k: v for k, v in y.items() if k != "seconds"}
        state = _state(tmp_path / run / "last.pt")
        assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
        best = load_file(str(tmp_path / run / "best.safetensors"))
        assert all(torch.equal(best[k], ref_best[k]) for k in ref_best)


def test_changed_config_restarts(tiny_set, tmp_path):
    p, teacher = tiny_set
    train(p.as_train_paths(teacher), _cfg(n_epoch=2), tmp_path)
    s = train(p.as_train_paths(teacher), _cfg(n_epoch=2, lr=1e-3), tmp_path)
    assert s["epochs_run"] == 2 and len(_rows(tmp_path / "log.csv")) == 2
    assert json.loads((tmp_path / "config.json").read_text())["train"]["lr"] == 1e-3


def test_single_video_batches_and_single_branch(tiny_set, tmp_path):
    p, teacher = tiny_set
    s = train(p.as_train_paths(teacher), _cfg(batch_size=1, n_epoch=1), tmp_path / "one")
    assert s["batches_per_epoch"] == 40 and np.isfinite(s["best_val_SumR"])
    s = train(p.as_train_paths(None), _cfg(branches="exploration", n_epoch=1), tmp_path / "exp")
    assert json.loads((tmp_path / "exp" / "model.json").read_text())["architecture"]["branches"] == ["exploration"]
    rows = _rows(tmp_path / "exp" / "log.csv")
    assert rows[0]["trip_inh"] == "" and rows[0]["kd"] == "" and float(rows[0]["trip_exp"]) > 0
    with pytest.raises(ConfigError, match="teacher"):
        train(p.as_train_paths(None), _cfg(n_epoch=1), tmp_path / "noteacher")


@pytest.mark.slow
def test_training_learns_planted_structure(tmp_path):
    """Acceptance: trained student >> untrained student and chance, on held-out test data."""
    p = make_synthetic(tmp_path, n_videos={"train": 240, "val": 60, "test": 60}, seed=11)
    teacher_similarity(p.teacher_video, p.teacher_text, p.student_video, p.captions["train"], tmp_path / "teacher")
    cfg = TrainConfig(hidden=32, n_heads=4, drop=0.1, input_drop=0.1, batch_size=32, lr=1e-3, n_epoch=8,
                      progress=False, threads=1, seed=3)  # fmt: skip
    train(p.as_train_paths(tmp_path / "teacher"), cfg, tmp_path / "run")
    trained = evaluate(tmp_path / "run", p.student_video, p.student_text, p.captions["test"], tmp_path / "m.json")
    test = PRVRData.load(read_captions(p.captions["test"]), p.student_video, p.student_text)
    untrained = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model(cfg, test.video_dim, test.query_dim)
        untrained.append(evaluate_model(model, test, "cpu")["fused"]["SumR"])
    chance = sum(100 * min(k, 60) / 60 for k in (1, 5, 10, 100))  # expected SumR of random ranking, 60 videos
    # observed with these settings: trained ~300, untrained ~140-150, chance 131.7
    assert max(untrained) < chance + 40
    assert trained["SumR"] > chance + 100
    assert trained["SumR"] > max(untrained) + 80


def test_missing_videos_fail_or_are_skipped(tiny_set, tmp_path):
    from prvr.data.captions import Caption, write_captions
    from prvr.data.dataset import DataError

    p, _ = tiny_set
    caps = read_captions(p.captions["train"]) + [Caption("ghost#enc#0", "ghost", "not extracted")]
    write_captions(tmp_path / "train.txt", caps)
    with pytest.raises(DataError, match="ghost"):
        teacher_similarity(p.teacher_video, p.teacher_text, p.student_video, tmp_path / "train.txt", tmp_path / "t")
    teacher_similarity(p.teacher_video, p.teacher_text, p.student_video, tmp_path / "train.txt", tmp_path / "t",
                       skip_missing=True)  # fmt: skip
    paths = p.as_train_paths(tmp_path / "t")
    paths["captions"]["train"] = str(tmp_path / "train.txt")
    with pytest.raises(DataError, match=r"1 videos missing from student video store .*ghost"):
        train(paths, _cfg(n_epoch=1), tmp_path / "run")
    s = train(paths, _cfg(n_epoch=1), tmp_path / "run", skip_missing=True)
    assert s["n_train_videos"] == 40


def test_rewritten_features_do_not_resume(tmp_path):
    import shutil

    copy = make_synthetic(tmp_path / "data", n_videos={"train": 40, "val": 10, "test": 10}, rows=(3, 10), tokens=(1, 6),
                          dv=12, dq=8, dt=8, latent=6, teacher_rows="mixed", seed=1)  # fmt: skip
    teacher_similarity(copy.teacher_video, copy.teacher_text, copy.student_video, copy.captions["train"], tmp_path / "t")
    train(copy.as_train_paths(tmp_path / "t"), _cfg(n_epoch=3), tmp_path / "run", stop_after_epochs=1)
    # the same data written again (new store uid): the run must start over, not resume
    shutil.rmtree(tmp_path / "data")
    copy = make_synthetic(tmp_path / "data", n_videos={"train": 40, "val": 10, "test": 10}, rows=(3, 10), tokens=(1, 6),
                          dv=12, dq=8, dt=8, latent=6, teacher_rows="mixed", seed=1)  # fmt: skip
    teacher_similarity(copy.teacher_video, copy.teacher_text, copy.student_video, copy.captions["train"], tmp_path / "t")
    logged = []
    train(copy.as_train_paths(tmp_path / "t"), _cfg(n_epoch=3), tmp_path / "run", on_epoch_end=lambda e, r: logged.append(e))
    assert logged == [0, 1, 2]
