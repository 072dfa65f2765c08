"""Checkpoints and galleries saved and loaded safely (checkpoints.py): each file saved with its
format and a newer format refused, pickled code refused unrun (load_checkpoint, train.py --resume
and --weights, predict.py), checkpoints of other networks, truncated files, hand-edited configs and
non-finite weights each in one line naming the file, a last.pth of an older format refused, the
random streams saved and restored, and gallery.pt validated (damaged, unreadable, or made for
another checkpoint)."""
import ast
import builtins
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import predict
import train
from checkpoints import checked_config, load_checkpoint, save_versioned
from files import save_atomic
from losses import build_model
from helpers import (ROOT, tiny_config, SUBPROCESS_ENV, assert_one_line, call_main, evaluate_argv, jpeg_bytes, torch_load,
                     train_argv)
from files import WeightsError

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg_bytes())
    return path


# ---------------------------------------------------------------------------------------------
# Each file saved with its format; a newer format refused, an older best.pth still read


def test_best_last_and_gallery_are_saved_with_the_current_format(evaluated_project):
    for name in ("best.pth", "last.pth", "gallery.pt"):
        assert torch_load(evaluated_project / "outputs" / name)["format"] == checkpoints.FORMAT, name


@pytest.mark.parametrize("name, load", [("best.pth", checkpoints.load_checkpoint),
                                        ("last.pth", checkpoints.load_last),
                                        ("gallery.pt", checkpoints.load_state)])
def test_a_file_of_a_newer_format_is_refused_in_one_line_naming_it(name, load, evaluated_project, tmp_path):
    path = tmp_path / name
    state = torch_load(evaluated_project / "outputs" / name)
    state["format"] = checkpoints.FORMAT + 1
    torch.save(state, path)
    with pytest.raises(WeightsError) as error:
        load(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert f"written by a newer version of this repository (format {checkpoints.FORMAT + 1})" in message


def test_a_gallery_of_a_newer_format_is_not_used_and_the_reason_says_so(evaluated_project, tmp_path):
    checkpoint = tmp_path / "outputs" / "best.pth"
    shutil.copytree(evaluated_project / "outputs", checkpoint.parent)
    gallery = torch_load(checkpoint.parent / "gallery.pt")
    gallery["format"] = checkpoints.FORMAT + 1
    torch.save(gallery, checkpoint.parent / "gallery.pt")
    width = gallery["features"].shape[1]
    assert checkpoints.load_gallery(checkpoint, width) == (
        None, f"written by a newer version of this repository (format {checkpoints.FORMAT + 1}); update the "
              f"repository")


def test_a_best_pth_without_a_format_still_loads_its_score_named_classify(reference_run, tmp_path):
    state = torch_load(reference_run.outputs / "best.pth")
    del state["format"]
    state["config"]["classify"] = state["config"].pop("score")
    path = tmp_path / "best.pth"
    torch.save(state, path)
    _, config, _ = checkpoints.load_checkpoint(path)
    _, saved, _ = checkpoints.load_checkpoint(reference_run.outputs / "best.pth")
    assert config == saved


def load_round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_rng_state_round_trip_continues_the_same_streams():
    torch.manual_seed(3)
    torch.rand(7)
    state = checkpoints.rng_state()
    expected = (torch.rand(5), torch.randn(3))
    checkpoints.set_rng_state(load_round_trip(state))
    got = (torch.rand(5), torch.randn(3))
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


# ---------------------------------------------------------------------------------------------
# Checkpoints are data, not code


class RunsCode:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture
def evil(tmp_path):
    """(a checkpoint-shaped file carrying pickled code, the marker its code would create)."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": RunsCode(marker), "config": {"loss": "bce"}}, path)
    return path, marker


def test_the_malicious_file_really_runs_code_when_unpickled_unsafely(evil):
    path, marker = evil
    torch.load(path, weights_only=False)  # the control: what an unsafe load would do
    assert marker.exists()


def test_every_torch_load_in_the_repo_is_weights_only():
    calls = []
    for script in sorted(ROOT.glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "torch.serialization.load"):
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls.append((f"{script.name}:{node.lineno}", keywords.get("weights_only")))
    assert calls, "no torch.load found"
    assert [c for c in calls if c[1] != "True"] == []


def test_load_checkpoint_refuses_pickled_code_without_running_it(evil):
    path, marker = evil
    with pytest.raises(WeightsError, match="refused") as error:
        checkpoints.load_checkpoint(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_raw_pickle_with_code_is_refused_too(tmp_path):
    marker, path = tmp_path / "code_ran", tmp_path / "raw.pth"
    path.write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    with pytest.raises(WeightsError):
        checkpoints.load_checkpoint(path)
    assert not marker.exists()


def test_predict_cli_refuses_pickled_code_in_one_line(evil, image):
    checkpoint, marker = evil
    result = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(checkpoint), "--image", str(image),
                             "--device", "cpu"], cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode != 0
    assert_one_line(result.stderr.strip(), "predict.py: error:")
    assert "refused" in result.stderr and str(checkpoint) in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("where", ["--resume", "--weights"])
def test_train_refuses_pickled_code_in_resume_and_weights(where, evil, broken_data_dir, tmp_path, no_test_eval):
    path, marker = evil
    project = tmp_path / "project"
    if where == "--resume":
        (project / "outputs").mkdir(parents=True)
        shutil.copy(path, project / "outputs" / "last.pth")
        argv = train_argv(project, broken_data_dir, 2, "--resume")
    else:
        argv = train_argv(project, broken_data_dir, 2, "--weights", path)
    status, message = call_main(train.main, argv)
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert "refused" in message and where in message
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Files that are not a checkpoint of this network: one line naming the file


def _squeezenet_state():
    from torchvision.models import squeezenet1_1
    return squeezenet1_1(weights=None).state_dict()


def _checkpoint_case(case, best, path):
    checkpoint = torch_load(best)
    if case == "truncated":
        data = best.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4000))
    elif case == "other_torchvision_state_dict":
        torch.save(_squeezenet_state(), path)
    elif case == "other_weights_our_config":
        torch.save({"model": _squeezenet_state(), "config": checkpoint["config"]}, path)
    elif case == "our_weights_loss_changed":
        checkpoint["config"]["loss"] = "contrastive"
        torch.save(checkpoint, path)
    elif case == "foreign_config":
        torch.save({"model": _squeezenet_state(), "config": {"arch": "squeezenet1_1", "num_classes": 2}}, path)


CHECKPOINT_CASES = [
    "truncated", "other_torchvision_state_dict", "other_weights_our_config", "our_weights_loss_changed",
    "foreign_config",
    "random_bytes",
]


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_unusable_checkpoint_raises_weights_error_naming_it(case, reference_run, tmp_path):
    path = tmp_path / f"{case}.pth"
    _checkpoint_case(case, reference_run.outputs / "best.pth", path)
    with pytest.raises(WeightsError) as error:
        checkpoints.load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    if case in ("truncated", "random_bytes"):
        assert "truncated or corrupt" in message
        assert "refused" not in message


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_predict_with_an_unusable_checkpoint_exits_with_one_line(case, reference_run, tmp_path, image):
    path = tmp_path / f"{case}.pth"
    _checkpoint_case(case, reference_run.outputs / "best.pth", path)
    try:
        status, message = call_main(predict.main, ["--checkpoint", path, "--image", image, "--device", "cpu"])
    except Exception as error:  # a traceback from deep inside torch is the failure this test looks for
        pytest.fail(f"{type(error).__name__}: {error}")
    assert status != 0
    assert_one_line(message, "predict.py: error:")
    assert str(path) in message
    if case in ("truncated", "random_bytes"):
        assert "truncated or corrupt" in message


def test_train_weights_of_another_architecture_is_one_line(broken_data_dir, tmp_path, no_test_eval):
    path = tmp_path / "squeezenet.pth"
    torch.save(_squeezenet_state(), path)
    status, message = call_main(train.main, train_argv(tmp_path / "project", broken_data_dir, 2, "--weights", path))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert f"--weights {path}" in message and "resnet18" in message


@pytest.mark.parametrize("content", ["foreign", "nan"])
def test_weights_that_are_foreign_or_not_finite_are_one_line_before_training(content, broken_data_dir, tmp_path,
                                                                              no_test_eval):
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    if content == "nan":
        state["fc.bias"][0] = float("nan")
    else:  # another repository's checkpoint: a model name beside the tensors
        state = {"model": "resnet18", "state_dict": state}
    torch.save(state, tmp_path / "w.pth")
    status, message = call_main(train.main, train_argv(tmp_path / "p", broken_data_dir, 1,
                                                       "--weights", tmp_path / "w.pth"))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert f"--weights {tmp_path / 'w.pth'}" in message
    assert ("not finite" if content == "nan" else "not a resnet18 state_dict") in message
    assert not (tmp_path / "p" / "outputs" / "last.pth").exists()


def copy_outputs(evaluated_project, tmp_path, *names):
    """best.pth and the named files of the evaluated project, with their times (as copy2 keeps them)."""
    outputs = tmp_path / "copy" / "outputs"
    outputs.mkdir(parents=True)
    for name in ("best.pth", *names):
        shutil.copy2(evaluated_project / "outputs" / name, outputs / name)
    return outputs


def test_checkpoint_with_non_finite_weights_is_refused_before_anything_moves(evaluated_project, broken_data_dir,
                                                                             tmp_path, image):
    outputs = copy_outputs(evaluated_project, tmp_path)
    checkpoint = torch_load(outputs / "best.pth")
    checkpoint["model"]["head.0.weight"][0, 0] = float("nan")
    torch.save(checkpoint, outputs / "best.pth")
    results = outputs.parent / "results"
    results.mkdir()
    (results / "earlier.json").write_text("{}")
    for argv in (evaluate_argv(outputs.parent, broken_data_dir),
                 ["--checkpoint", outputs / "best.pth", "--image", image, "--device", "cpu"]):
        status, message = call_main(predict.main, argv)
        assert status != 0
        assert_one_line(message, f"predict.py: error: checkpoint {outputs / 'best.pth'}:")
        assert "not finite" in message
    assert [p.name for p in results.iterdir()] == ["earlier.json"]
    assert sorted(p.name for p in outputs.parent.iterdir()) == ["outputs", "results"]


def _delete(key):
    return lambda config: config.pop(key)


def _set(key, value):
    return lambda config: config.update({key: value})


@pytest.mark.parametrize("name, edit, what", [
    ("best.pth", _delete("image_size"), "has no 'image_size'"),
    ("best.pth", _set("image_size", "32px"), "image_size = '32px'"),
    ("best.pth", _delete("benign_limit"), "has no 'benign_limit'"),
    ("last.pth", _delete("benign_limit"), "has no 'benign_limit'"),
    ("last.pth", _set("lr", "fast"), "lr = 'fast'"),
    ("last.pth", _set("loss", "triplet"), "do not fit"),
])
def test_hand_edited_config_is_one_line_naming_the_checkpoint(resumable, broken_data_dir, image, name, edit, what,
                                                              no_test_eval):
    path = resumable / "outputs" / name
    checkpoint = torch_load(path)
    edit(checkpoint["config"])
    torch.save(checkpoint, path)
    if name == "best.pth":
        script, argv = predict, ["--checkpoint", path, "--image", image, "--device", "cpu"]
    else:
        script, argv = train, train_argv(resumable, broken_data_dir, 3, "--resume")
    try:
        status, message = call_main(script.main, argv)
    except Exception as error:  # a KeyError or TypeError from deep inside is the failure looked for
        pytest.fail(f"{type(error).__name__}: {error}")
    assert status != 0
    assert_one_line(message, f"{script.__name__}.py: error:")
    assert str(path) in message and what in message


# ---------------------------------------------------------------------------------------------
# gallery.pt: validated as a checkpoint is


@pytest.mark.parametrize("content", ["pickled_code", "truncated"])
def test_predict_with_a_bad_gallery_file_is_one_line_and_runs_no_code(content, reference_run, tmp_path, image):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    shutil.copy(reference_run.outputs / "best.pth", outputs / "best.pth")
    marker = tmp_path / "code_ran"
    if content == "pickled_code":
        torch.save({"features": RunsCode(marker), "checkpoint_stamp": "x"}, outputs / "gallery.pt")
    else:
        (outputs / "gallery.pt").write_bytes(b"PK\x03\x04 half a gallery")
    try:
        status, message = call_main(predict.main, ["--checkpoint", outputs / "best.pth", "--image", image,
                                                   "--device", "cpu"])
    except Exception as error:
        pytest.fail(f"{type(error).__name__}: {error}")
    finally:
        assert not marker.exists()
    assert status != 0
    assert_one_line(message, "predict.py: error:")
    assert "gallery.pt" in message


@pytest.mark.parametrize("damage, what", [
    (lambda gallery: gallery["features"].fill_(float("nan")), "not finite"),
    (lambda gallery: gallery.update(features=gallery["features"][:, :10]), "10 wide"),
    (lambda gallery: gallery.update(threshold="0.5"), "threshold '0.5' is not a number"),
])
def test_damaged_gallery_is_one_line_naming_it_and_rebuilt_with_data(evaluated_project, broken_data_dir, tmp_path,
                                                                     image, capsys, damage, what):
    outputs = copy_outputs(evaluated_project, tmp_path, "gallery.pt")
    gallery = torch_load(outputs / "gallery.pt")
    damage(gallery)
    torch.save(gallery, outputs / "gallery.pt")
    argv = ["--checkpoint", outputs / "best.pth", "--image", image, "--device", "cpu"]
    try:
        status, message = call_main(predict.main, argv)
    except Exception as error:
        pytest.fail(f"{type(error).__name__}: {error}")
    assert status != 0
    assert_one_line(message, f"predict.py: error: {outputs / 'gallery.pt'}: ")
    assert what in message and "--data" in message
    assert call_main(predict.main, [*argv, "--data", broken_data_dir]) == (0, "")
    printed = capsys.readouterr().out
    assert "rebuilding" in printed and re.search(r"P\(malignant\) <?0\.", printed)  # '<': a flat map, tiny model


def test_gallery_still_fits_a_project_copied_with_new_file_times(evaluated_project, tmp_path, image, capsys):
    outputs = Path(shutil.copytree(evaluated_project / "outputs", tmp_path / "copy" / "outputs",
                                   copy_function=shutil.copy))  # as cp -r: new modification times
    later = time.time() + 60
    os.utime(outputs / "best.pth", (later, later))
    argv = ["--checkpoint", outputs / "best.pth", "--image", image, "--device", "cpu"]
    assert call_main(predict.main, argv) == (0, "")
    assert "P(malignant)" in capsys.readouterr().out
    gallery = torch_load(outputs / "gallery.pt")  # a stamp of size and modification time is not trusted
    gallery["checkpoint_stamp"] = f"{(outputs / 'best.pth').stat().st_size}-{(outputs / 'best.pth').stat().st_mtime_ns}"
    torch.save(gallery, outputs / "gallery.pt")
    status, message = call_main(predict.main, argv)
    assert status != 0 and "made for another checkpoint" in message and "--data" in message


@pytest.mark.parametrize("loss", ["bce", "triplet", "ce"])
def test_load_checkpoint_round_trip_gives_the_same_outputs(tmp_path, images, loss):
    torch.manual_seed(6)
    model = build_model(tiny_config(loss, seed=3))
    with torch.no_grad():  # move BatchNorm running statistics off their defaults
        features = model.train().embed(images)
        if loss == "bce":
            model.pair_logits(features, features.roll(1, 0))
    model.eval()
    save_versioned({"model": model.state_dict(), "config": tiny_config(loss, seed=3).as_dict(), "epoch": 4},
                   tmp_path / "best.pth")
    loaded, config, checkpoint = load_checkpoint(tmp_path / "best.pth")
    assert type(loaded) is type(model) and not loaded.training
    assert config == tiny_config(loss, seed=3) and checkpoint["epoch"] == 4
    with torch.no_grad():
        expected, actual = model.embed(images), loaded.embed(images)
        assert torch.equal(actual, expected)
        assert torch.equal(loaded.pair_similarity(actual, actual.roll(1, 0)),
                           model.pair_similarity(expected, expected.roll(1, 0)))


def test_load_checkpoint_of_a_plain_state_dict_raises_weights_error(tmp_path, siamese):
    torch.save(siamese.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match="not a checkpoint of this repo"):
        load_checkpoint(tmp_path / "plain.pth")


def test_load_checkpoint_whose_weights_do_not_fit_its_config_raises_weights_error(tmp_path, siamese):
    save_atomic({"model": siamese.state_dict(), "config": tiny_config("ce").as_dict()}, tmp_path / "mixed.pth")
    with pytest.raises(WeightsError, match="do not fit"):
        load_checkpoint(tmp_path / "mixed.pth")


def test_a_config_saved_before_the_levers_existed_loads_with_the_studys_values(tmp_path):
    old = {key: value for key, value in tiny_config("bce").as_dict().items()
           if key not in ("recipe", "optimizer", "schedule", "warmup_epochs", "augment", "aux_weight", "sampler", "tta")}
    config = checked_config(old, tmp_path / "old.pth")
    assert (config.recipe, config.optimizer, config.schedule, config.aux_weight, config.tta) == (
        "study", "adam", "constant", 0.0, False)
    assert checked_config(config.as_dict(), tmp_path / "x.pth") == config  # a plain dict round trip
    with pytest.raises(WeightsError, match="has lr = -1"):
        checked_config({**old, "lr": -1}, tmp_path / "bad.pth")


def test_a_checkpoint_saved_before_backbones_existed_loads_as_resnet18_on_its_imagenet_output(tmp_path):
    model = build_model(tiny_config("bce"))
    old = {key: value for key, value in tiny_config("bce").as_dict().items()
           if key not in ("backbone", "features", "backbone_lr_scale")}
    save_atomic({"model": model.state_dict(), "config": old}, tmp_path / "old.pth")
    loaded, config, _ = load_checkpoint(tmp_path / "old.pth")
    assert (config.backbone, config.features, config.backbone_lr_scale) == ("resnet18", "imagenet", 1.0)
    assert type(loaded.backbone).__name__ == "ResNet"
