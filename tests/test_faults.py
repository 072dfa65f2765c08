"""Fault tests: robust on bad input, nothing lost on interruption, safe checkpoints.

Every case a user can cause ends in one clear message that names the file or flag, says what is
wrong and what to do, exits non-zero when the run cannot go on, and loses no work (sections
numbered as in the issue):

1. data       broken, odd and huge image files; missing or one-class splits
3. state      last.pth every epoch, --resume equals an uninterrupted run, SIGINT/SIGTERM, a
              non-finite loss, a project that already holds outputs, a failed (disk-full) write
4. checkpoints are data, not code: pickled code is refused unrun; other architectures and
              truncated files give WeightsError / one line from predict.py
5. flags      bad flags fail in one line before any work
issue 10      one run per project (a lock), last.pth before history.csv, edited configs, damaged
              galleries and NaN weights in one line, --resume applies or refuses each flag,
              evaluation into --out never writes to the project

Training runs in-process through train.main (fast) with the test-split evaluation stubbed out
where it is not the subject; subprocesses only for signals and the real command line.
"""
import ast
import builtins
import contextlib
import csv
import functools
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402
import images  # noqa: E402
import metrics  # noqa: E402
import modules  # noqa: E402
import predict  # noqa: E402
import scoring  # noqa: E402
import train  # noqa: E402
from helpers import SUBPROCESS_ENV  # noqa: E402
from images import DataError  # noqa: E402
from modules import WeightsError  # noqa: E402
from synthetic import make_synthetic  # noqa: E402

COUNTS = {"train": (8, 6), "validation": (6, 4), "test": (6, 4)}
SIGNALS = (signal.SIGINT, signal.SIGTERM)
CPU_CONTEXT = train.RunContext(rank=0, world_size=1, device=torch.device("cpu"), outputs=Path("outputs"), workers=0)
# The broken files of the module's data set (data_dir); each must be excluded at start-up.
EXCLUDED = {"zero_bytes.jpg", "truncated.jpg", "not_a_jpeg.jpg", "notes.txt", "huge.jpg", "zero_val.jpg"}


def tiny(project, data, epochs=2, *extra):
    """The tiny CPU settings of every training run here; later flags override earlier ones."""
    return ["--project", str(project), "--data", str(data), "--weights", "none", "--image-size", "32",
            "--epochs", str(epochs), "--batch-size", "8", "--val-batch-size", "8", "--lr", "1e-3",
            "--workers", "0", "--gallery-size", "4", "--save-every", "5", *map(str, extra)]


def call_main(main, argv):
    """A script's main(argv) in-process: (exit status, message of sys.exit(str) or ''). The signal
    handlers are put back afterwards, so a run cannot leave pytest deaf to Ctrl-C."""
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        main([str(a) for a in argv])
        return 0, ""
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0, ""
        return 1, str(code)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def _no_test_evaluation(*args, **kwargs):
    return {}


@pytest.fixture
def no_test_eval(monkeypatch):
    """The final test-split evaluation (bootstrap AUC, figures) is not what these tests check."""
    monkeypatch.setattr(train, "evaluate", _no_test_evaluation)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def history_without_seconds(outputs):
    with open(Path(outputs) / "history.csv", newline="") as file:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(file)]


def assert_same_weights(path_a, path_b):
    a, b = load(path_a)["model"], load(path_b)["model"]
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ between {path_a} and {path_b}, e.g. {different[:3]}"


def assert_finite_weights(path):
    state = load(path)["model"]
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"{path} holds non-finite tensors: {bad[:3]}"


def assert_one_line(message, prefix):
    assert message.startswith(prefix), message
    assert "\n" not in message.strip(), f"not one line:\n{message}"
    assert "Traceback" not in message


def jpeg_bytes(mode="RGB", size=(40, 36), seed=0, fmt="JPEG"):
    rgb = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def corrupt_jpeg():
    """Valid JPEG markers, a start of frame and an end-of-image marker, but a damaged Huffman
    table (bit rot, a bad sector): the header alone looks fine, decoding fails."""
    data = bytearray(jpeg_bytes())
    table = data.find(b"\xff\xc4")
    data[table + 5:table + 21] = b"\xff" * 16
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# Module data: the synthetic set plus every kind of odd and broken file in the split folders


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while this module runs (subprocesses get OMP_NUM_THREADS=1): on a busy
    2-core machine two spinning OpenMP threads make a tiny step 3-10 times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(one_thread, tmp_path_factory):
    """Read-only. Train holds grayscale, CMYK, RGBA-PNG and palette-PNG files under .jpg names
    (they must train), and broken files (zero bytes, truncated, random bytes, text, a 70-megapixel
    image, a .DS_Store); validation holds one zero-byte file."""
    out = tmp_path_factory.mktemp("data")
    make_synthetic(out, size=40, seed=0, counts=COUNTS)
    benign, malignant = out / "train_data" / "0", out / "train_data" / "1"
    for path, mode, fmt in ((benign / "SYN_train_0_0000.jpg", "L", "JPEG"),
                            (malignant / "SYN_train_1_0000.jpg", "CMYK", "JPEG"),
                            (benign / "SYN_train_0_0001.jpg", "RGBA", "PNG"),
                            (malignant / "SYN_train_1_0001.jpg", "P", "PNG")):
        with Image.open(path) as image:
            image.convert(mode).save(path, format=fmt)
    good = (benign / "SYN_train_0_0002.jpg").read_bytes()
    (benign / "zero_bytes.jpg").write_bytes(b"")
    (benign / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (malignant / "not_a_jpeg.jpg").write_bytes(np.random.default_rng(1).bytes(3000))
    (benign / "notes.txt").write_text("exported from the camera\n")
    (malignant / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    Image.new("1", (10_000, 7_000)).save(benign / "huge.jpg", format="PNG")  # 70 Mpx, 9 kB on disk
    (out / "validation_data" / "1" / "zero_val.jpg").write_bytes(b"")
    return out


@pytest.fixture(scope="module")
def run_a(data_dir, tmp_path_factory):
    """The reference: one uninterrupted 2-epoch run (test evaluation stubbed). Records its stdout,
    every save_atomic call, and the signal handlers before and after."""
    project = tmp_path_factory.mktemp("run_a") / "project"
    saves, real_save = [], train.save_atomic

    def spy(obj, path):
        saves.append((Path(path).name, obj.get("epoch"), obj.get("step")))
        return real_save(obj, path)

    before = {s: signal.getsignal(s) for s in SIGNALS}
    stdout = io.StringIO()
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
            mp.setattr(train, "evaluate", _no_test_evaluation)
            mp.setattr(train, "save_atomic", spy)
            train.main(tiny(project, data_dir, 2))
        after = {s: signal.getsignal(s) for s in SIGNALS}
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    return SimpleNamespace(project=project, outputs=project / "outputs", stdout=stdout.getvalue(),
                           saves=saves, handlers_before=before, handlers_after=after)


class Background:
    """A command line started now, read later: its interpreter start-up (importing torch,
    torchvision, sklearn takes seconds) overlaps the in-process training of the other tests."""

    def __init__(self, argv):
        self.process = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=SUBPROCESS_ENV,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self, timeout=180):
        stdout, stderr = self.process.communicate(timeout=timeout)
        return SimpleNamespace(returncode=self.process.returncode, stdout=stdout, stderr=stderr)


@pytest.fixture(scope="module")
def cli(one_thread, tmp_path_factory):
    """The command-line checks of one-line errors, both started at once in the background:
    train.py with --device banana, predict.py with a checkpoint that carries pickled code. Not
    autouse: under pytest -n each worker that runs a test of this module would start them."""
    root = tmp_path_factory.mktemp("cli")
    marker, checkpoint, image = root / "code_ran", root / "evil.pth", root / "x.jpg"
    torch.save({"model": RunsCode(marker), "config": {"loss": "bce"}}, checkpoint)
    image.write_bytes(jpeg_bytes())
    (root / "data").mkdir()  # beside the project, not holding it
    runs = SimpleNamespace(
        root=root, marker=marker, checkpoint=checkpoint, train_project=root / "project",
        train=Background(["train.py", *tiny(root / "project", root / "data", 2, "--device", "banana")]),
        predict=Background(["predict.py", "--checkpoint", checkpoint, "--image", image, "--device", "cpu"]))
    yield runs
    for run in (runs.train, runs.predict):
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


@pytest.fixture
def data_copy(data_dir, tmp_path):
    """A writable copy of the module's data."""
    return Path(shutil.copytree(data_dir, tmp_path / "data"))


# ---------------------------------------------------------------------------------------------
# 1. Data


@pytest.mark.parametrize("name, content, reason", [  # reason: a regular expression of the whole reason
    ("zero_bytes.jpg", lambda: b"", r"empty file"),
    ("truncated.jpg", lambda: jpeg_bytes()[: len(jpeg_bytes()) // 2], r"unreadable \(OSError: .*truncated.*\)"),
    ("truncated_in_header.jpg", lambda: jpeg_bytes()[:400], r"unreadable \(OSError: .*(?i:truncated).*\)"),
    ("random_bytes.jpg", lambda: np.random.default_rng(2).bytes(2000), r"not an image"),
    ("notes.txt", lambda: b"not an image at all\n", r"not an image"),
    ("header_only.jpg", lambda: b"\xff\xd8\xff\xd9", r"not an image"),
    # the 1/8-scale decode at start-up reads the damaged entropy-coded data: excluded, not a crash mid-epoch
    ("corrupt_huffman_table.jpg", corrupt_jpeg, r"unreadable \(OSError: .+\)"),
])
def test_broken_file_is_excluded_at_start_up_with_a_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content())
    found = images.check_image(path)
    assert found is not None and re.fullmatch(reason, found), found


def test_huge_images_are_excluded_without_decoding_them(tmp_path, monkeypatch):
    big = tmp_path / "big.jpg"
    Image.new("1", (10_000, 7_000)).save(big, format="PNG")  # above images.MAX_PIXELS
    bomb = tmp_path / "bomb.jpg"
    Image.new("1", (15_000, 13_000)).save(bomb, format="PNG")  # above PIL's decompression-bomb limit
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real_load(self))
    from PIL import ImageFile
    real_file_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_file_load(self))
    reasons = dict((p.name, r) for p, r in images.check_images([big, bomb, big], workers=2))
    assert decoded == []  # judged from the header alone
    assert "too large" in reasons["big.jpg"] and "10000x7000" in reasons["big.jpg"]
    assert reasons["bomb.jpg"].startswith("unreadable (DecompressionBombError: ")  # PIL refuses to open it


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads a chmod 000 file anyway")
def test_unreadable_file_is_excluded(tmp_path):
    path = tmp_path / "locked.jpg"
    path.write_bytes(jpeg_bytes())
    path.chmod(0)
    try:
        reason = images.check_image(path)
        assert reason and "unreadable" in reason
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("name, mode, fmt", [
    ("gray.jpg", "L", "JPEG"),
    ("cmyk.jpg", "CMYK", "JPEG"),
    ("rgba_png.jpg", "RGBA", "PNG"),
    ("rgb_png.jpg", "RGB", "PNG"),
    ("palette_png.jpg", "P", "PNG"),
    ("gray_alpha_png.jpg", "LA", "PNG"),
    ("bmp.jpg", "RGB", "BMP"),
    ("webp.jpg", "RGB", "WEBP"),
    pytest.param("gray16.png", "I;16", "PNG"),
])
def test_decodable_variants_pass_the_check_and_read_as_rgb_uint8(tmp_path, name, mode, fmt):
    path = tmp_path / name
    rgb = (np.random.default_rng(0).random((36, 40, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(rgb).convert(mode) if mode != "I;16" else \
        Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))
    image.save(path, format=fmt)
    assert images.check_image(path) is None
    tensor = images.read_rgb(path)
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, 36, 40)
    if fmt in ("PNG", "BMP") and mode in ("RGB", "RGBA"):  # lossless: exactly the RGB pixels
        assert torch.equal(tensor, torch.from_numpy(rgb).permute(2, 0, 1))


def test_load_split_excludes_broken_files_keeps_odd_formats_and_ignores_hidden_files(data_dir):
    split = dataset.load_split(data_dir, "train", workers=2)
    names = {p.name for p in split.paths}
    assert {"SYN_train_0_0000.jpg", "SYN_train_1_0000.jpg", "SYN_train_0_0001.jpg", "SYN_train_1_0001.jpg"} <= names
    assert split.counts() == list(COUNTS["train"])
    assert {p.name for p, _ in split.excluded} == EXCLUDED - {"zero_val.jpg"}
    assert ".DS_Store" not in names
    for index in range(len(split)):
        image = split.read(index)
        assert image.dtype == torch.uint8 and image.shape[0] == 3


def test_training_run_summarises_exclusions_in_one_line_and_lists_them(run_a):
    lines = [line for line in run_a.stdout.splitlines() if "exclude" in line]
    assert len(lines) == 1, run_a.stdout
    listing = run_a.outputs / "excluded_images.txt"
    assert f"{len(EXCLUDED)} " in lines[0] and str(listing) in lines[0]
    rows = listing.read_text().splitlines()
    assert {Path(row.split("\t")[0]).name for row in rows} == EXCLUDED
    assert all(len(row.split("\t")) == 2 and row.split("\t")[1] for row in rows)  # path <TAB> reason


def _empty_class_folder(data):
    for path in (data / "validation_data" / "1").iterdir():
        path.unlink()
    return data / "validation_data" / "1", "no usable malignant"


def _missing_split_folder(data):  # a missing test split is allowed (then validation is reported)
    shutil.rmtree(data / "validation_data")
    return data / "validation_data", "missing"


def _one_class_only(data):  # every malignant training file is broken
    for path in (data / "train_data" / "1").glob("SYN_*"):
        path.write_bytes(b"")
    return data / "train_data" / "1", "no usable malignant"


@pytest.mark.parametrize("damage", [_empty_class_folder, _missing_split_folder, _one_class_only])
def test_split_without_both_classes_stops_before_training(data_copy, tmp_path, damage, no_test_eval):
    folder, what = damage(data_copy)
    split = {"train_data": "train", "validation_data": "validation", "test_data": "test"}[
        folder.relative_to(data_copy).parts[0]]
    with pytest.raises(DataError, match=what) as error:
        dataset.load_split(data_copy, split)
    assert str(folder) in str(error.value)
    status, message = call_main(train.main, tiny(tmp_path / "project", data_copy))
    assert status != 0
    assert message.startswith("train.py: error:") and str(folder) in message
    assert "to_subdirectories.py" in message  # and what to do
    assert not list((tmp_path / "project").rglob("*.pth"))  # stopped before training


def test_class_of_only_broken_files_says_they_were_excluded(data_copy, tmp_path, no_test_eval):
    _one_class_only(data_copy)
    project = tmp_path / "project"
    status, message = call_main(train.main, tiny(project, data_copy))
    assert status != 0
    # the 6 emptied images and not_a_jpeg.jpg; .DS_Store is not an image file and not counted
    assert_one_line(message, f"train.py: error: {data_copy / 'train_data' / '1'}: no usable malignant images "
                             f"(7 excluded as unusable, e.g. SYN_train_1_0000.jpg (empty file)); ")
    assert not list(project.rglob("*.pth"))  # stopped before training


def test_extra_class_folder_stops_training_in_one_line_naming_it(data_copy, tmp_path, no_test_eval):
    extra = data_copy / "train_data" / "2"  # the images in it used to be dropped without a word
    extra.mkdir()
    for path in sorted((data_copy / "train_data" / "1").glob("SYN_*"))[:3]:
        path.rename(extra / path.name)
    project = tmp_path / "project"
    status, message = call_main(train.main, tiny(project, data_copy))
    assert status != 0
    assert_one_line(message, f"train.py: error: {extra}:")
    assert not list(project.rglob("*.pth"))


# ---------------------------------------------------------------------------------------------
# 3. Training state


def test_last_checkpoint_is_written_every_epoch_with_the_whole_state(run_a):
    last_saves = [(epoch, step) for name, epoch, step in run_a.saves if name == "last.pth"]
    assert last_saves == [(1, 0), (2, 0)]
    last = load(run_a.outputs / "last.pth")  # weights_only=True: plain data
    for key in ("model", "optimizer", "scaler", "epoch", "best", "history", "rng", "config"):
        assert key in last, key
    assert last["epoch"] == 2 and len(last["history"]) == 2
    assert last["optimizer"]["state"], "optimizer moments are missing"
    assert set(last["rng"]) == {"torch", "cuda"}
    names = {p.name for p in run_a.outputs.iterdir()}
    assert {"best.pth", "last.pth", "history.csv"} <= names
    assert not [n for n in names if "tmp" in n or n.startswith(".")], names  # no half-written leftovers


def test_save_atomic_leaves_the_previous_file_intact_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    modules.save_atomic({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def half_written_then_disk_full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(modules.torch, "save", half_written_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        modules.save_atomic({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(modules.torch, "save", real_save)
    assert load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_rng_state_round_trip_continues_the_same_streams():
    torch.manual_seed(3)
    torch.rand(7)
    state = train.rng_state()
    expected = (torch.rand(5), torch.randn(3))
    train.set_rng_state(load_round_trip(state))
    got = (torch.rand(5), torch.randn(3))
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def load_round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_run_stopped_after_epoch_1_and_resumed_equals_the_uninterrupted_run(run_a, data_dir, tmp_path,
                                                                           no_test_eval):
    project = tmp_path / "project"
    assert call_main(train.main, tiny(project, data_dir, 1)) == (0, "")
    assert load(project / "outputs" / "last.pth")["epoch"] == 1
    assert call_main(train.main, tiny(project, data_dir, 2, "--resume")) == (0, "")
    assert history_without_seconds(project / "outputs") == history_without_seconds(run_a.outputs)
    for name in ("best.pth", "last.pth"):
        assert_same_weights(project / "outputs" / name, run_a.outputs / name)
    assert load(project / "outputs" / "last.pth")["best"] == load(run_a.outputs / "last.pth")["best"]


class Killed(BaseException):
    """kill -9: nothing of train.py runs after it, no handler sees it."""


def test_a_run_killed_after_epoch_1_resumes_to_the_uninterrupted_run(run_a, data_dir, tmp_path, monkeypatch,
                                                                     no_test_eval):
    """Killed as soon as history.csv lists epoch 1, then --resume; the killed run built the
    cache, the resumed one reads it, and run_a used none: all three train alike."""
    real_write = train.write_history

    def write_then_die(history, path):
        real_write(history, path)
        raise Killed

    project, cache = tmp_path / "project", tmp_path / "cache"
    with monkeypatch.context() as patched:
        patched.setattr(train, "write_history", write_then_die)
        with pytest.raises(Killed):
            call_main(train.main, tiny(project, data_dir, 2, "--cache", cache))
    assert load(project / "outputs" / "last.pth")["epoch"] == 1
    assert call_main(train.main, tiny(project, data_dir, 2, "--resume", "--cache", cache)) == (0, "")
    assert history_without_seconds(project / "outputs") == history_without_seconds(run_a.outputs)
    for name in ("best.pth", "last.pth"):
        assert_same_weights(project / "outputs" / name, run_a.outputs / name)


def test_temporary_files_of_a_killed_run_do_not_survive_into_the_next(run_a, data_dir, tmp_path, no_test_eval):
    project = tmp_path / "project"
    shutil.copytree(run_a.project, project)
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    stale = project / "outputs" / f".last.tmp-{killed.pid}.pth"  # kill -9 during save_atomic
    stale.write_bytes(b"PK\x03\x04 half a checkpoint")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert call_main(train.main, tiny(project, data_dir, 3, "--resume")) == (0, "")
    assert not stale.exists()
    assert f"removed 1 temporary file(s) a killed run left in {project / 'outputs'}: {stale.name}" in stdout.getvalue()


def start_training(project, data, epochs, logs):
    out, err = logs / "stdout.txt", logs / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *tiny(project, data, epochs)],
                                   cwd=ROOT, stdout=stdout, stderr=stderr,
                                   env=SUBPROCESS_ENV)
    return process, out, err


def wait_for_text(process, path, text, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            pytest.fail(f"train.py ended ({process.returncode}) before printing {text!r}:\n"
                        f"{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no {text!r} within {timeout}s")


def test_sigint_finishes_the_step_saves_and_says_how_to_resume(run_a, data_dir, tmp_path, no_test_eval):
    project = tmp_path / "project"
    process, out, err = start_training(project, data_dir, 2, tmp_path)
    try:
        # The split counts print after the handlers are installed (progress bars stay quiet in a log).
        wait_for_text(process, out, f"{'test':<10} ")
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    output = out.read_text() + err.read_text(errors="replace")
    assert status == 130, output[-2000:]
    assert f"--project {project} --data {data_dir} --resume" in output
    assert "Traceback" not in output
    last = load(project / "outputs" / "last.pth")
    assert (last["epoch"], last["step"]) in ((0, 1), (1, 1)), "stopped after a step, mid-run"
    # Resume to the end.
    assert call_main(train.main, tiny(project, data_dir, 2, "--resume")) == (0, "")
    history = history_without_seconds(project / "outputs")
    assert [row["epoch"] for row in history] == ["1", "2"]
    assert history[0] == history_without_seconds(run_a.outputs)[0]
    assert load(project / "outputs" / "last.pth")["epoch"] == 2


@pytest.fixture(scope="module")
def sigterm_run(data_dir, tmp_path_factory):
    """SIGTERM delivered in-process during the first step (the real signal to train.py's own
    handler), then the run resumed to the end."""
    project = tmp_path_factory.mktemp("sigterm") / "project"
    real_loss, calls, stdout = train.training_loss, [], io.StringIO()

    def terminate_during_first_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)
        return real_loss(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(train, "evaluate", _no_test_evaluation)
        mp.setattr(train, "training_loss", terminate_during_first_step)
        stopped = call_main(train.main, tiny(project, data_dir, 2))
        last = load(project / "outputs" / "last.pth")
        mp.setattr(train, "training_loss", real_loss)
        resumed = call_main(train.main, tiny(project, data_dir, 2, "--resume"))
    return SimpleNamespace(outputs=project / "outputs", project=project, stopped=stopped, resumed=resumed,
                           last_when_stopped=last, stdout=stdout.getvalue())


def test_sigterm_finishes_the_step_saves_and_says_how_to_resume(sigterm_run, data_dir):
    assert sigterm_run.stopped[0] != 0
    assert f"--project {sigterm_run.project} --data {data_dir} --resume" in sigterm_run.stdout
    last = sigterm_run.last_when_stopped
    assert (last["epoch"], last["step"]) == (0, 1) and last["partial"] and last["history"] == []
    assert sigterm_run.resumed == (0, "")


def test_run_stopped_mid_epoch_and_resumed_equals_the_uninterrupted_run(sigterm_run, run_a):
    assert history_without_seconds(sigterm_run.outputs) == history_without_seconds(run_a.outputs)
    for name in ("best.pth", "last.pth"):
        assert_same_weights(sigterm_run.outputs / name, run_a.outputs / name)


def test_signal_during_the_last_validation_stops_before_the_test_evaluation(data_dir, tmp_path, monkeypatch,
                                                                            capsys):
    real_validate, evaluated = train.validate, []

    def interrupted(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(train, "validate", interrupted)
    monkeypatch.setattr(train, "evaluate", lambda *args, **kwargs: evaluated.append(1) or {})
    project = tmp_path / "project"
    status, _ = call_main(train.main, tiny(project, data_dir, 1))
    assert status == 130 and not evaluated
    assert "--resume" in capsys.readouterr().out
    assert load(project / "outputs" / "last.pth")["epoch"] == 1


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_signal_during_the_final_evaluation_is_one_line_and_leaves_no_results(signum, data_dir, tmp_path,
                                                                              monkeypatch, capsys):
    def signalled(*args, **kwargs):
        signal.raise_signal(signum)
        raise AssertionError("the signal did not stop the evaluation")

    monkeypatch.setattr(predict, "build_gallery", signalled)
    project = tmp_path / "project"
    status, message = call_main(train.main, tiny(project, data_dir, 1))
    assert (status, message) == (128 + signum, "")
    stderr = capsys.readouterr().err.strip().splitlines()[-1]
    assert stderr.startswith(f"train.py: stopped by {signum.name} during the evaluation; the unfinished results")
    assert stderr.endswith(f"evaluate again with: python predict.py --project {project} --data {data_dir}")
    assert not (project / "results").exists() and (project / "outputs" / "best.pth").is_file()


def test_non_finite_loss_stops_with_a_message_and_keeps_best(data_dir, tmp_path, monkeypatch, no_test_eval):
    real_loss, calls = train.training_loss, []

    def nan_in_epoch_2(*args, **kwargs):  # one step per epoch: the second call is epoch 2
        result = real_loss(*args, **kwargs)
        calls.append(1)
        return result._replace(loss=result.loss * float("nan")) if len(calls) == 2 else result

    monkeypatch.setattr(train, "training_loss", nan_in_epoch_2)
    project = tmp_path / "project"
    status, message = call_main(train.main, tiny(project, data_dir, 2))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert "nan" in message and "--lr" in message and "best.pth" in message
    outputs = project / "outputs"
    assert load(outputs / "best.pth")["epoch"] == 1
    assert_finite_weights(outputs / "best.pth")
    assert load(outputs / "last.pth")["epoch"] == 1  # the last good state, resumable
    assert_finite_weights(outputs / "last.pth")


def test_exploding_learning_rate_stops_with_a_message_naming_lr(data_dir, tmp_path, no_test_eval):
    project = tmp_path / "project"
    status, message = call_main(train.main, tiny(project, data_dir, 2, "--lr", "1e30"))
    assert status != 0
    # a step at lr 1e30 leaves weights that overflow the next outputs, before any epoch ends
    assert message == ("train.py: error: the model's outputs became non-finite (the weights diverged); lower --lr "
                       f"or try --no-amp. no checkpoint was saved yet in {project / 'outputs'}")
    assert not list(project.rglob("*.pth"))


def test_project_with_outputs_is_refused_without_resume_or_force(run_a, data_dir, no_test_eval):
    before = {p.name: p.stat().st_mtime_ns for p in run_a.outputs.iterdir()}
    status, message = call_main(train.main, tiny(run_a.project, data_dir, 2))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert str(run_a.outputs) in message and "--resume" in message and "--force" in message
    assert {p.name: p.stat().st_mtime_ns for p in run_a.outputs.iterdir()} == before


@pytest.fixture(scope="module")
def disk_full_run(data_dir, tmp_path_factory):
    """A 2-epoch run whose second last.pth write fails with ENOSPC after writing half a file."""
    project = tmp_path_factory.mktemp("disk_full") / "project"
    real_save, writes = torch.save, []

    def fill_disk_on_second_last(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".last."):  # the temporary file of last.pth
            writes.append(Path(f).name)
            if len(writes) == 2:
                Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
                raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "evaluate", _no_test_evaluation)
        mp.setattr(modules.torch, "save", fill_disk_on_second_last)
        status, message = call_main(train.main, tiny(project, data_dir, 2))
    return SimpleNamespace(outputs=project / "outputs", status=status, message=message)


def test_failed_write_ends_with_a_message_and_keeps_the_previous_checkpoint(disk_full_run):
    assert disk_full_run.status != 0
    assert disk_full_run.message == (
        f"train.py: error: could not write {disk_full_run.outputs / 'last.pth'} (No space left on device); "
        f"free disk space or fix permissions (or choose another path), then rerun with --resume: "
        f"{disk_full_run.outputs / 'last.pth'} holds the last complete state")
    last = load(disk_full_run.outputs / "last.pth")
    assert last["epoch"] == 1 and len(last["history"]) == 1
    assert_finite_weights(disk_full_run.outputs / "best.pth")
    assert not [p.name for p in disk_full_run.outputs.iterdir() if ".tmp" in p.name]


def test_failed_write_message_names_the_file(disk_full_run):
    assert str(disk_full_run.outputs / "last.pth") in disk_full_run.message


def test_in_process_run_restores_the_signal_handlers(run_a):
    assert run_a.handlers_after == run_a.handlers_before


def test_last_checkpoint_is_saved_before_the_history_lists_the_epoch(data_dir, tmp_path, monkeypatch, no_test_eval):
    """A kill between the two writes (the OOM killer) must never leave a history ahead of last.pth."""
    real_write, seen = train.write_history, []

    def write_history(history, path):
        last = Path(path).with_name("last.pth")
        seen.append((len(history), load(last)["epoch"] if last.exists() else None))
        return real_write(history, path)

    monkeypatch.setattr(train, "write_history", write_history)
    assert call_main(train.main, tiny(tmp_path / "project", data_dir, 1)) == (0, "")
    assert seen == [(1, 1)]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_torch_save_runtime_error_on_a_full_disk_is_one_line_naming_the_file(data_dir, tmp_path, monkeypatch,
                                                                              no_test_eval):
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".last."):  # the temporary file of last.pth
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            real_save(obj, "/dev/full")  # the RuntimeError torch.save really raises on a full disk
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(modules.torch, "save", full_disk)
    project = tmp_path / "project"
    status, message = call_main(train.main, tiny(project, data_dir, 1))
    assert status != 0
    assert_one_line(message, f"train.py: error: could not write {project / 'outputs' / 'last.pth'} (torch.save")
    assert "free disk space" in message
    assert not [p.name for p in (project / "outputs").iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("where", ["training_loss", "validation"])
def test_divergence_in_the_first_epoch_does_not_claim_a_saved_checkpoint(where, data_dir, tmp_path, monkeypatch,
                                                                         no_test_eval):
    if where == "training_loss":
        real_loss = train.training_loss
        monkeypatch.setattr(train, "training_loss",
                            lambda *a, **k: (lambda result: result._replace(loss=result.loss * float("nan")))(
                                real_loss(*a, **k)))
    else:  # the weights took a finite but exploding step: the validation features overflow
        real_embed = scoring.embed_images
        monkeypatch.setattr(scoring, "embed_images", lambda *a, **k: real_embed(*a, **k) * float("inf"))
    project = tmp_path / "project"
    status, message = call_main(train.main, tiny(project, data_dir, 1))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert "--lr" in message and "best.pth" not in message
    assert f"no checkpoint was saved yet in {project / 'outputs'}" in message
    assert not list(project.rglob("*.pth"))


@pytest.mark.skipif(os.name != "posix", reason="advisory file locks (fcntl) are POSIX")
def test_second_run_on_a_project_in_use_stops_at_once_naming_the_lock_and_pid(data_dir, tmp_path, no_test_eval):
    project = tmp_path / "project"
    first = train.lock_project(project, CPU_CONTEXT)  # what the first run holds while it runs
    try:
        status, message = call_main(train.main, tiny(project, data_dir, 1))
    finally:
        first.close()
    assert status != 0
    assert_one_line(message, f"train.py: error: {project / '.lock'}: another train.py run (pid {os.getpid()})")
    assert not (project / "outputs").exists()
    assert call_main(train.main, tiny(project, data_dir, 1)) == (0, "")  # closed: the project is free again


@pytest.mark.skipif(os.name != "posix", reason="advisory file locks (fcntl) are POSIX")
def test_a_finished_run_releases_its_project(run_a):
    train.lock_project(run_a.project, CPU_CONTEXT).close()


@pytest.fixture
def resumable(run_a, tmp_path):
    """A copy of run_a's project (2 epochs done, lr 1e-3, batch 8, image size 32)."""
    project = tmp_path / "project"
    shutil.copytree(run_a.outputs, project / "outputs")
    return project


@pytest.mark.parametrize("flag, value, saved", [("--lr", "0.05", "0.001"), ("--batch-size", "4", "8"),
                                                ("--loss", "triplet", "'bce'"), ("--image-size", "64", "32"),
                                                ("--benign-limit", "3", "[4000, 1000, 1000]")])
def test_resume_refuses_a_changed_setting_naming_the_flag(resumable, data_dir, flag, value, saved, no_test_eval):
    last = resumable / "outputs" / "last.pth"
    before = last.stat().st_mtime_ns
    status, message = call_main(train.main, tiny(resumable, data_dir, 3, "--resume", flag, value))
    assert status != 0
    assert_one_line(message, f"train.py: error: {flag} {value}: the resumed run has {saved}")
    assert "--force" in message
    assert last.stat().st_mtime_ns == before


def test_resume_applies_a_new_epoch_total_and_says_so(resumable, data_dir, capsys, no_test_eval):
    status, message = call_main(train.main, tiny(resumable, data_dir, 1, "--resume"))
    assert status != 0 and "--epochs 1: the resumed run has finished 2 epochs" in message
    assert call_main(train.main, tiny(resumable, data_dir, 3, "--resume")) == (0, "")
    assert "--epochs 3: applied (the run was set to 2)" in capsys.readouterr().out
    assert load(resumable / "outputs" / "last.pth")["epoch"] == 3


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
def test_hand_edited_config_is_one_line_naming_the_checkpoint(resumable, data_dir, tmp_path, name, edit, what,
                                                              no_test_eval):
    path = resumable / "outputs" / name
    checkpoint = load(path)
    edit(checkpoint["config"])
    torch.save(checkpoint, path)
    if name == "best.pth":
        image = tmp_path / "x.jpg"
        image.write_bytes(jpeg_bytes())
        script, argv = predict, ["--checkpoint", path, "--image", image, "--device", "cpu"]
    else:
        script, argv = train, tiny(resumable, data_dir, 3, "--resume")
    try:
        status, message = call_main(script.main, argv)
    except Exception as error:  # a KeyError or TypeError from deep inside is the failure looked for
        pytest.fail(f"{type(error).__name__}: {error}")
    assert status != 0
    assert_one_line(message, f"{script.__name__}.py: error:")
    assert str(path) in message and what in message


# ---------------------------------------------------------------------------------------------
# 4. Checkpoints are data, not code


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
        modules.load_checkpoint(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_raw_pickle_with_code_is_refused_too(tmp_path):
    marker, path = tmp_path / "code_ran", tmp_path / "raw.pth"
    path.write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    with pytest.raises(WeightsError):
        modules.load_checkpoint(path)
    assert not marker.exists()


def test_predict_cli_refuses_pickled_code_in_one_line(cli):
    result = cli.predict.result()
    assert result.returncode != 0
    assert_one_line(result.stderr.strip(), "predict.py: error:")
    assert "refused" in result.stderr and str(cli.checkpoint) in result.stderr
    assert not cli.marker.exists()


@pytest.mark.parametrize("where", ["--resume", "--weights"])
def test_train_refuses_pickled_code_in_resume_and_weights(where, evil, data_dir, tmp_path, no_test_eval):
    path, marker = evil
    project = tmp_path / "project"
    if where == "--resume":
        (project / "outputs").mkdir(parents=True)
        shutil.copy(path, project / "outputs" / "last.pth")
        argv = tiny(project, data_dir, 2, "--resume")
    else:
        argv = tiny(project, data_dir, 2, "--weights", path)
    status, message = call_main(train.main, argv)
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert "refused" in message and where in message
    assert not marker.exists()


def _squeezenet_state():
    from torchvision.models import squeezenet1_1
    return squeezenet1_1(weights=None).state_dict()


def _checkpoint_case(case, best, path):
    checkpoint = load(best)
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
def test_unusable_checkpoint_raises_weights_error_naming_it(case, run_a, tmp_path):
    path = tmp_path / f"{case}.pth"
    _checkpoint_case(case, run_a.outputs / "best.pth", path)
    with pytest.raises(WeightsError) as error:
        modules.load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    if case in ("truncated", "random_bytes"):
        assert "truncated or corrupt" in message
        assert "refused" not in message


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_predict_with_an_unusable_checkpoint_exits_with_one_line(case, run_a, tmp_path):
    path = tmp_path / f"{case}.pth"
    _checkpoint_case(case, run_a.outputs / "best.pth", path)
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg_bytes())
    try:
        status, message = call_main(predict.main, ["--checkpoint", path, "--image", image, "--device", "cpu"])
    except Exception as error:  # a traceback from deep inside torch is the failure this test looks for
        pytest.fail(f"{type(error).__name__}: {error}")
    assert status != 0
    assert_one_line(message, "predict.py: error:")
    assert str(path) in message
    if case in ("truncated", "random_bytes"):
        assert "truncated or corrupt" in message


def test_train_weights_of_another_architecture_is_one_line(data_dir, tmp_path, no_test_eval):
    path = tmp_path / "squeezenet.pth"
    torch.save(_squeezenet_state(), path)
    status, message = call_main(train.main, tiny(tmp_path / "project", data_dir, 2, "--weights", path))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert f"--weights {path}" in message and "resnet18" in message


@pytest.mark.parametrize("content", ["pickled_code", "truncated"])
def test_predict_with_a_bad_gallery_file_is_one_line_and_runs_no_code(content, run_a, tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    shutil.copy(run_a.outputs / "best.pth", outputs / "best.pth")
    marker = tmp_path / "code_ran"
    if content == "pickled_code":
        torch.save({"features": RunsCode(marker), "checkpoint_stamp": "x"}, outputs / "gallery.pt")
    else:
        (outputs / "gallery.pt").write_bytes(b"PK\x03\x04 half a gallery")
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg_bytes())
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


# ---------------------------------------------------------------------------------------------
# Evaluation and prediction: nothing written outside --out, everything loaded is validated


@pytest.fixture
def quick_metrics(monkeypatch):
    """20 bootstrap resamples for the AUC interval instead of 1000: not what these tests check."""
    monkeypatch.setattr(predict, "image_metrics", functools.partial(metrics.image_metrics, n_bootstrap=20))


@pytest.fixture(scope="module")
def evaluated(run_a, data_dir, tmp_path_factory):
    """A copy of run_a's project evaluated into its own results folder: outputs/gallery.pt exists."""
    project = tmp_path_factory.mktemp("evaluated") / "project"
    shutil.copytree(run_a.outputs, project / "outputs")
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(predict, "image_metrics", functools.partial(metrics.image_metrics, n_bootstrap=20))
        status, message = call_main(predict.main, ["--project", project, "--data", data_dir, "--device", "cpu",
                                                   "--save-every", "5", "--gallery-size", "4"])
    assert (status, message) == (0, "")
    assert (project / "outputs" / "gallery.pt").exists()
    return project


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg_bytes())
    return path


def copy_outputs(evaluated, tmp_path, *names):
    """best.pth and the named files of the evaluated project, with their times (as copy2 keeps them)."""
    outputs = tmp_path / "copy" / "outputs"
    outputs.mkdir(parents=True)
    for name in ("best.pth", *names):
        shutil.copy2(evaluated / "outputs" / name, outputs / name)
    return outputs


def evaluate_argv(project, data, *extra):
    return ["--project", project, "--data", data, "--device", "cpu", "--save-every", "5", "--gallery-size", "4",
            *extra]


def test_evaluation_into_out_or_of_other_data_leaves_the_projects_gallery(evaluated, data_dir, tmp_path,
                                                                          quick_metrics):
    project = tmp_path / "project"
    shutil.copytree(evaluated / "outputs", project / "outputs")
    gallery = project / "outputs" / "gallery.pt"
    before = (gallery.stat().st_ino, gallery.stat().st_mtime_ns, gallery.read_bytes())
    out = tmp_path / "elsewhere"
    assert call_main(predict.main, evaluate_argv(project, data_dir, "--out", out)) == (0, "")
    assert (out / "metrics.json").exists() and not (project / "results").exists()
    other = Path(shutil.copytree(data_dir, tmp_path / "other_data"))
    assert call_main(predict.main, evaluate_argv(project, other)) == (0, "")
    assert (gallery.stat().st_ino, gallery.stat().st_mtime_ns, gallery.read_bytes()) == before


def test_evaluation_of_the_training_data_into_the_project_replaces_the_gallery(evaluated, data_dir, tmp_path,
                                                                               quick_metrics):
    project = tmp_path / "project"
    shutil.copytree(evaluated / "outputs", project / "outputs")
    gallery = project / "outputs" / "gallery.pt"
    gallery.unlink()
    assert call_main(predict.main, evaluate_argv(project, data_dir)) == (0, "")
    assert load(gallery)["checkpoint_stamp"] == predict.checkpoint_stamp(project / "outputs" / "best.pth")


def test_predict_out_that_is_a_file_is_one_line(evaluated, data_dir, tmp_path):
    report = tmp_path / "report.txt"
    report.write_text("mine")
    status, message = call_main(predict.main, evaluate_argv(evaluated, data_dir, "--out", report))
    assert status != 0
    assert_one_line(message, f"predict.py: error: --out {report}: is a file")
    assert report.read_text() == "mine"


def test_predict_full_disk_is_one_line_naming_the_file(evaluated, data_dir, tmp_path, monkeypatch, quick_metrics):
    real_write_text = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name.startswith((".metrics.", "metrics.json")):  # metrics.json or its temporary file
            raise OSError(28, "No space left on device", str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    out = tmp_path / "report"
    try:
        status, message = call_main(predict.main, evaluate_argv(evaluated, data_dir, "--out", out))
    except OSError as error:
        pytest.fail(f"traceback: {error!r}")
    assert status != 0
    assert_one_line(message, f"predict.py: error: could not write {out / 'metrics.json'} (No space left on device)")


@pytest.mark.parametrize("earlier", [True, False], ids=["earlier-results", "no-earlier-results"])
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_signal_during_evaluation_puts_the_earlier_results_back(signum, earlier, evaluated, data_dir, tmp_path,
                                                                monkeypatch, capsys):
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
    status, message = call_main(predict.main, evaluate_argv(evaluated, data_dir, "--out", out))
    assert (status, message) == (128 + signum, "")
    stderr = capsys.readouterr().err.strip()
    assert_one_line(stderr, f"predict.py: stopped by {signum.name}; ")
    if earlier:
        assert stderr.endswith(f"earlier results moved back to {out}")
        assert [p.name for p in out.iterdir()] == ["metrics.json"] and (out / "metrics.json").read_text() == "earlier\n"
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["report"] if earlier else [])  # no results.<date-time> left


def test_save_atomic_turns_torchs_runtime_error_into_an_os_error_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "gallery.pt"
    modules.save_atomic({"threshold": 0.5}, path)

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(modules.torch, "save", full_disk)
    with pytest.raises(OSError) as error:
        modules.save_atomic({"threshold": 0.7}, path)
    assert error.value.filename == str(path) and "unexpected pos" in error.value.strerror
    monkeypatch.undo()
    assert load(path) == {"threshold": 0.5} and [p.name for p in tmp_path.iterdir()] == ["gallery.pt"]


def test_checkpoint_with_non_finite_weights_is_refused_before_anything_moves(evaluated, data_dir, tmp_path, image):
    outputs = copy_outputs(evaluated, tmp_path)
    checkpoint = load(outputs / "best.pth")
    checkpoint["model"]["head.0.weight"][0, 0] = float("nan")
    torch.save(checkpoint, outputs / "best.pth")
    results = outputs.parent / "results"
    results.mkdir()
    (results / "earlier.json").write_text("{}")
    for argv in (evaluate_argv(outputs.parent, data_dir),
                 ["--checkpoint", outputs / "best.pth", "--image", image, "--device", "cpu"]):
        status, message = call_main(predict.main, argv)
        assert status != 0
        assert_one_line(message, f"predict.py: error: checkpoint {outputs / 'best.pth'}:")
        assert "not finite" in message
    assert [p.name for p in results.iterdir()] == ["earlier.json"]
    assert sorted(p.name for p in outputs.parent.iterdir()) == ["outputs", "results"]


@pytest.mark.parametrize("damage, what", [
    (lambda gallery: gallery["features"].fill_(float("nan")), "not finite"),
    (lambda gallery: gallery.update(features=gallery["features"][:, :10]), "10 wide"),
    (lambda gallery: gallery.update(threshold="0.5"), "threshold '0.5' is not a number"),
])
def test_damaged_gallery_is_one_line_naming_it_and_rebuilt_with_data(evaluated, data_dir, tmp_path, image, capsys,
                                                                     damage, what):
    outputs = copy_outputs(evaluated, tmp_path, "gallery.pt")
    gallery = load(outputs / "gallery.pt")
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
    assert call_main(predict.main, [*argv, "--data", data_dir]) == (0, "")
    printed = capsys.readouterr().out
    assert "rebuilding" in printed and re.search(r"P\(malignant\) <?0\.", printed)  # '<': a flat map, tiny model


def test_gallery_still_fits_a_project_copied_with_new_file_times(evaluated, tmp_path, image, capsys):
    outputs = Path(shutil.copytree(evaluated / "outputs", tmp_path / "copy" / "outputs",
                                   copy_function=shutil.copy))  # as cp -r: new modification times
    later = time.time() + 60
    os.utime(outputs / "best.pth", (later, later))
    argv = ["--checkpoint", outputs / "best.pth", "--image", image, "--device", "cpu"]
    assert call_main(predict.main, argv) == (0, "")
    assert "P(malignant)" in capsys.readouterr().out
    gallery = load(outputs / "gallery.pt")  # a gallery stamped the old way (size and time) is not trusted
    gallery["checkpoint_stamp"] = f"{(outputs / 'best.pth').stat().st_size}-{(outputs / 'best.pth').stat().st_mtime_ns}"
    torch.save(gallery, outputs / "gallery.pt")
    status, message = call_main(predict.main, argv)
    assert status != 0 and "made for another checkpoint" in message and "--data" in message


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the size is the subject
@pytest.mark.parametrize("flag", ["--image", "--pair"])
def test_image_whose_header_claims_too_many_pixels_is_refused_before_decoding(flag, run_a, tmp_path, monkeypatch):
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
    status, message = call_main(predict.main, ["--checkpoint", run_a.outputs / "best.pth", flag, *inputs,
                                               "--device", "cpu"])
    assert status != 0
    assert_one_line(message, f"predict.py: error: {flag} {bomb}: too large (12000x12000)")
    assert f"{images.MAX_PIXELS:,}" in message


@pytest.mark.parametrize("flag, value", [("--target-sensitivity", "1.5"), ("--target-sensitivity", "nan"),
                                         ("--workers", "-1")])
def test_predict_bad_flag_is_one_line_before_any_work(flag, value, evaluated, data_dir, tmp_path):
    out = tmp_path / "out"
    status, message = call_main(predict.main, evaluate_argv(evaluated, data_dir, "--out", out, flag, value))
    assert status != 0
    assert_one_line(message, f"predict.py: error: {flag} {value}:")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 5. Bad flags: one line each, before any work


BAD_FLAGS = [
    ("does_not_exist", ["--data", "{tmp}/nowhere"], "--data"),
    ("image_size_below_32", ["--image-size", "16"], "--image-size 16"),
    ("batch_size_0", ["--batch-size", "0"], "--batch-size 0"),
    ("epochs_0", ["--epochs", "0"], "--epochs 0"),
    ("unknown_device", ["--device", "banana"], "--device banana"),
    pytest.param("cuda_absent", ["--device", "cuda"], "--device cuda", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has CUDA")),
    ("resume_without_last", ["--resume"], "--resume"),
    ("batch_size_1", ["--batch-size", "1"], "--batch-size 1"),  # BatchNorm needs two per batch
    ("lr_inf", ["--lr", "inf"], "--lr inf"),
    ("lr_nan", ["--lr", "nan"], "--lr nan"),
    ("weight_decay_nan", ["--weight-decay", "nan"], "--weight-decay nan"),
    ("margin_negative", ["--loss", "triplet", "--margin", "-1"], "--margin -1"),
    ("margin_nan", ["--loss", "contrastive", "--margin", "nan"], "--margin nan"),
    ("seed_negative", ["--seed", "-1"], "--seed -1"),
    ("workers_negative", ["--workers", "-1"], "--workers -1"),
]


@pytest.mark.parametrize("case, extra, flag", BAD_FLAGS)
def test_bad_flag_is_one_line_before_any_work(case, extra, flag, data_dir, tmp_path, no_test_eval):
    project = tmp_path / "project"
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    status, message = call_main(train.main, tiny(project, data_dir, 2, *extra))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert flag in message
    assert not project.exists()  # nothing created: refused before any work


def test_missing_data_flag_is_a_one_line_usage_error(tmp_path, capsys):
    argv = tiny(tmp_path / "project", "unused")
    del argv[2:4]  # drop --data DATA
    status, _ = call_main(train.main, argv)
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().splitlines() == ["train.py: error: the following arguments are required: --data; see --help"]
    assert not (tmp_path / "project").exists()


def test_bad_flag_on_the_real_command_line(cli):
    result = cli.train.result()
    assert result.returncode == 1
    assert_one_line(result.stderr.strip(), "train.py: error: --device banana")
    assert result.stdout == ""
    assert not cli.train_project.exists()


# ---------------------------------------------------------------------------------------------
# issue 19: nothing lost by a typo, advice only when true


def test_force_with_a_weights_typo_deletes_nothing(run_a, data_dir, tmp_path, no_test_eval):
    project = tmp_path / "finished"
    shutil.copytree(run_a.project, project)
    before = {p.name: p.read_bytes() for p in (project / "outputs").iterdir()}
    status, message = call_main(train.main, tiny(project, data_dir, 2, "--force", "--weights", tmp_path / "typo.pth"))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert f"--weights {tmp_path / 'typo.pth'}: no such file" in message
    assert {p.name: p.read_bytes() for p in (project / "outputs").iterdir()} == before


@pytest.mark.parametrize("content", ["foreign", "nan"])
def test_weights_that_are_foreign_or_not_finite_are_one_line_before_training(content, data_dir, tmp_path,
                                                                              no_test_eval):
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    if content == "nan":
        state["fc.bias"][0] = float("nan")
    else:  # another repository's checkpoint: a model name beside the tensors
        state = {"model": "resnet18", "state_dict": state}
    torch.save(state, tmp_path / "w.pth")
    status, message = call_main(train.main, tiny(tmp_path / "p", data_dir, 1, "--weights", tmp_path / "w.pth"))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert f"--weights {tmp_path / 'w.pth'}" in message
    assert ("not finite" if content == "nan" else "not a resnet18 state_dict") in message
    assert not (tmp_path / "p" / "outputs" / "last.pth").exists()


def test_a_project_that_is_a_file_gives_no_resume_advice(data_dir, tmp_path, no_test_eval):
    (tmp_path / "file").write_text("not a folder")
    status, message = call_main(train.main, tiny(tmp_path / "file", data_dir, 1))
    assert status != 0
    assert_one_line(message, "train.py: error:")
    assert "--resume" not in message


def test_the_resume_hint_is_quoted_so_that_it_pastes(tmp_path):
    import shlex

    args = SimpleNamespace(project=str(tmp_path / "my run ü"), data=str(tmp_path / "da ta"))
    command = train.resume_message(args, Path(args.project) / "outputs", 1, 0).splitlines()[-1]
    argv = shlex.split(command)
    assert argv[argv.index("--project") + 1] == args.project and argv[argv.index("--data") + 1] == args.data


@pytest.mark.parametrize("out", ["data", "inside_data", "project", "outputs"])
def test_predict_out_that_overlaps_the_data_or_the_checkpoint_moves_nothing(out, evaluated, data_dir, tmp_path):
    data = Path(shutil.copytree(data_dir, tmp_path / "data"))
    project = tmp_path / "project"
    shutil.copytree(evaluated / "outputs", project / "outputs")
    target = {"data": data, "inside_data": data / "train_data", "project": project,
              "outputs": project / "outputs"}[out]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    status, message = call_main(predict.main, evaluate_argv(project, data, "--out", target))
    assert status != 0
    assert_one_line(message, "predict.py: error:")
    assert f"--out {target}: overlaps" in message
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_evaluating_last_pth_into_the_project_leaves_the_gallery_of_best_pth(evaluated, data_dir, tmp_path,
                                                                             quick_metrics):
    project = tmp_path / "project"
    shutil.copytree(evaluated / "outputs", project / "outputs")
    shutil.copy(project / "outputs" / "best.pth", project / "outputs" / "last.pth")
    gallery = project / "outputs" / "gallery.pt"
    before = gallery.read_bytes()
    argv = evaluate_argv(project, data_dir, "--checkpoint", project / "outputs" / "last.pth")
    assert call_main(predict.main, argv) == (0, "")
    assert gallery.read_bytes() == before and (project / "results" / "metrics.json").exists()


def test_evaluation_counts_and_lists_every_image_it_left_out(evaluated, data_dir, tmp_path, quick_metrics, capsys):
    broken = Path(shutil.copytree(data_dir, tmp_path / "data"))
    good = (broken / "test_data" / "1" / "SYN_test_1_0000.jpg").read_bytes()
    (broken / "test_data" / "1" / "cut_a.jpg").write_bytes(good[: len(good) // 2])
    (broken / "test_data" / "0" / "cut_b.jpg").write_bytes(good[: len(good) // 3])
    (broken / "test_data" / "0" / "notes.txt").write_text("not an image")
    assert call_main(predict.main, evaluate_argv(evaluated, broken, "--out", tmp_path / "X")) == (0, "")
    listed = (tmp_path / "X" / "excluded_images.txt").read_text().splitlines()
    names = {Path(line.split("\t")[0]).name for line in listed}
    assert {"cut_a.jpg", "cut_b.jpg", "notes.txt"} <= names and EXCLUDED <= names
    assert json.loads((tmp_path / "X" / "metrics.json").read_text())["n_excluded_images"] == len(listed)
    assert re.search(rf"excluded images +{len(listed)}, listed in .*excluded_images.txt", capsys.readouterr().out)


def test_a_last_pth_saved_before_the_backbone_scale_existed_resumes(resumable, data_dir, no_test_eval):
    last = resumable / "outputs" / "last.pth"
    state = load(last)
    for key in ("backbone", "features", "backbone_lr_scale"):
        state["config"].pop(key)
    for group in state["optimizer"]["param_groups"]:
        group.pop("lr_scale")
    torch.save(state, last)
    assert call_main(train.main, tiny(resumable, data_dir, 3, "--resume")) == (0, "")
    assert load(last)["epoch"] == 3


def test_a_project_inside_its_data_is_refused_before_training(data_dir, tmp_path, no_test_eval):
    data = Path(shutil.copytree(data_dir, tmp_path / "data"))
    status, message = call_main(train.main, tiny(data / "runs" / "x", data, 1))
    assert status != 0
    assert_one_line(message, f"train.py: error: --project {data / 'runs' / 'x'}: overlaps --data")
    assert not (data / "runs").exists()
