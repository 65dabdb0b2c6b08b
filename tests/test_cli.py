import json

from prvr.cli import main


def test_validate_good_and_bad(tmp_path, capsys):
    assert main(["validate", "config/config.yaml"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: {x: {captions: {train: a, val: b, test: c}, frames: {fps: zero}}}\n")
    assert main(["validate", str(bad)]) == 1
    assert "datasets.x.frames" in capsys.readouterr().err


def test_show_and_metrics(tmp_path, capsys):
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"R@1": 1.0, "R@5": 2.0, "R@10": 3.0, "R@100": 4.0, "SumR": 10.0}))
    assert main(["metrics", str(m)]) == 0
    assert "| 1.0 | 2.0 | 3.0 | 4.0 | 10.0 |" in capsys.readouterr().out
    assert main(["show", str(tmp_path / "missing.md")]) == 1


def test_release_check_names_missing_files(tmp_path, capsys):
    assert main(["release", "check", "--root", str(tmp_path / "tvr"), "--collection", "tvr"]) == 1
    out = capsys.readouterr()
    assert "tvrtrain.caption.txt" in out.out + out.err
