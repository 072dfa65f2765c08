"""train.py then predict.py as a user runs them: every artefact of the output contract exists and
the numbers are finite; the other losses and the study's two-pass pairing run through too."""
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dataset import make_synthetic

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TINY = ["--weights", "none", "--image-size", "32", "--epochs", "2", "--batch-size", "8",
        "--val-batch-size", "8", "--lr", "1e-3", "--workers", "0", "--gallery-size", "4", "--save-every", "5"]
METRIC_KEYS = ["test_pair_accuracy", "test_pair_loss", "n_test_pairs", "test_auc", "test_auc_ci_low",
               "test_auc_ci_high", "test_average_precision", "test_balanced_accuracy", "test_sensitivity",
               "test_specificity", "test_threshold", "test_tn", "test_fp", "test_fn", "test_tp",
               "test_n_benign", "test_n_malignant"]


def run(script, *args, timeout=600):
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    make_synthetic(out, size=40, seed=0, counts={"train": (12, 8), "validation": (6, 4), "test": (10, 6)})
    return out


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    project = tmp_path_factory.mktemp("runs") / "exp"
    stdout = run("train.py", "--project", project, "--data", tiny_data, *TINY)
    return project, stdout


def check_metrics(path, n_test):
    metrics = json.loads(Path(path).read_text())
    for key in METRIC_KEYS:
        assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]), key
    assert metrics["n_test_pairs"] == n_test
    assert 0 <= metrics["test_auc_ci_low"] <= metrics["test_auc_ci_high"] <= 1
    assert metrics["test_tn"] + metrics["test_fp"] == metrics["test_n_benign"]
    assert metrics["test_fn"] + metrics["test_tp"] == metrics["test_n_malignant"]
    return metrics


def test_train_writes_the_output_contract(trained):
    project, stdout = trained
    outputs, results = project / "outputs", project / "results"
    for name in ("best.pth", "last.pth", "history.csv", "training_validation_metrics.png", "gallery.pt"):
        assert (outputs / name).stat().st_size > 0, name
    for name in ("metrics.json", "roc_curve.png", "pr_curve.png", "confusion_matrix.png", "embeddings.png",
                 "pair_grid.png", "confident_mistakes.png",
                 "prediction_results_0.png", "prediction_results_5.png", "prediction_results_15.png"):
        assert (results / name).stat().st_size > 0, name
    assert not (results / "prediction_results_1.png").exists()  # only every --save-every-th pair
    rows = list(csv.DictReader(open(outputs / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        for column in ("train_loss", "train_acc", "val_loss", "val_acc", "val_auc"):
            assert math.isfinite(float(row[column])), column
    check_metrics(results / "metrics.json", n_test=16)
    assert "AUC" in stdout and "pair accuracy" in stdout
    scores = list(csv.DictReader(open(results / "scores.csv")))  # every test image, each classifier's score
    assert len(scores) == 16 and sum(int(row["label"]) for row in scores) == 6
    assert {"image", "label", "gallery", "head-knn", "knn", "prototype"} <= set(scores[0])
    assert all(0 <= float(row["gallery"]) <= 1 for row in scores)


def test_predict_reevaluates_the_same_numbers_and_keeps_earlier_results(trained, tiny_data):
    project, _ = trained
    before = json.loads((project / "results" / "metrics.json").read_text())
    run("predict.py", "--project", project, "--data", tiny_data, "--gallery-size", "4", "--save-every", "5")
    after = check_metrics(project / "results" / "metrics.json", n_test=16)
    for key in METRIC_KEYS:
        assert after[key] == pytest.approx(before[key], abs=1e-5), key
    moved = [p for p in project.iterdir() if p.name.startswith("results.")]
    assert moved and (moved[0] / "metrics.json").exists()  # the earlier results were moved, not overwritten


def test_predict_single_images_and_pairs(trained, tiny_data):
    project, _ = trained
    checkpoint = project / "outputs" / "best.pth"
    images = sorted((tiny_data / "test_data" / "1").glob("*.jpg"))[:3]
    one = run("predict.py", "--checkpoint", checkpoint, "--image", images[0]).strip().splitlines()
    assert len(one) == 2 and re.match(r"P\(malignant\) [01]\.\d{4}  (benign|malignant)", one[0])
    assert one[1] == f"  figure: {project / 'predictions' / (images[0].stem + '_prediction.png')}"
    three = run("predict.py", "--checkpoint", checkpoint, *sum((["--image", p] for p in images), []))
    assert sum(line.startswith("P(malignant)") for line in three.splitlines()) == 3
    two = run("predict.py", "--checkpoint", checkpoint, "--image", images[0], "--image", images[1])
    assert sum(line.startswith("P(malignant)") for line in two.splitlines()) == 2  # never a pair by count
    pair = run("predict.py", "--checkpoint", checkpoint, "--pair", images[0], images[1])
    assert re.match(r"similarity [01]\.\d{4} -> (same class|different classes)", pair)


@pytest.mark.parametrize("flags", [["--loss", "contrastive"], ["--loss", "triplet", "--miner", "hard"],
                                   ["--loss", "ce"], ["--pairing", "two-pass"],
                                   ["--loss", "triplet", "--score", "prototype", "--select", "val_loss"]])
def test_every_loss_and_pairing_trains_and_evaluates(flags, tiny_data, tmp_path):
    project = tmp_path / "exp"
    args = TINY[:]
    args[args.index("--epochs") + 1] = "1"
    run("train.py", "--project", project, "--data", tiny_data, *args, *flags, "--per-class", "4")
    metrics = check_metrics(project / "results" / "metrics.json", n_test=16)
    expected = {"--loss": "bce", **dict(zip(flags[::2], flags[1::2]))}["--loss"]
    assert metrics["loss"] == expected
    rows = list(csv.DictReader(open(project / "outputs" / "history.csv")))
    if expected in ("contrastive", "triplet"):
        assert 0 <= float(rows[0]["active_fraction"]) <= 1 and float(rows[0]["embedding_spread"]) > 0


def test_isic_sample_through_split_train_and_predict(tmp_path):
    sample = SHARED / "isic_sample"
    if not sample.is_dir():
        pytest.skip("../shared/data/isic_sample is not here")
    data = tmp_path / "DATA"
    run("to_subdirectories.py", "--csv", sample / "train-metadata.csv", "--images", sample / "train-image" / "image",
        "--out", data)
    project = tmp_path / "exp"
    args = TINY[:]
    args[args.index("--epochs") + 1] = "1"
    args[args.index("--batch-size") + 1] = "32"
    run("train.py", "--project", project, "--data", data, *args, "--benign-limit", "0", "--val-batch-size", "64")
    n_test = sum(1 for _ in (data / "test_data").glob("*/*.jpg"))
    metrics = check_metrics(project / "results" / "metrics.json", n_test=n_test)
    assert metrics["test_n_malignant"] > 10  # the sample's 159 melanomas reach the test split


def test_demo_reaches_its_targets(tmp_path):
    """make demo's exact settings: test pair accuracy >= 0.8 and Siamese test AUC >= 0.9."""
    flags = re.search(r"^DEMO_FLAGS := (.*)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    data = tmp_path / "demo"
    run("dataset.py", "--synthetic", data)
    run("train.py", "--project", tmp_path / "demo_run", "--data", data, *flags, timeout=900)
    metrics = json.loads((tmp_path / "demo_run" / "results" / "metrics.json").read_text())
    assert metrics["test_pair_accuracy"] >= 0.8, metrics
    assert metrics["test_auc"] >= 0.9, metrics


def project_files(project):
    """{relative path: bytes} of every file under the project."""
    return {str(p.relative_to(project)): p.read_bytes() for p in sorted(project.rglob("*")) if p.is_file()}


def test_evaluation_on_another_clinics_folder_writes_only_to_out(trained, tmp_path):
    """predict.py --data D --out X with D a plain labelled folder (0/ and 1/): scored against the
    project's own references and threshold; the project's files stay byte-identical."""
    project, _ = trained
    clinic = tmp_path / "clinic"
    make_synthetic(tmp_path / "other", size=40, seed=7, counts={"test": (5, 4)})
    (tmp_path / "other" / "test_data").rename(clinic)  # clinic/0/*.jpg, clinic/1/*.jpg
    before = project_files(project)
    stdout = run("predict.py", "--project", project, "--data", clinic, "--out", tmp_path / "X", "--gallery-size", "4")
    assert project_files(project) == before
    metrics = json.loads((tmp_path / "X" / "metrics.json").read_text())
    assert metrics["evaluated_split"] == "external" and metrics["n_external_images"] == 9
    assert (metrics["external_n_benign"], metrics["external_n_malignant"]) == (5, 4)
    assert "external (5 benign, 4 malignant)" in stdout


def test_data_without_a_test_split_trains_and_reports_validation(tiny_data, tmp_path):
    data = tmp_path / "no_test"
    data.mkdir()
    for split in ("train_data", "validation_data"):
        (data / split).symlink_to(tiny_data / split)
    project = tmp_path / "exp"
    args = TINY[:]
    args[args.index("--epochs") + 1] = "1"
    stdout = run("train.py", "--project", project, "--data", data, *args, "--recipe", "tuned", "--gallery-size", "0")
    assert "no test_data folder" in stdout
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    assert metrics["evaluated_split"] == "val" and metrics["n_val_images"] == 10
    assert metrics["val_auc"] == pytest.approx(metrics["val_auc"]) and metrics["tta"] is True
    # every classifier the tuned Siamese model supports, scored from the same embeddings
    assert set(metrics["other_scores"]) == {"head-knn", "knn", "prototype", "direct"}
    for other in metrics["other_scores"].values():
        assert 0 <= other["auc"] <= 1 and other["tn"] + other["fp"] == 6
