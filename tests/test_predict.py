"""Tests of predict.py: its command line's error messages, and another clinic's images, single
images and pairs evaluated from the project alone (gallery.pt), without its training data; an
evaluation writes only into --out (never over the project's gallery or its data), stops in one line
on a bad flag, path, full disk or oversized image, puts earlier results back when a signal stops
it, and lists the images it left out. Damaged checkpoints and galleries: test_checkpoints.py."""
import contextlib
import functools
import json
import math
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import images
import metrics
import checkpoints
import predict
from helpers import (BROKEN_FILES, SIGNALS, SUBPROCESS_ENV, assert_one_line, call_main, evaluate_argv, jpeg_bytes,
                     make_clinic, tiny, torch_load)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ---------------------------------------------------------------------------------------------
# The command line's errors (both commands run at once: each start imports torch)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The two interpreters, started together. Not autouse: under pytest -n each worker that runs a
    test of this module would start them, whether or not it runs these two tests."""
    folder = tmp_path_factory.mktemp("cli")
    commands = {
        "no_args": [],
        "missing_image": ["--checkpoint", str(folder / "best.pth"), "--image", str(folder / "missing.jpg")],
    }
    running = {name: subprocess.Popen([sys.executable, "predict.py", *args], cwd=ROOT, text=True, env=SUBPROCESS_ENV,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for name, args in commands.items()}
    yield running, folder
    for process in running.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def cli_errors(cli_runs):
    running, folder = cli_runs
    results = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=180)
        results[name] = (process.returncode, stdout, stderr)
    return results, folder


def test_cli_without_arguments_fails_with_one_line_naming_project(cli_errors):
    results, _ = cli_errors
    code, stdout, stderr = results["no_args"]
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "--project" in lines[0] and lines[0].startswith("predict.py: error:")
    assert stdout == ""


def test_cli_image_that_does_not_exist_fails_with_a_clear_message(cli_errors):
    results, folder = cli_errors
    code, stdout, stderr = results["missing_image"]
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr
    assert str(folder / "missing.jpg") in lines[0] and "no such file" in lines[0]


# ---------------------------------------------------------------------------------------------
# Another clinic's images from the project alone (gallery.pt), without the training data


@pytest.fixture(scope="module")
def movable_project(tiny_data_dir, tmp_path_factory):
    """(project, data, clinic): a tiny project trained in-process on its own copy of tiny_data_dir
    (a test may take that copy away, in moved_away), and another clinic's labelled folder."""
    import train

    folder = tmp_path_factory.mktemp("movable")
    data, project = folder / "data", folder / "exp"
    shutil.copytree(tiny_data_dir, data)
    with pytest.MonkeyPatch.context() as patch:  # quick_bootstrap, for the module
        patch.setattr(predict, "image_metrics", functools.partial(metrics.image_metrics, n_bootstrap=50))
        train.main(["--project", str(project), "--data", str(data), *tiny(1)])
    return project, data, make_clinic(folder)


@contextlib.contextmanager
def moved_away(folder):
    """The folder is not there inside, as on a machine that has the project but not its data."""
    aside = folder.with_name(folder.name + ".away")
    folder.rename(aside)
    try:
        yield
    finally:
        aside.rename(folder)


def evaluate_clinic(project, clinic, out, *flags):
    """metrics.json and scores.csv of predict.py --project P --data CLINIC --out OUT, in-process.
    --batch-size 8 is train.py's --val-batch-size in TINY: the features in gallery.pt were embedded
    in batches of 8, so a rebuild embeds the same batches."""
    predict.main(["--project", str(project), "--data", str(clinic), "--out", str(out), "--batch-size", "8", *flags])
    return json.loads((out / "metrics.json").read_text()), (out / "scores.csv").read_text()


SCORED = ["--score", "gallery", "head-knn", "knn", "prototype", "--k", "3"]  # other_scores need validation too


def test_another_clinic_is_evaluated_from_gallery_pt_as_from_the_training_data(movable_project, tmp_path,
                                                                               quick_bootstrap, capsys):
    project, data, clinic = movable_project
    gallery = project / "outputs" / "gallery.pt"
    with moved_away(data):  # no training or validation image: gallery and validation from gallery.pt
        stored, stored_scores = evaluate_clinic(project, clinic, tmp_path / "stored", *SCORED)
    assert f"gallery and validation features from {gallery}" in capsys.readouterr().out
    with moved_away(gallery):  # the same evaluation rebuilt from the training data
        rebuilt, rebuilt_scores = evaluate_clinic(project, clinic, tmp_path / "rebuilt", *SCORED)
    assert f"{gallery}: missing; rebuilding the gallery" in capsys.readouterr().out
    assert stored == rebuilt and stored_scores == rebuilt_scores  # one scoring path: the same numbers, exactly
    assert set(stored["other_scores"]) == {"head-knn", "knn", "prototype"} and math.isfinite(stored["val_auc"])
    assert stored["external_n_benign"] + stored["external_n_malignant"] == 9


def test_another_clinic_without_gallery_or_training_data_is_one_line(movable_project, tmp_path, quick_bootstrap,
                                                                     capsys):
    project, data, clinic = movable_project
    with moved_away(data), moved_away(project / "outputs" / "gallery.pt"), pytest.raises(SystemExit) as stop:
        evaluate_clinic(project, clinic, tmp_path / "X")
    message = str(stop.value.code)
    assert message.startswith(f"predict.py: error: {data}: the model's training data is not there any more")
    assert "gallery.pt" in message and "\n" not in message
    assert "rebuilding the gallery and threshold from the training data" in capsys.readouterr().out


def test_other_settings_than_gallery_pt_was_made_with_rebuild_in_one_line(movable_project, tmp_path,
                                                                          quick_bootstrap, capsys):
    project, _, clinic = movable_project
    found, _ = evaluate_clinic(project, clinic, tmp_path / "X", "--gallery-size", "2")
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "rebuilding the gallery" in line]
    assert len(lines) == 1 and "made with --gallery-size 4" in lines[0] and "--gallery-size 2" in lines[0]
    assert "gallery and validation features from" not in out and found["gallery_size"] == 2


@pytest.mark.parametrize("damage", ["older", "labels", "width", "length", "non-finite"])
def test_a_gallery_pt_without_usable_validation_fields_is_rebuilt_not_a_crash(damage, movable_project, tmp_path,
                                                                              quick_bootstrap, capsys):
    """An older gallery.pt (no validation fields) or a damaged one (stamp still right) means a
    rebuild from the training data with one line saying why."""
    trained, _, clinic = movable_project
    project = tmp_path / "exp"
    shutil.copytree(trained / "outputs", project / "outputs")
    path = project / "outputs" / "gallery.pt"
    gallery = torch.load(path, weights_only=True)
    features = gallery["validation_features"]
    if damage == "older":
        for key in ("validation_features", "validation_labels", "gallery_size"):
            del gallery[key]
    else:
        gallery.update({"labels": {"validation_labels": gallery["validation_labels"] * 2},
                        "width": {"validation_features": features[:, :-1]},
                        "length": {"validation_labels": gallery["validation_labels"][:-1]},
                        "non-finite": {"validation_features": features * float("nan")}}[damage])
    torch.save(gallery, path)
    width = features.shape[1]
    problem = checkpoints.gallery_problem(gallery, width)
    assert problem
    found, _ = evaluate_clinic(project, clinic, tmp_path / "X")
    assert f"{path}: {problem}; rebuilding the gallery and threshold from the training data" in \
        capsys.readouterr().out
    assert found["evaluated_split"] == "external"


def test_an_unreadable_gallery_pt_is_one_line_each_time(movable_project, tmp_path, quick_bootstrap, capsys):
    """A truncated gallery.pt: the evaluation rebuilds with one line saying why, and --image without
    --data stops with one line naming the file and the fix."""
    trained, _, clinic = movable_project
    project = tmp_path / "exp"
    shutil.copytree(trained / "outputs", project / "outputs")
    path = project / "outputs" / "gallery.pt"
    path.write_bytes(path.read_bytes()[:100])  # as a full disk or an interrupted copy leaves it
    evaluate_clinic(project, clinic, tmp_path / "X")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{path}:")]
    assert lines == [f"{path}: unreadable (truncated, corrupt or not written by this repository); "
                     f"rebuilding the gallery and threshold from the training data"]
    image = str(sorted((clinic / "1").glob("*.jpg"))[0])
    with pytest.raises(SystemExit) as stop:
        predict.main(["--project", str(project), "--image", image])
    message = str(stop.value.code)
    assert message == (f"predict.py: error: {path}: unreadable (truncated, corrupt or not written by this "
                       f"repository); pass --data DATA to rebuild it from the training and validation splits "
                       f"(or evaluate the project again)")
    assert capsys.readouterr().out == ""


def test_single_images_and_pairs_need_no_training_data(movable_project, tmp_path, capsys):
    """--image and --pair use gallery.pt only; the figures name the gallery images whose files are gone,
    and one line says so."""
    project, data, clinic = movable_project
    images = [str(path) for path in sorted((clinic / "1").glob("*.jpg"))[:2]]
    with moved_away(data):
        predict.main(["--project", str(project), "--image", images[0], "--image", images[1],
                      "--out", str(tmp_path / "figures")])
        predict.main(["--project", str(project), "--pair", *images])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.endswith(image) for line, image in zip(lines[0:6:3], images)] == [True, True]
    notes = [line for line in lines if "nearest gallery image(s) not found" in line]
    assert len(notes) == 1 and str(data.resolve()) in notes[0] and notes[0].endswith("the figures show their names instead")
    assert lines[-1].startswith("similarity ")
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(Path(i).stem + "_prediction.png"
                                                                             for i in images)


# ---------------------------------------------------------------------------------------------
# A clinic's own gallery (--gallery): its images are the gallery and set threshold and calibration


def files_of(folder):
    return {path: path.read_bytes() for path in sorted(Path(folder).rglob("*")) if path.is_file()}


def test_a_clinics_gallery_replaces_gallery_threshold_and_calibration_and_leaves_the_project_alone(
        movable_project, tmp_path, quick_bootstrap, capsys):
    project, data, clinic = movable_project
    before = files_of(project)
    found, _ = evaluate_clinic(project, data, tmp_path / "X", "--gallery", str(clinic))
    assert files_of(project) == before  # byte for byte: nothing written, moved or replaced
    assert found["gallery"] == str(clinic) and found["evaluated_split"] == "test"
    own = torch.load(project / "outputs" / "gallery.pt", weights_only=True)
    assert found["test_threshold"] != own["threshold"]
    assert found["calibration_prevalence"] == pytest.approx(4 / 9)  # the clinic's 5 benign, 4 malignant
    capsys.readouterr()
    image = str(sorted((data / "test_data" / "1").glob("*.jpg"))[0])
    predict.main(["--project", str(project), "--gallery", str(clinic), "--image", image, "--out", str(tmp_path / "f")])
    line = capsys.readouterr().out.splitlines()[0]
    assert "calibrated where 44% are melanomas" in line and files_of(project) == before
    model, config, gallery, device = predict.load_predictor(project / "outputs" / "best.pth", clinic=clinic)
    assert len(gallery["labels"]) == 9 and all(Path(p).parent.parent == clinic.resolve() for p in gallery["paths"])


def test_a_clinics_gallery_with_fewer_than_two_of_a_class_or_without_out_is_one_line(movable_project, tmp_path,
                                                                                     capsys):
    project, data, clinic = movable_project
    small = tmp_path / "small"
    shutil.copytree(clinic, small)
    for path in sorted((small / "1").glob("*.jpg"))[1:]:
        path.unlink()
    for argv, message in (
            (["--gallery", str(small), "--out", str(tmp_path / "X")],
             f"--gallery {small}: 5 benign and 1 malignant image(s); a clinic's gallery needs at least 2 of each"),
            (["--gallery", str(clinic)], "--gallery: pass --out FOLDER"),
            (["--gallery", str(data), "--out", str(tmp_path / "Y")], f"--gallery {data}: overlaps --data {data}")):
        with pytest.raises(SystemExit) as stop:
            predict.main(["--project", str(project), "--data", str(data), *argv])
        assert str(stop.value.code).startswith(f"predict.py: error: {message}")
        assert "\n" not in str(stop.value.code)


def test_a_run_stopped_in_its_first_epoch_points_at_last_pth_and_says_what_it_holds(movable_project, tmp_path,
                                                                                    quick_bootstrap, capsys):
    trained, data, _ = movable_project
    project = tmp_path / "exp"
    (project / "outputs").mkdir(parents=True)
    state = torch.load(trained / "outputs" / "last.pth", weights_only=True)
    torch.save({**state, "epoch": 0, "step": 3}, project / "outputs" / "last.pth")  # stopped 3 steps into epoch 1
    with pytest.raises(SystemExit) as stop:
        predict.main(["--project", str(project), "--data", str(data)])
    last = project / "outputs" / "last.pth"
    assert str(stop.value.code) == (
        f"predict.py: error: checkpoint {project / 'outputs' / 'best.pth'}: no such file, but {last} is there (the run "
        f"stopped before its first validation): evaluate it with predict.py --checkpoint {last}, or continue the run with "
        f"train.py --resume")
    predict.main(["--project", str(project), "--checkpoint", str(last), "--data", str(data), "--out", str(tmp_path / "X"),
                  "--batch-size", "8"])
    assert f"{last} (0 complete epoch(s) and 3 steps of epoch 1)" in capsys.readouterr().out


def test_an_older_gallery_pt_without_a_probability_map_is_rebuilt_from_data_or_refused_in_one_line(
        movable_project, tmp_path, capsys):
    """A gallery.pt written before galleries kept the map: --image rebuilds the gallery from --data,
    saying why, and without --data stops in one line naming the file and the fix."""
    trained, data, clinic = movable_project
    project = tmp_path / "exp"
    shutil.copytree(trained / "outputs", project / "outputs")
    path = project / "outputs" / "gallery.pt"
    gallery = torch.load(path, weights_only=True)
    gallery.pop("calibration")  # as written before galleries kept the map
    torch.save(gallery, path)
    image = str(sorted((clinic / "1").glob("*.jpg"))[0])
    argv = ["--project", str(project), "--image", image, "--out", str(tmp_path / "f")]
    with pytest.raises(SystemExit) as stopped:
        predict.main(argv)
    assert str(stopped.value.code) == (f"predict.py: error: {path}: it was written by an older version, without its "
                                       f"calibration; pass --data DATA to rebuild it from the training and "
                                       f"validation splits (or evaluate the project again)")
    predict.main([*argv, "--data", str(data)])
    out = capsys.readouterr().out
    assert f"{path}: it was written by an older version, without its calibration; rebuilding the gallery" in out
    assert "P(malignant)" in out


def test_a_benign_verdict_never_prints_its_thresholds_probability():
    flat = {"calibration": {"method": "platt", "coef": 0.0, "intercept": 0.0, "prevalence": 0.5}, "threshold": 0.6}
    benign = predict.Prediction(score=0.55, probability=0.5, verdict="benign")
    assert predict.probability_text(benign, flat).startswith("P(malignant) <0.50  benign  (malignant from 0.50;")
    malignant = predict.Prediction(score=0.65, probability=0.5, verdict="malignant")
    assert predict.probability_text(malignant, flat).startswith("P(malignant) 0.50  malignant  (malignant from 0.50;")


def test_a_clinics_gallery_never_replaces_the_projects_gallery_pt(movable_project):
    project, data, clinic = movable_project
    config = predict.load_checkpoint(project / "outputs" / "best.pth")[1]
    own = (project / "outputs" / "best.pth", data, project / "results", config)
    assert predict.writes_gallery(*own) and not predict.writes_gallery(*own, clinic=clinic)


# ---------------------------------------------------------------------------------------------
# Evaluation into --out: the project's gallery and the data left alone, one line for each mistake


def test_evaluation_into_out_or_of_other_data_leaves_the_projects_gallery(evaluated_project, broken_data_dir,
                                                                          tmp_path, quick_bootstrap):
    project = tmp_path / "project"
    shutil.copytree(evaluated_project / "outputs", project / "outputs")
    gallery = project / "outputs" / "gallery.pt"
    before = (gallery.stat().st_ino, gallery.stat().st_mtime_ns, gallery.read_bytes())
    out = tmp_path / "elsewhere"
    assert call_main(predict.main, evaluate_argv(project, broken_data_dir, "--out", out)) == (0, "")
    assert (out / "metrics.json").exists() and not (project / "results").exists()
    other = Path(shutil.copytree(broken_data_dir, tmp_path / "other_data"))
    assert call_main(predict.main, evaluate_argv(project, other)) == (0, "")
    assert (gallery.stat().st_ino, gallery.stat().st_mtime_ns, gallery.read_bytes()) == before


def test_evaluation_of_the_training_data_into_the_project_replaces_the_gallery(evaluated_project, broken_data_dir,
                                                                               tmp_path, quick_bootstrap):
    project = tmp_path / "project"
    shutil.copytree(evaluated_project / "outputs", project / "outputs")
    gallery = project / "outputs" / "gallery.pt"
    gallery.unlink()
    assert call_main(predict.main, evaluate_argv(project, broken_data_dir)) == (0, "")
    assert torch_load(gallery)["checkpoint_stamp"] == checkpoints.checkpoint_stamp(project / "outputs" / "best.pth")


def test_evaluating_last_pth_into_the_project_leaves_the_gallery_of_best_pth(evaluated_project, broken_data_dir,
                                                                             tmp_path, quick_bootstrap):
    project = tmp_path / "project"
    shutil.copytree(evaluated_project / "outputs", project / "outputs")
    shutil.copy(project / "outputs" / "best.pth", project / "outputs" / "last.pth")
    gallery = project / "outputs" / "gallery.pt"
    before = gallery.read_bytes()
    argv = evaluate_argv(project, broken_data_dir, "--checkpoint", project / "outputs" / "last.pth")
    assert call_main(predict.main, argv) == (0, "")
    assert gallery.read_bytes() == before and (project / "results" / "metrics.json").exists()


def test_predict_out_that_is_a_file_is_one_line(evaluated_project, broken_data_dir, tmp_path):
    report = tmp_path / "report.txt"
    report.write_text("mine")
    status, message = call_main(predict.main, evaluate_argv(evaluated_project, broken_data_dir, "--out", report))
    assert status != 0
    assert_one_line(message, f"predict.py: error: --out {report}: is a file")
    assert report.read_text() == "mine"


@pytest.mark.parametrize("out", ["data", "inside_data", "project", "outputs"])
def test_predict_out_that_overlaps_the_data_or_the_checkpoint_moves_nothing(out, evaluated_project, broken_data_dir,
                                                                            tmp_path):
    data = Path(shutil.copytree(broken_data_dir, tmp_path / "data"))
    project = tmp_path / "project"
    shutil.copytree(evaluated_project / "outputs", project / "outputs")
    target = {"data": data, "inside_data": data / "train_data", "project": project,
              "outputs": project / "outputs"}[out]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    status, message = call_main(predict.main, evaluate_argv(project, data, "--out", target))
    assert status != 0
    assert_one_line(message, "predict.py: error:")
    assert f"--out {target}: overlaps" in message
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("flag, value", [("--target-sensitivity", "1.5"), ("--target-sensitivity", "nan"),
                                         ("--workers", "-1")])
def test_predict_bad_flag_is_one_line_before_any_work(flag, value, evaluated_project, broken_data_dir, tmp_path):
    out = tmp_path / "out"
    status, message = call_main(predict.main, evaluate_argv(evaluated_project, broken_data_dir, "--out", out, flag,
                                                            value))
    assert status != 0
    assert_one_line(message, f"predict.py: error: {flag} {value}:")
    assert not out.exists()


def test_predict_full_disk_is_one_line_naming_the_file(evaluated_project, broken_data_dir, tmp_path, monkeypatch,
                                                       quick_bootstrap):
    real_write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name.startswith((".metrics.", "metrics.json")):  # metrics.json or its temporary file
            raise OSError(28, "No space left on device", str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    out = tmp_path / "report"
    try:
        status, message = call_main(predict.main, evaluate_argv(evaluated_project, broken_data_dir, "--out", out))
    except OSError as error:
        pytest.fail(f"traceback: {error!r}")
    assert status != 0
    assert_one_line(message, f"predict.py: error: could not write {out / 'metrics.json'} (No space left on device)")


@pytest.mark.parametrize("earlier", [True, False], ids=["earlier-results", "no-earlier-results"])
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_signal_during_evaluation_puts_the_earlier_results_back(signum, earlier, evaluated_project, broken_data_dir,
                                                                tmp_path, monkeypatch, capsys):
    """SIGINT / SIGTERM (the real signal, to predict.py's own handler) right after the earlier
    results were moved aside: they are moved back, nothing half-written is left, one line, 128 + signal."""
    out = tmp_path / "report"
    if earlier:
        out.mkdir()
        (out / "metrics.json").write_text("earlier\n")

    def signalled(*args, **kwargs):
        assert not earlier or not out.exists() or not (out / "metrics.json").exists()  # moved aside by now
        signal.raise_signal(signum)
        raise AssertionError("the signal did not stop the evaluation")

    monkeypatch.setattr(predict, "build_gallery", signalled)
    status, message = call_main(predict.main, evaluate_argv(evaluated_project, broken_data_dir, "--out", out))
    assert (status, message) == (128 + signum, "")
    stderr = capsys.readouterr().err.strip()
    assert_one_line(stderr, f"predict.py: stopped by {signum.name}; ")
    if earlier:
        assert stderr.endswith(f"earlier results moved back to {out}")
        assert [p.name for p in out.iterdir()] == ["metrics.json"] and (out / "metrics.json").read_text() == "earlier\n"
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["report"] if earlier else [])  # no results.<date-time> left


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the size is the subject
@pytest.mark.parametrize("flag", ["--image", "--pair"])
def test_image_whose_header_claims_too_many_pixels_is_refused_before_decoding(flag, reference_run, tmp_path,
                                                                              monkeypatch):
    data = bytearray(jpeg_bytes())
    frame = data.find(b"\xff\xc0")  # start of frame: height and width at bytes 5-8
    data[frame + 5:frame + 9] = (12_000).to_bytes(2, "big") * 2
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(bytes(data))
    assert len(data) < 2000

    def no_decoding(path):
        raise AssertionError(f"{path} was decoded")

    monkeypatch.setattr(predict, "read_rgb", no_decoding)
    inputs = [bomb] if flag == "--image" else [bomb, bomb]
    status, message = call_main(predict.main, ["--checkpoint", reference_run.outputs / "best.pth", flag, *inputs,
                                               "--device", "cpu"])
    assert status != 0
    assert_one_line(message, f"predict.py: error: {flag} {bomb}: too large (12000x12000)")
    assert f"{images.MAX_PIXELS:,}" in message


def test_evaluation_counts_and_lists_every_image_it_left_out(evaluated_project, broken_data_dir, tmp_path,
                                                             quick_bootstrap, capsys):
    broken = Path(shutil.copytree(broken_data_dir, tmp_path / "data"))
    good = (broken / "test_data" / "1" / "SYN_test_1_0000.jpg").read_bytes()
    (broken / "test_data" / "1" / "cut_a.jpg").write_bytes(good[: len(good) // 2])
    (broken / "test_data" / "0" / "cut_b.jpg").write_bytes(good[: len(good) // 3])
    (broken / "test_data" / "0" / "notes.txt").write_text("not an image")
    assert call_main(predict.main, evaluate_argv(evaluated_project, broken, "--out", tmp_path / "X")) == (0, "")
    listed = (tmp_path / "X" / "excluded_images.txt").read_text().splitlines()
    names = {Path(line.split("\t")[0]).name for line in listed}
    assert {"cut_a.jpg", "cut_b.jpg", "notes.txt"} <= names and BROKEN_FILES <= names
    assert json.loads((tmp_path / "X" / "metrics.json").read_text())["n_excluded_images"] == len(listed)
    assert re.search(rf"excluded images +{len(listed)}, listed in .*excluded_images.txt", capsys.readouterr().out)
