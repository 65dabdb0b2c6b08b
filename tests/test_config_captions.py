import pytest

from prvr.config import ConfigError, TrainConfig, dataset_config, load_config
from prvr.data.captions import CaptionError, read_captions, video_order, write_captions, Caption


def test_default_config_validates():
    cfg = load_config()
    d = dataset_config(cfg, "demo")
    assert d["clip"]["model"].startswith("local-dir:")
    assert d["extract"]["timeout_s"] > 0  # default filled in
    tc = TrainConfig.from_dict({**d["train"]})
    assert tc.hidden == 64 and tc.kd_temperature == 0.2


@pytest.mark.parametrize(
    "override, where",
    [
        ({"datasets": {"demo": {"bogus": 1}}}, "datasets.demo"),
        ({"frames": {"fps": "x"}}, "frames.fps"),
        ({"datasets": {"demo": {"frames": {"fps": -1}}}}, "datasets.demo.frames"),
        ({"device": "gpu"}, "device"),
    ],
)
def test_bad_config_names_key(override, where):
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load_config(overrides=override)


def test_train_config_rejects_unknown_key():
    with pytest.raises(ConfigError, match="lrr"):
        TrainConfig.from_dict({"lrr": 1})


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="nope"):
        dataset_config(load_config(), "nope")


def test_msrl_captions(tmp_path):
    p = tmp_path / "x.caption.txt"
    p.write_text("v1#enc#0 a man runs\nv2#enc#0 a dog\n\nv1#enc#1 he stops  \n")
    caps = read_captions(p)
    assert [c.video_id for c in caps] == ["v1", "v2", "v1"]
    assert caps[2].text == "he stops"
    assert video_order(caps) == ["v1", "v2"]
    write_captions(tmp_path / "y.caption.txt", caps)
    assert read_captions(tmp_path / "y.caption.txt") == caps


def test_caption_errors_name_line(tmp_path):
    p = tmp_path / "bad.caption.txt"
    p.write_text("v1#enc#0 ok\nv2#enc#0\n")
    with pytest.raises(CaptionError, match=r"bad.caption.txt:2"):
        read_captions(p)
    p.write_text("v1#enc#0 ok\nv1#enc#0 again\n")
    with pytest.raises(CaptionError, match="twice"):
        read_captions(p)


def test_tsv_captions(tmp_path):
    p = tmp_path / "c.tsv"
    p.write_text("query_id\tvideo_id\ttext\tstart\tend\nq1\tv1\ta cat\t1.0\t2.5\nq2\tv2\tdog\t\t\n")
    caps = read_captions(p)
    assert caps[0] == Caption("q1", "v1", "a cat", 1.0, 2.5)
    assert caps[1].start is None
    p.write_text("query_id\tvideo_id\ttext\nq1\tv1\tx\nq2\tv2\tbad\textra\n")
    caps = read_captions(p)  # extra columns are ignored by DictReader; still valid rows
    p.write_text("qid\tvideo_id\ttext\n")
    with pytest.raises(CaptionError, match="header"):
        read_captions(p)
