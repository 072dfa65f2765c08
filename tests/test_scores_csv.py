"""scores_csv.py: scores.csv read back as it was written, its raw scores and probabilities apart,
and a damaged file refused in one line naming it."""
from types import SimpleNamespace

import numpy as np
import pytest

from scores_csv import read_scores, write_scores


def test_scores_are_read_back_as_written_raw_and_calibrated_apart(tmp_path):
    split = SimpleNamespace(paths=[tmp_path / "a.jpg", tmp_path / "b b.jpg", tmp_path / "c,d.jpg"],
                            labels=np.array([0, 1, 1]))
    raw = {"gallery": np.array([-1.5, 2.25, 0.125]), "knn": np.array([0.1, 0.9, 0.6])}
    calibrated = {"gallery": np.array([0.1, 0.8, 0.4]), "knn": np.array([0.2, 0.7, 0.5])}
    path = tmp_path / "scores.csv"
    write_scores(split, raw, calibrated, path)

    images, labels, scores = read_scores(path)
    assert images == [str(p) for p in split.paths]  # a comma in a name survives the CSV
    assert labels.tolist() == [0, 1, 1]
    assert list(scores) == ["gallery", "knn"] and all(np.allclose(scores[k], raw[k]) for k in raw)
    _, _, probabilities = read_scores(path, probabilities=True)
    assert list(probabilities) == ["gallery", "knn"]
    assert all(np.allclose(probabilities[k], calibrated[k]) for k in calibrated)


@pytest.mark.parametrize("text", ["image,label,gallery\nx.jpg,benign,0.5\n", "image,label,gallery\nx.jpg,1\n", ""])
def test_a_damaged_or_missing_file_is_one_line_naming_it(text, tmp_path):
    path = tmp_path / "scores.csv"
    if text:
        path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{path}: unreadable \(.+\)$"):
        read_scores(path)
