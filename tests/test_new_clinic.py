"""new_clinic.py run for real on tiny synthetic data: every way of meeting a new clinic scored for
every k, the projects' own rows what predict.py finds for them, the draws fixed by k."""
import json

import pytest

import new_clinic
import predict
import train
from synthetic import make_synthetic
from helpers import tiny


@pytest.fixture(scope="module")
def two_models(trained_project, tiny_data_dir, tmp_path_factory):
    """(siamese project, classifier project, clinic split folder)."""
    folder = tmp_path_factory.mktemp("new_clinic")
    train.main(["--project", str(folder / "ce"), "--data", str(tiny_data_dir), "--loss", "ce", *tiny(1)])
    make_synthetic(folder / "clinic", size=40, seed=9, counts={"train": (6, 6), "test": (6, 6)})
    return trained_project[0], folder / "ce", folder / "clinic"


def test_every_way_is_scored_for_every_k_and_the_own_rows_are_predicts(two_models, tmp_path, quick_bootstrap):
    siamese, classifier, clinic = two_models
    argv = ["--siamese", str(siamese), "--classifier", str(classifier), "--clinic", str(clinic),
            "--shots", "2", "3", "--draws", "3", "--out", str(tmp_path / "out")]
    new_clinic.main(argv)
    summary = json.loads((tmp_path / "out" / "new_clinic.json").read_text())
    assert set(summary) == {"siamese, own gallery", "siamese, clinic gallery", "siamese, probe",
                            "classifier, own map", "classifier, refitted map", "classifier, probe"}
    for row, by_k in summary.items():
        assert set(by_k) == {"2", "3"}
        for k, found in by_k.items():
            assert 0 <= found["auc"][0] <= 1 and 0 <= found["ece"][0] <= 1, (row, k)
    # a monotone map cannot move the AUC: the classifier's refitted rows rank as its own
    assert summary["classifier, refitted map"]["2"]["auc"][0] == pytest.approx(summary["classifier, own map"]["2"]["auc"][0])
    # the project's own gallery on the clinic's test split is what predict.py evaluates there
    evaluated = predict.evaluate(siamese / "outputs" / "best.pth", clinic / "test_data", tmp_path / "eval",
                                 predict.EvaluationSettings(batch_size=8))
    assert summary["siamese, own gallery"]["2"]["auc"][0] == pytest.approx(evaluated["external_auc"], abs=1e-6)
    assert (tmp_path / "out" / "new_clinic.png").stat().st_size > 10_000
    table = (tmp_path / "out" / "new_clinic.md").read_text()
    assert "| siamese, clinic gallery |" in table
    new_clinic.main(argv[:-1] + [str(tmp_path / "again")])  # the draws are fixed: the same table
    assert json.loads((tmp_path / "again" / "new_clinic.json").read_text()) == summary
