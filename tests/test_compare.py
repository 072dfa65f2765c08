"""compare.py run for real on the tiny synthetic split: one table row per run and score, results
reused only when made with the same flags, and the flags that would make a row lie refused."""
import os

import pytest

import compare
from helpers import TINY


def test_compare_trains_each_run_and_writes_one_table(tiny_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # paths resolve against the caller's folder, not the repository's
    compare.main(["--project", "cmp", "--data", str(tiny_data_dir), "--runs", "bce:study", *TINY])
    table = (tmp_path / "cmp" / "results" / "comparison.md").read_text()
    assert "| bce | study | 0 | gallery |" in table and "| bce | study | 0 | knn |" in table  # one row per score
    assert (tmp_path / "cmp" / "bce-study-seed0" / "outputs" / "best.pth").is_file()
    capsys.readouterr()

    compare.main(["--project", "cmp", "--data", str(tiny_data_dir), "--runs", "bce:study", *TINY])  # reused
    assert "$ " not in capsys.readouterr().out  # nothing trained again
    other = [*TINY[:TINY.index("--image-size") + 1], "48", *TINY[TINY.index("--image-size") + 2:]]
    with pytest.raises(SystemExit, match="was trained with train.py flags"):
        compare.main(["--project", "cmp", "--data", str(tiny_data_dir), "--runs", "bce:study", *other])


@pytest.mark.parametrize("argv, message", [
    (["--runs", "bce"], "each is LOSS:RECIPE"),
    (["--runs", "bce:nope"], "each is LOSS:RECIPE"),
    (["--losses", "bce", "--recipe", "tuned"], "--recipe: set by compare.py"),
    (["--losses", "bce", "--seed=3"], "--seed=3: set by compare.py"),
    (["--seeds", "0", "0"], "must not repeat"),
])
def test_compare_refuses_what_would_make_its_table_lie(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--project", str(tmp_path / "p"), "--data", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "p")
