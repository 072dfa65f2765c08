"""The command lines as a user meets them: abbreviations refused, one-line errors (and
cli.one_line_errors, through which every command ends on an error or a signal), a closing
summary on every evaluating run, nothing left behind by a failed weight download, --pair, and the
prediction figure with its Grad-CAM heat map (the figures' labels: test_plots.py)."""
import contextlib
import io
import re
import runpy
import signal
import subprocess
import sys
import urllib.error
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision.models._api

import bench
import cli
import compare
import frozen
import predict
from calibration import calibrated
import to_subdirectories
import train
from checkpoints import load_checkpoint, load_state
from helpers import SIGNALS, TINY, call_main, train_argv
from modules import SiameseNetwork

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def exit_of(function, *args):
    """(exit code, stderr) of a main() that ends in SystemExit."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as stopped, contextlib.redirect_stderr(stderr):
        function(*args)
    code = stopped.value.code
    return (code, stderr.getvalue()) if isinstance(code, int) else (1, f"{code}\n")  # sys.exit("message")


@pytest.fixture
def trained(trained_project):
    """The session's tiny project trained by train.py (conftest.trained_project), and what it printed."""
    return trained_project


# ---------------------------------------------------------------------------------------------
# Flags: no abbreviations, one line per mistake


def run_synthetic_main(argv):
    sys.argv = ["synthetic.py", *argv]
    runpy.run_path(str(REPO / "synthetic.py"), run_name="__main__")


def run_compare_main(argv):
    sys.argv = ["compare.py", *argv]
    compare.main()


@pytest.mark.parametrize("script, main, argv, flag", [
    ("train.py", train.main, ["--project", "{tmp}/p", "--data", "{tmp}", "--epoch", "1"], "--epoch"),
    ("predict.py", predict.main, ["--proj", "{tmp}/p", "--data", "{tmp}"], "--proj"),
    ("to_subdirectories.py", to_subdirectories.main, ["--cs", "{tmp}/x.csv"], "--cs"),
    ("bench.py", bench.main, ["--quic"], "--quic"),
    ("synthetic.py", run_synthetic_main, ["--ou", "{tmp}/demo"], "--out"),
    ("compare.py", run_compare_main, ["--proj", "{tmp}/p", "--data", "{tmp}"], "--project"),
])
def test_abbreviated_flag_is_refused_in_one_line(script, main, argv, flag, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv[:])  # the synthetic and compare mains read sys.argv
    code, stderr = exit_of(main, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    lines = stderr.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and lines[0].endswith("; see --help")
    assert flag in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing was started


def test_bad_choice_on_the_real_command_line_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--project", str(tmp_path / "p"), "--data", str(tmp_path),
                             "--loss", "banana"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()  # argparse quotes the choices differently across Pythons
    assert len(lines) == 1 and lines[0].startswith("train.py: error: argument --loss: invalid choice: 'banana'")
    assert lines[0].endswith("; see --help") and not (tmp_path / "p").exists()


@pytest.mark.parametrize("script, argv, message", [
    ("train.py", ["--project", "{tmp}/notes.txt", "--data", "{data}"], "--project {tmp}/notes.txt: is a file, not a folder"),
    ("train.py", ["--project", "{tmp}/notes.txt/run1", "--data", "{data}"],
     "--project {tmp}/notes.txt/run1: {tmp}/notes.txt is a file, not a folder"),
    ("compare.py", ["--project", "{tmp}/notes.txt", "--data", "{data}"], "--project {tmp}/notes.txt: is a file"),
    ("frozen.py", ["--data", "{data}", "--out", "{tmp}/missing/rows.json"],
     "--out {tmp}/missing/rows.json: its folder {tmp}/missing does not exist"),
    ("frozen.py", ["--data", "{data}", "--out", "{tmp}"], "--out {tmp}: is a folder; name a file"),
    ("predict.py", ["--checkpoint", "{tmp}/c.pth", "--image", "{tmp}/notes.txt", "--out", "{tmp}/notes.txt"],
     "--out {tmp}/notes.txt: is a file, not a folder"),
    ("predict.py", ["--project", "{tmp}/p", "--data", "{data}", "--out", "{tmp}/notes.txt/x"],
     "--out {tmp}/notes.txt/x: {tmp}/notes.txt is a file, not a folder"),
])
def test_an_output_path_that_cannot_be_a_folder_or_file_is_refused_before_any_work(script, argv, message, tmp_path,
                                                                                   tiny_data_dir, monkeypatch):
    (tmp_path / "notes.txt").write_text("a user's notes")
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    mains = {"train.py": train.main, "compare.py": run_compare_main, "frozen.py": frozen.main, "predict.py": predict.main}
    before = sorted(tmp_path.rglob("*"))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code, stderr = exit_of(mains[script], [a.format(tmp=tmp_path, data=tiny_data_dir) for a in argv])
    lines = stderr.strip().splitlines()
    assert code != 0 and len(lines) == 1 and printed.getvalue() == ""  # no work was done before the line
    assert lines[0].startswith(f"{script}: error: {message.format(tmp=tmp_path)}"), lines[0]
    assert "disk space" not in lines[0]
    assert sorted(tmp_path.rglob("*")) == before and (tmp_path / "notes.txt").read_text() == "a user's notes"


def test_image_and_pair_together_are_refused(tmp_path):
    code, stderr = exit_of(predict.main, ["--checkpoint", "c.pth", "--image", "a.jpg", "--pair", "a.jpg", "b.jpg"])
    assert code == 2
    assert stderr.strip().splitlines() == [
        "predict.py: error: argument --pair: not allowed with argument --image; see --help"]


def test_missing_data_flag_is_a_one_line_usage_error(tmp_path, capsys):
    argv = train_argv(tmp_path / "project", "unused")
    del argv[2:4]  # drop --data DATA
    status, _ = call_main(train.main, argv)
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().splitlines() == ["train.py: error: the following arguments are required: --data; see --help"]
    assert not (tmp_path / "project").exists()


# ---------------------------------------------------------------------------------------------
# cli.one_line_errors: a command's error or signal as one line and an exit code


def test_a_value_error_exits_1_in_one_line_naming_the_program():
    with pytest.raises(SystemExit) as stopped, cli.one_line_errors("x.py"):
        raise ValueError("--lr nan: must be a finite number > 0")
    assert stopped.value.code == "x.py: error: --lr nan: must be a finite number > 0"  # sys.exit(str): status 1


@pytest.mark.parametrize("advice", ["free disk space", lambda: "free disk space, then rerun with --resume"],
                         ids=["text", "function"])
def test_a_failed_write_names_the_file_and_the_advice(advice, tmp_path):
    with pytest.raises(SystemExit) as stopped, cli.one_line_errors("x.py", advice):
        raise OSError(28, "No space left on device", str(tmp_path / "last.pth"))
    expected = advice() if callable(advice) else advice
    assert stopped.value.code == (f"x.py: error: could not write {tmp_path / 'last.pth'} (No space left on device); "
                                  f"{expected}")


@pytest.mark.parametrize("note", [None, "earlier results moved back to R"], ids=["default", "note"])
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_a_signal_exits_128_plus_its_number_in_one_line(signum, note, capsys):
    before = signal.getsignal(signum)
    with pytest.raises(SystemExit) as stopped, cli.one_line_errors("x.py"):
        try:
            signal.raise_signal(signum)
        except cli.Interrupted as interrupted:  # what a command that puts something back does
            if note:
                interrupted.note = note
            raise
        raise AssertionError("the signal was not raised as Interrupted")
    assert stopped.value.code == 128 + signum
    assert capsys.readouterr().err == f"x.py: stopped by {signum.name}; {note or 'nothing was written'}\n"
    assert signal.getsignal(signum) == before


def test_train_stop_handler_notes_the_first_signal_and_stops_at_the_second(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    stop = {"signal": None}
    handler = cli.stop_after_step(stop)
    handler(signal.SIGTERM, None)
    assert stop["signal"] == signal.SIGTERM
    assert "SIGTERM: finishing this step and saving last.pth" in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGINT, None)


# ---------------------------------------------------------------------------------------------
# A failed --weights imagenet download


def fail_download(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


@pytest.mark.parametrize("existing", [None, "runs", "runs/exp"])
def test_failed_weight_download_leaves_nothing_and_names_the_fix(existing, tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fail_download)
    if existing:
        (tmp_path / existing).mkdir(parents=True)
    before = sorted(tmp_path.rglob("*"))
    argv = ["--project", str(tmp_path / "runs" / "exp"), "--data", str(tiny_data_dir), *TINY]
    argv[argv.index("--weights") + 1] = "imagenet"
    with contextlib.redirect_stdout(io.StringIO()):
        code, message = exit_of(train.main, argv)
    assert code != 0
    lines = message.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: --weights imagenet: could not fetch")
    assert "--weights none" in lines[0] and ".pth" in lines[0]
    assert sorted(tmp_path.rglob("*")) == before  # no project folder, no outputs/, no file


# ---------------------------------------------------------------------------------------------
# Runs that report


def test_train_ends_with_a_summary(trained):
    project, stdout = trained
    summary = stdout[stdout.index("\nsummary\n"):]
    assert re.search(r"device\s+cpu", summary)
    assert re.search(r"wall time\s+\d+ min \d+ s", summary)
    best_epoch = load_state(project / "outputs" / "best.pth")["epoch"]
    assert re.search(rf"best epoch\s+{best_epoch} of 2 \(val_auc \d\.\d{{4}}\)", summary)
    assert re.search(r"test AUC\s+\d\.\d{3} \(95% CI \d\.\d{3}-\d\.\d{3}\), 6 benign / 4 malignant", summary)
    assert re.search(r"at threshold \d\.\d{3}\s+sensitivity \d\.\d{3}, specificity \d\.\d{3}", summary)
    assert f"{project / 'results'}/metrics.json" in summary
    figures = re.search(r"figures\s+(.*)", summary).group(1)
    for name in ("roc_curve.png", "pr_curve.png", "pair_grid.png", "confident_mistakes.png", "embeddings.png"):
        assert name in figures and (project / "results" / name).stat().st_size > 0
    assert "2 prediction_results_<i>.png" in figures  # pairs 0 and 5 of 10


def test_predict_evaluation_ends_with_a_summary(trained, tiny_data_dir, tmp_path, capsys, quick_bootstrap):
    project, _ = trained
    predict.main(["--project", str(project), "--data", str(tiny_data_dir), "--out", str(tmp_path / "results"),
                  "--gallery-size", "4", "--save-every", "5"])
    stdout = capsys.readouterr().out
    summary = stdout[stdout.index("\nsummary\n"):]
    epoch = load_state(project / "outputs" / "best.pth")["epoch"]
    assert f"{project / 'outputs' / 'best.pth'} (epoch {epoch})" in summary
    assert re.search(r"test AUC\s+\d\.\d{3} \(95% CI", summary) and "sensitivity" in summary
    assert f"{tmp_path / 'results'}/metrics.json" in summary


def test_progress_in_a_log_file_is_plain_lines():
    log = io.StringIO()
    for _ in cli.tqdm(range(5), desc="embedding test", file=cli._LineWriter(log), mininterval=0, miniters=1):
        pass
    text = log.getvalue()
    assert "\r" not in text
    assert len(text.splitlines()) >= 5 and all(line.startswith("embedding test: ") for line in text.splitlines())


def test_progress_of_a_short_loop_prints_nothing_to_a_log(capsys):
    assert list(cli.progress(range(3), "embedding test")) == [0, 1, 2]  # stderr is captured: not a terminal
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# Single images and pairs


def test_image_prints_the_verdict_and_writes_a_figure_with_grad_cam(trained, tiny_data_dir, capsys, monkeypatch):
    project, _ = trained
    image = sorted((tiny_data_dir / "test_data" / "1").glob("*.jpg"))[0]
    maps = []
    real_grad_cam = predict.grad_cam
    monkeypatch.setattr(predict, "grad_cam", lambda *a: maps.append(real_grad_cam(*a)) or maps[-1])
    predict.main(["--checkpoint", str(project / "outputs" / "best.pth"), "--image", str(image)])
    lines = capsys.readouterr().out.strip().splitlines()
    gallery = load_state(project / "outputs" / "gallery.pt")
    printed = re.match(r"P\(malignant\) (<?\d\.\d{2,6})  (benign|malignant)  \(malignant from (\d\.\d{2,6}); "
                       r"calibrated where (\d+)% are melanomas\)", lines[0])
    p, verdict, threshold, prevalence = printed.groups()
    below = p.startswith("<") or float(p) < float(threshold)  # '<': printed as the threshold, and under it
    assert verdict == ("benign" if below else "malignant")  # as printed, so as read
    p = p.lstrip("<")
    assert len(p) == len(threshold) and float(threshold) == pytest.approx(
        calibrated(gallery["calibration"], [gallery["threshold"]])[0], abs=0.51 * 10 ** (2 - len(threshold)))
    assert int(prevalence) == round(100 * gallery["calibration"]["prevalence"])
    figure = project / "predictions" / f"{image.stem}_prediction.png"
    assert lines[2] == f"  figure: {figure}"
    assert figure.stat().st_size > 10_000 and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(maps) == 1 and maps[0].shape == (32, 32) and np.isfinite(maps[0]).all()
    model, config, gallery, device = predict.load_predictor(project / "outputs" / "best.pth")
    nearest = predict.predict_files(model, config, gallery, [image], device, project / "outputs" / "best.pth")[0].nearest
    shown = sum(label for _, label, _ in nearest)
    assert lines[1] == f"  {shown} of the 5 nearest gallery images {'is a melanoma' if shown == 1 else 'are melanomas'}"
    assert image.parent.joinpath(figure.name).exists() is False  # never written into the user's image folder


def test_gallery_stores_its_image_paths_as_plain_strings(trained, tiny_data_dir):
    project, _ = trained
    gallery = load_state(project / "outputs" / "gallery.pt")  # weights_only=True
    assert len(gallery["paths"]) == len(gallery["labels"]) == 8
    for path, label in zip(gallery["paths"], gallery["labels"].tolist()):
        assert isinstance(path, str) and Path(path).is_file()
        assert Path(path).parent == (tiny_data_dir / "train_data" / str(label)).resolve()


def test_pair_prints_the_models_similarity(trained, tiny_data_dir, capsys):
    project, _ = trained
    first, second = sorted((tiny_data_dir / "test_data" / "0").glob("*.jpg"))[:2]
    predict.main(["--checkpoint", str(project / "outputs" / "best.pth"), "--pair", str(first), str(second)])
    line = capsys.readouterr().out.strip()
    match = re.fullmatch(r"similarity (\d\.\d{4}) -> (same class|different classes)  (\S+)  (\S+)", line)
    assert match and match.group(3, 4) == (str(first), str(second))
    model, config, _ = load_checkpoint(project / "outputs" / "best.pth")
    with torch.no_grad():
        batch = torch.stack([predict.eval_transform(32)(predict.read_rgb(p)) for p in (first, second)])
        features = model.embed(batch)
        expected = model.pair_similarity(features[:1], features[1:]).item()
    assert float(match.group(1)) == pytest.approx(expected, abs=1e-4)
    assert match.group(2) == ("same class" if expected > 0.5 else "different classes")


def test_grad_cam_explains_the_siamese_score_against_the_malignant_mean():
    """The library's map equals Grad-CAM computed by hand for the head's similarity logit to the
    mean malignant gallery embedding: ReLU(sum_c mean(dS/dA_c) A_c) on layer4, min-max scaled, resized."""
    torch.manual_seed(0)
    model = SiameseNetwork("none").eval()
    image, malignant_mean = torch.randn(3, 96, 96), torch.randn(1000)
    heat = predict.grad_cam(model, image, malignant_mean)

    kept = {}
    hook = model.backbone.layer4[-1].register_forward_hook(lambda m, i, out: kept.update(a=out))
    score = model.pair_logits(model.embed(image[None]), malignant_mean[None])
    hook.remove()
    grads, = torch.autograd.grad(score.sum(), kept["a"])
    cam = torch.relu((grads.mean((2, 3), keepdim=True) * kept["a"]).sum(1))[0].detach().numpy()
    cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
    expected = cv2.resize(cam, (96, 96))
    expected = (expected - expected.min()) / (1e-7 + (expected - expected.min()).max())
    assert heat.shape == (96, 96)
    assert np.allclose(heat, expected, atol=1e-4)
    other = predict.grad_cam(model, image, -malignant_mean)  # another target: another explanation
    assert not np.allclose(heat, other, atol=1e-3)
