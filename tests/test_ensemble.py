"""ensemble.py on tiny trained projects: the mean of the models' P(malignant), the threshold chosen
on the mean of their validation P(malignant), and models validated on other images refused."""
import subprocess
import sys

import numpy as np
import pytest

import ensemble
from calibration import calibrated
from gallery import validation_scores
from helpers import ROOT, SUBPROCESS_ENV, run_script, tiny
from metrics import choose_threshold
from predict import load_predictor, predict_files


@pytest.fixture(scope="module")
def second_project(tiny_data_dir, tmp_path_factory):
    """A second model of trained_project's data and validation images: another seed, 1 epoch."""
    project = tmp_path_factory.mktemp("second") / "exp"
    run_script("train.py", "--project", project, "--data", tiny_data_dir, *tiny(1), "--seed", "1")
    return project


def test_an_ensemble_averages_its_models_probabilities_and_sets_its_threshold_on_their_mean(
        trained_project, second_project, tiny_data_dir, capsys):
    checkpoints = [trained_project[0] / "outputs" / "best.pth", second_project / "outputs" / "best.pth"]
    images = sorted((tiny_data_dir / "test_data").glob("*/*.jpg"))[::3]
    ensemble.main(["--checkpoints", *map(str, checkpoints), *[a for image in images for a in ("--image", str(image))]])
    lines = capsys.readouterr().out.splitlines()[:len(images)]

    each, validation = [], []
    for checkpoint in checkpoints:  # each model as predict.py --image and its evaluation score it
        model, config, gallery, device = load_predictor(checkpoint)
        each.append([p.probability for p in predict_files(model, config, gallery, images, device, checkpoint,
                                                          explain=False)])
        scores = validation_scores(model, gallery["score"], gallery["k"], gallery, gallery["validation_features"],
                                   config.seed)
        validation.append(calibrated(gallery["calibration"], scores))
    labels = gallery["validation_labels"].numpy()
    threshold = choose_threshold(labels, np.mean(validation, axis=0))
    assert not np.allclose(validation[0], validation[1])  # two models that disagree: the mean is not either one
    for line, path, first, second in zip(lines, images, *each):
        mean = (first + second) / 2
        assert line.startswith(f"P(malignant) {mean:.2f}  {'malignant' if mean >= threshold else 'benign'}  "
                               f"(malignant from {threshold:.2f}; the mean of 2 models: {first:.2f} {second:.2f};")
        assert line.endswith(f"  {path}")


def test_models_validated_on_other_images_are_refused(trained_project, tiny_data_dir, tmp_path, capsys):
    capped = tmp_path / "capped"  # the same data, its validation split capped at 3 benign images
    run_script("train.py", "--project", capped, "--data", tiny_data_dir, *tiny(1), "--benign-limit", "0", "3", "0")
    image = next((tiny_data_dir / "test_data" / "1").glob("*.jpg"))
    with pytest.raises(SystemExit, match=r"ensemble.py: error: --checkpoints .*capped/outputs/best.pth was validated "
                                         r"on other images than .*; an ensemble's threshold needs models validated "
                                         r"on the same images"):
        ensemble.main(["--checkpoints", str(trained_project[0] / "outputs" / "best.pth"),
                       str(capped / "outputs" / "best.pth"), "--image", str(image)])


@pytest.mark.parametrize("argv, message", [
    (["--checkpoints", "a.pth", "--image", "x.jpg"], "--checkpoints: give two or more models"),
    (["--checkpoints", "a.pth", "a.pth", "--image", "x.jpg"], "--checkpoints: a model given twice would count twice"),
    (["--checkpoints", "a.pth", "b.pth", "--image", "x.jpg"], "--checkpoints a.pth: no such file"),
])
def test_ensemble_refuses_bad_flags_in_one_line(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = subprocess.run([sys.executable, str(ROOT / "ensemble.py"), *argv], capture_output=True, text=True,
                            env=SUBPROCESS_ENV)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"ensemble.py: error: {message}")


def test_ensemble_runs_from_the_command_line(trained_project, second_project, tiny_data_dir):
    image = next((tiny_data_dir / "test_data" / "0").glob("*.jpg"))
    out = run_script("ensemble.py", "--checkpoints", trained_project[0] / "outputs" / "best.pth",
                     second_project / "outputs" / "best.pth", "--image", image)
    assert out.startswith("P(malignant) 0.") and "the mean of 2 models" in out and out.rstrip().endswith(" s")

