"""train.py then predict.py as a user runs them: every artefact of the output contract exists and
the numbers are finite and agree with each other; the other losses, the study's two-pass pairing,
data without a test split, another clinic's folder, the real ISIC sample and the demo's settings
run through too (those in-process, with a short bootstrap, as the command line is covered here)."""
import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import predict
import synthetic
import train
from helpers import ROOT, make_clinic, run_script, tiny

SHARED = ROOT.parent / "shared" / "data"
METRIC_KEYS = ["test_pair_accuracy", "test_pair_loss", "n_test_pairs", "test_auc", "test_auc_ci_low",
               "test_auc_ci_high", "test_average_precision", "test_balanced_accuracy", "test_sensitivity",
               "test_specificity", "test_threshold", "test_tn", "test_fp", "test_fn", "test_tp",
               "test_n_benign", "test_n_malignant"]
TEST_COUNTS = (6, 4)  # benign, malignant in the test split of tiny_data_dir (conftest.TINY_COUNTS)


def check_metrics(path, n_test):
    metrics = json.loads(Path(path).read_text())
    for key in METRIC_KEYS:
        assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]), key
    assert metrics["n_test_pairs"] == n_test
    assert 0 <= metrics["test_auc_ci_low"] <= metrics["test_auc_ci_high"] <= 1
    assert metrics["test_tn"] + metrics["test_fp"] == metrics["test_n_benign"]
    assert metrics["test_fn"] + metrics["test_tp"] == metrics["test_n_malignant"]
    return metrics


def pairwise_auc(labels, scores):
    """Share of (malignant, benign) pairs in which the malignant image scores higher, ties one half."""
    malignant, benign = scores[labels == 1], scores[labels == 0]
    wins = (malignant[:, None] > benign[None, :]).sum() + 0.5 * (malignant[:, None] == benign[None, :]).sum()
    return wins / (len(malignant) * len(benign))


def test_train_writes_the_output_contract(trained_project):
    project, stdout = trained_project
    outputs, results = project / "outputs", project / "results"
    for name in ("best.pth", "last.pth", "history.csv", "training_validation_metrics.png", "gallery.pt"):
        assert (outputs / name).stat().st_size > 0, name
    for name in ("metrics.json", "roc_curve.png", "pr_curve.png", "confusion_matrix.png", "embeddings.png",
                 "pair_grid.png", "confident_mistakes.png", "prediction_results_0.png", "prediction_results_5.png"):
        assert (results / name).stat().st_size > 0, name
    saved = sorted(p.name for p in results.glob("prediction_results_*.png"))
    assert saved == ["prediction_results_0.png", "prediction_results_5.png"]  # only every --save-every-th pair
    rows = list(csv.DictReader(open(outputs / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        for column in ("train_loss", "train_acc", "val_loss", "val_acc", "val_auc"):
            assert math.isfinite(float(row[column])), column
    metrics = check_metrics(results / "metrics.json", n_test=sum(TEST_COUNTS))
    assert "AUC" in stdout and "pair accuracy" in stdout
    scores = list(csv.DictReader(open(results / "scores.csv")))  # every test image, each classifier's score
    assert len(scores) == sum(TEST_COUNTS) and sum(int(row["label"]) for row in scores) == TEST_COUNTS[1]
    assert {"image", "label", "gallery", "head-knn", "knn", "prototype"} <= set(scores[0])
    # metrics.json is computed from the scores in scores.csv: the AUC by pair counting, the counts
    # at the saved threshold
    labels = np.array([int(row["label"]) for row in scores])
    gallery = np.array([float(row["gallery"]) for row in scores])
    assert ((gallery >= 0) & (gallery <= 1)).all()
    assert metrics["test_auc"] == pytest.approx(pairwise_auc(labels, gallery))
    called = gallery >= metrics["test_threshold"]
    assert metrics["test_tp"] == int((called & (labels == 1)).sum())
    assert metrics["test_fp"] == int((called & (labels == 0)).sum())


def test_predict_reevaluates_the_same_numbers_and_keeps_earlier_results(trained_project, tiny_data_dir, tmp_path):
    trained, _ = trained_project
    project = tmp_path / "exp"  # a copy: the shared project's results stay where they are
    shutil.copytree(trained / "results", project / "results")
    (project / "outputs").mkdir()
    for name in ("best.pth", "gallery.pt"):
        shutil.copy2(trained / "outputs" / name, project / "outputs" / name)
    before = json.loads((project / "results" / "metrics.json").read_text())
    run_script("predict.py", "--project", project, "--data", tiny_data_dir, "--gallery-size", "4", "--save-every", "5")
    after = check_metrics(project / "results" / "metrics.json", n_test=sum(TEST_COUNTS))
    for key in METRIC_KEYS:
        assert after[key] == pytest.approx(before[key], abs=1e-5), key
    moved = [p for p in project.iterdir() if p.name.startswith("results.")]
    assert len(moved) == 1 and json.loads((moved[0] / "metrics.json").read_text()) == before  # moved, not overwritten


def test_predict_single_images_from_the_command_line(trained_project, tiny_data_dir):
    project, _ = trained_project
    checkpoint = project / "outputs" / "best.pth"
    images = sorted((tiny_data_dir / "test_data" / "1").glob("*.jpg"))[:2]
    lines = run_script("predict.py", "--checkpoint", checkpoint, "--image", images[0], "--image", images[1])
    lines = lines.strip().splitlines()
    assert len(lines) == 6  # two images are two predictions, never a pair
    for image, (verdict, nearest, figure) in zip(images, (lines[:3], lines[3:])):
        assert re.fullmatch(r"  \d of the 5 nearest gallery images (is a melanoma|are melanomas)", nearest), nearest
        assert re.fullmatch(rf"P\(malignant\) <?[01]\.\d{{2,6}}  (benign|malignant)  \(malignant from [01]\.\d{{2,6}}; "
                            rf"calibrated where \d+% are melanomas\)  {re.escape(str(image))}", verdict), verdict
        assert figure == f"  figure: {project / 'predictions' / (image.stem + '_prediction.png')}"
        assert (project / "predictions" / (image.stem + "_prediction.png")).stat().st_size > 0
    # --pair: tests/test_cli.py::test_pair_prints_the_models_similarity, in-process


@pytest.mark.parametrize("flags", [["--loss", "contrastive"], ["--loss", "triplet", "--miner", "hard"],
                                   ["--loss", "ce"], ["--pairing", "two-pass"],
                                   ["--loss", "triplet", "--score", "prototype", "--select", "val_loss"]])
def test_every_loss_and_pairing_trains_and_evaluates(flags, tiny_data_dir, tmp_path, quick_bootstrap, capsys):
    project = tmp_path / "exp"
    train.main(["--project", str(project), "--data", str(tiny_data_dir), *tiny(1), *flags, "--per-class", "4"])
    metrics = check_metrics(project / "results" / "metrics.json", n_test=sum(TEST_COUNTS))
    expected = {"--loss": "bce", **dict(zip(flags[::2], flags[1::2]))}["--loss"]
    assert metrics["loss"] == expected
    rows = list(csv.DictReader(open(project / "outputs" / "history.csv")))
    assert [row["epoch"] for row in rows] == ["1"]
    if expected in ("contrastive", "triplet"):
        assert 0 <= float(rows[0]["active_fraction"]) <= 1 and float(rows[0]["embedding_spread"]) > 0


def test_isic_sample_through_split_train_and_predict(tmp_path, quick_bootstrap, capsys):
    sample = SHARED / "isic_sample"
    if not sample.is_dir():
        pytest.skip("../shared/data/isic_sample is not here")
    data = tmp_path / "DATA"
    run_script("to_subdirectories.py", "--csv", sample / "train-metadata.csv", "--images",
               sample / "train-image" / "image", "--out", data)
    project = tmp_path / "exp"
    train.main(["--project", str(project), "--data", str(data), *tiny(1, batch_size=32, val_batch_size=64,
                                                                      save_every=50), "--benign-limit", "0"])
    n_test = sum(1 for _ in (data / "test_data").glob("*/*.jpg"))
    metrics = check_metrics(project / "results" / "metrics.json", n_test=n_test)
    assert metrics["test_n_malignant"] > 10  # the sample's 159 melanomas reach the test split


def makefile_flags(name):
    return re.search(rf"^{name} := (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()


def test_synthetic_settings_learn_the_synthetic_lesions(tmp_path, quick_bootstrap, capsys):
    """make compare's synthetic data and flags at half its image size and 6 of its 10 epochs (32 px,
    about a seventh of the compute): test pair accuracy >= 0.8 and Siamese test AUC >= 0.9."""
    flags = makefile_flags("SYNTHETIC_FLAGS")
    assert (flags[flags.index("--image-size") + 1], flags[flags.index("--epochs") + 1]) == ("64", "10")
    data = tmp_path / "synthetic"
    synthetic.make_synthetic(data)  # what `synthetic.py --out` writes, without starting another interpreter
    # the cache decodes the 96 px files once instead of every epoch; one process, no loader workers
    train.main(["--project", str(tmp_path / "synthetic_run"), "--data", str(data), *flags, "--image-size", "32",
                "--epochs", "6", "--workers", "0", "--cache", str(tmp_path / "cache")])
    metrics = json.loads((tmp_path / "synthetic_run" / "results" / "metrics.json").read_text())
    assert (metrics["test_n_benign"], metrics["test_n_malignant"]) == (60, 30)
    assert metrics["test_pair_accuracy"] >= 0.8, metrics
    assert metrics["test_auc"] >= 0.9, metrics


DEMO_DATA = ROOT / "assets" / "isic2017_demo"


def test_the_demo_ships_600_real_lesions_at_128_px_with_their_licence():
    from PIL import Image

    counts = {split: tuple(len(list((DEMO_DATA / split / c).glob("*.jpg"))) for c in "01")
              for split in ("train_data", "validation_data", "test_data")}
    assert counts == {"train_data": (200, 100), "validation_data": (70, 30), "test_data": (120, 80)}
    files = list(DEMO_DATA.rglob("*.jpg"))
    assert sum(f.stat().st_size for f in files) < 5e6
    assert all(f.name.startswith("ISIC_") for f in files) and len({f.name for f in files}) == 600
    with Image.open(files[0]) as image:
        assert image.size == (128, 128) and image.mode == "RGB"
    licence = (DEMO_DATA / "LICENSE.md").read_text()
    assert "CC-0" in licence and "Codella" in licence and "ISBI" in licence


def test_demo_settings_fine_tune_the_packaged_imagenet_weights(tmp_path, quick_bootstrap):
    """make demo's data and flags, shortened (1 epoch, 64 px, 40 images of each split), run for
    real: the pretrained EfficientNet-Lite0 loads offline and the run evaluates its test split."""
    flags = makefile_flags("DEMO_FLAGS")
    assert flags[flags.index("--weights") + 1] == "imagenet" and "--benign-limit" in flags
    assert makefile_flags("DEMO_DATA") == ["assets/isic2017_demo"]
    data = tmp_path / "demo"
    for split in ("train_data", "validation_data", "test_data"):
        for c in "01":
            (data / split / c).mkdir(parents=True)
            for image in sorted((DEMO_DATA / split / c).glob("*.jpg"))[:20]:
                (data / split / c / image.name).symlink_to(image)
    train.main(["--project", str(tmp_path / "run"), "--data", str(data), *flags, "--epochs", "1",
                "--image-size", "64", "--workers", "0", "--save-every", "50"])
    metrics = json.loads((tmp_path / "run" / "results" / "metrics.json").read_text())
    assert (metrics["test_n_benign"], metrics["test_n_malignant"]) == (20, 20)
    assert 0 <= metrics["test_auc"] <= 1
    checkpoint = torch.load(tmp_path / "run" / "outputs" / "best.pth", weights_only=True)
    assert checkpoint["config"]["backbone"] == "efficientnet_lite0" and checkpoint["config"]["recipe"] == "transfer"


def project_files(project):
    """{relative path: bytes} of every file under the project."""
    return {str(p.relative_to(project)): p.read_bytes() for p in sorted(project.rglob("*")) if p.is_file()}


def test_evaluation_on_another_clinics_folder_writes_only_to_out(trained_project, tmp_path, quick_bootstrap,
                                                                  capsys):
    """predict.py --data D --out X with D a plain labelled folder (0/ and 1/): scored against the
    project's own gallery and threshold; the project's files stay byte-identical."""
    project, _ = trained_project
    clinic = make_clinic(tmp_path)  # clinic/0/*.jpg, clinic/1/*.jpg
    before = project_files(project)
    predict.main(["--project", str(project), "--data", str(clinic), "--out", str(tmp_path / "X"),
                  "--gallery-size", "4"])
    assert project_files(project) == before
    metrics = json.loads((tmp_path / "X" / "metrics.json").read_text())
    assert metrics["evaluated_split"] == "external" and metrics["n_external_images"] == 9
    assert (metrics["external_n_benign"], metrics["external_n_malignant"]) == (5, 4)
    assert "external (5 benign, 4 malignant)" in capsys.readouterr().out


def test_data_without_a_test_split_trains_and_reports_validation(tiny_data_dir, tmp_path, quick_bootstrap, capsys):
    data = tmp_path / "no_test"
    data.mkdir()
    for split in ("train_data", "validation_data"):
        (data / split).symlink_to(tiny_data_dir / split)
    project = tmp_path / "exp"
    train.main(["--project", str(project), "--data", str(data), *tiny(1), "--recipe", "tuned", "--gallery-size", "0"])
    assert "no test_data folder" in capsys.readouterr().out
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    assert metrics["evaluated_split"] == "val" and metrics["n_val_images"] == 10
    assert math.isfinite(metrics["val_auc"]) and metrics["tta"] is True
    # every classifier the tuned Siamese model supports, scored from the same embeddings
    assert set(metrics["other_scores"]) == {"head-knn", "knn", "prototype", "direct", "probe"}
    for other in metrics["other_scores"].values():
        assert 0 <= other["auc"] <= 1 and other["tn"] + other["fp"] == 6
