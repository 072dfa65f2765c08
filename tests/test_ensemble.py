"""ensemble.py on tiny trained projects: the mean of the models' P(malignant), the threshold chosen
on the mean of their validation P(malignant), and models validated on other images refused; on
saved evaluations (--scores): the ensemble's AUC and its paired differences from its models."""
import subprocess
import sys

import numpy as np
import pytest

import ensemble
from calibration import calibrated
from gallery import validation_scores
from helpers import ROOT, SUBPROCESS_ENV, run_script, tiny, write_scores_csv
from calibration import expected_calibration_error
from metrics import auc_or_nan, bootstrap_auc, choose_threshold, paired_auc_difference, signed
from predict import load_predictor, predict_files


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
    capped = {seed: tmp_path / f"capped{seed}" for seed in (0, 1)}  # validation capped at 3 benign images,
    for seed, project in capped.items():                          # drawn by each seed
        run_script("train.py", "--project", project, "--data", tiny_data_dir, *tiny(1), "--benign-limit", "0", "3",
                   "0", "--seed", seed)
    image = next((tiny_data_dir / "test_data" / "1").glob("*.jpg"))
    for first, second in ((trained_project[0], capped[0]), (capped[0], capped[1])):  # the second: by the seed alone
        with pytest.raises(SystemExit, match=rf"ensemble.py: error: --checkpoints .*{second.name}/outputs/best.pth was "
                                             r"validated on other images than .*; an ensemble's threshold needs "
                                             r"models validated on the same images"):
            ensemble.main(["--checkpoints", str(first / "outputs" / "best.pth"), str(second / "outputs" / "best.pth"),
                           "--image", str(image)])


def test_the_threshold_follows_the_models_target_sensitivity(trained_project, second_project, monkeypatch):
    checkpoints = [trained_project[0] / "outputs" / "best.pth", second_project / "outputs" / "best.pth"]
    targets = {checkpoints[0]: 0.5, checkpoints[1]: 0.5}

    def evaluated_with_a_target(checkpoint, data=None, device="auto"):  # as predict.py --target-sensitivity saves it
        model, config, gallery, on = load_predictor(checkpoint, data, device)
        return model, config, {**gallery, "target_sensitivity": targets[checkpoint]}, on
    monkeypatch.setattr(ensemble, "load_predictor", evaluated_with_a_target)
    members, threshold = ensemble.load_members(checkpoints)
    labels = members[0][2]["validation_labels"].numpy()
    mean = np.mean([ensemble.validation_probabilities(*member) for member in members], axis=0)
    assert threshold == choose_threshold(labels, mean, 0.5) != choose_threshold(labels, mean)
    targets[checkpoints[1]] = None
    with pytest.raises(ValueError, match=r"--checkpoints .*best.pth chose its threshold by another "
                                         r"--target-sensitivity than"):
        ensemble.load_members(checkpoints)


@pytest.mark.parametrize("argv, message", [
    (["--checkpoints", "a.pth", "--image", "x.jpg"], "--checkpoints: give two or more models"),
    (["--checkpoints", "a.pth", "a.pth", "--image", "x.jpg"], "--checkpoints: a model given twice would count twice"),
    (["--checkpoints", "a.pth", "b.pth", "--image", "x.jpg"], "--checkpoints a.pth: no such file"),
    (["--checkpoints", "a.pth", "b.pth"], "--image: give an image for the --checkpoints to score"),
    (["--scores", "a"], "--scores: give two or more models"),
    (["--scores", "a", "b"], "--scores a: no such file; evaluate the model with predict.py"),
    (["--scores", "a", "b", "--image", "x.jpg"], "--image: scored by --checkpoints, not --scores"),
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



def evaluations(folder, n_models=3, n_images=200):
    """Three models' scores.csv on the same images, each raw score on another scale than its
    P(malignant); (labels, their P(malignant) as a (models, images) array, the results folders)."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], n_images // 2)
    images = [f"{i}.jpg" for i in range(n_images)]
    members = np.stack([1 / (1 + np.exp(-(labels + rng.normal(0, 1, n_images)))) for _ in range(n_models)])
    for i, member in enumerate(members):
        write_scores_csv(folder / f"s{i}", images, labels, member, power=1 + 4 * (i % 2))
    return labels, members, [folder / f"s{i}" / "results" for i in range(n_models)]


def test_scores_gives_the_ensembles_auc_and_its_paired_difference_from_each_model(tmp_path, capsys):
    labels, members, results = evaluations(tmp_path)
    ensemble.main(["--scores", *map(str, results)])
    lines = capsys.readouterr().out.splitlines()
    mean = members.mean(0)  # of the probabilities, not of the raw scores, which rank otherwise:
    assert f"{auc_or_nan(labels, mean):.3f}" != f"{auc_or_nan(labels, members[0] + members[1] ** 5):.3f}"
    low, high = bootstrap_auc(labels, mean)
    assert lines[0] == (f"ensemble of 3 models on 200 images (100 malignant): ROC AUC {auc_or_nan(labels, mean):.3f} "
                        f"(95% CI {low:.3f}-{high:.3f}), ECE of its P(malignant) "
                        f"{expected_calibration_error(labels, mean):.3f}")
    for line, member, folder in zip(lines[2:5], members, results):
        assert line == (f"  {auc_or_nan(labels, member):.3f}  {signed(*paired_auc_difference(labels, mean, member))}  "
                        f"{folder / 'scores.csv'}")
    pooled = paired_auc_difference(labels, np.stack([mean] * 3), members)
    assert pooled[0] > 0  # the models' independent errors average out
    assert lines[5] == f"  {np.mean([auc_or_nan(labels, m) for m in members]):.3f}  {signed(*pooled)}  the models' mean"
    assert lines[6].startswith("3 evaluations in ")


def test_scores_of_other_images_or_without_probabilities_are_refused(tmp_path):
    _, _, results = evaluations(tmp_path, n_models=2)
    moved = results[1] / "scores.csv"
    header, first, *rows = moved.read_text().splitlines()
    moved.write_text("\n".join([header, *rows, first]) + "\n")  # the same images in another order
    with pytest.raises(ValueError, match=r"s1/results/scores.csv: scores other images than .*s0/results/scores.csv; "
                                         r"an ensemble needs its models evaluated on the same images"):
        ensemble.ensemble_of([folder / "scores.csv" for folder in results])
    moved.write_text("\n".join(["image,label,gallery", *(",".join(r.split(",")[:3]) for r in rows)]) + "\n")
    with pytest.raises(ValueError, match=r"s1/results/scores.csv: holds no calibrated P\(malignant\)"):
        ensemble.ensemble_of([folder / "scores.csv" for folder in results])
    moved.write_text("image,label\nx.jpg,benign\n")
    with pytest.raises(ValueError, match=r"s1/results/scores.csv: unreadable"):
        ensemble.ensemble_of([folder / "scores.csv" for folder in results])
    for rows, counts in (([], "0 benign and 0 malignant"), (["0.jpg,0,0.2,0.2"], "1 benign and 0 malignant")):
        moved.write_text("\n".join(["image,label,gallery,gallery_probability", *rows]) + "\n")
        with pytest.raises(ValueError, match=rf"s1/results/scores.csv: holds {counts} images; an AUC needs both"):
            ensemble.ensemble_of([folder / "scores.csv" for folder in results])


@pytest.mark.parametrize("given, message", [
    (lambda results: [results[0], results[0] / "scores.csv"], "--scores: a model given twice would count twice"),
    (lambda results: [results[0].parent, results[1]], r"--scores .*s0/scores.csv: no such file; pass .*s0/results, "
                                                      r"the project's results folder"),
])
def test_scores_refuses_a_model_twice_and_names_a_projects_results(given, message, tmp_path):
    _, _, results = evaluations(tmp_path, n_models=2)
    with pytest.raises(ValueError, match=message):
        ensemble.run(ensemble.parse_args(["--scores", *map(str, given(results))]))
