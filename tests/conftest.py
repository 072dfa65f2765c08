"""Shared fixtures: a tiny synthetic data folder and one tiny project trained on it by the real
command line (each made once per session, or once per worker under pytest -n), the real ISIC
sample, one torch thread, and a short bootstrap for in-process evaluations; a data folder with odd
and broken files, one tiny run on it in-process and its evaluation (also once per session)."""
import functools
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers import TINY, run_script, tiny  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_COUNTS = {"train": (8, 6), "validation": (6, 4), "test": (6, 4)}  # (benign, malignant) per split


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """DATA/{train,validation,test}_data/{0,1}/*.jpg with TINY_COUNTS images of 48 px. Read-only:
    a test that changes files copies it first."""
    import synthetic

    out = tmp_path_factory.mktemp("tiny_data")
    synthetic.make_synthetic(out, size=48, seed=0, counts=TINY_COUNTS)
    return out


@pytest.fixture(scope="session")
def trained_project(tiny_data_dir, tmp_path_factory):
    """(project, stdout) of `train.py --project P --data tiny_data_dir TINY` (2 epochs and the full
    test evaluation) as a user runs it. Shared: tests add single-image figures under
    P/predictions/ and evaluate into folders of their own; one that re-evaluates into the
    project or changes a file works on a copy."""
    project = tmp_path_factory.mktemp("trained") / "exp"
    stdout = run_script("train.py", "--project", project, "--data", tiny_data_dir, *TINY)
    return project, stdout


@pytest.fixture(scope="session")
def second_project(tiny_data_dir, tmp_path_factory):
    """A second model of trained_project's data and validation images (another seed, 1 epoch): with
    it, an ensemble of two."""
    project = tmp_path_factory.mktemp("second") / "exp"
    run_script("train.py", "--project", project, "--data", tiny_data_dir, *tiny(1), "--seed", "1")
    return project


@pytest.fixture
def quick_bootstrap(monkeypatch):
    """50 bootstrap resamples of the AUC interval instead of 1000 in an in-process evaluation: the
    interval itself is checked in test_metrics.py, and 1000 resamples for each classifier are
    most of an evaluation's time on tiny data."""
    import metrics
    import predict

    monkeypatch.setattr(predict, "image_metrics", functools.partial(metrics.image_metrics, n_bootstrap=50))


@pytest.fixture(scope="session")
def isic_sample_dir():
    """The real ISIC sample (557 images, raw download layout); skipped where it is absent."""
    folder = SHARED_DATA / "isic_sample"
    if not (folder / "train-image" / "image").is_dir():
        pytest.skip(f"real data sample not found at {folder}")
    return folder


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread():
    """One intra-op thread for every test of tiny CPU models: on a busy machine (CI, parallel
    runs) several OpenMP threads on 32 px images are many times slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def help_entries(help_text):
    """{flag: its help text, wrapped lines joined} of every option in argparse's --help output;
    a flag without a help string maps to ''. Both spellings of a BooleanOptionalAction
    (--tta, --no-tta) map to the same text."""
    options = help_text[help_text.index("\noptions:\n") + len("\noptions:\n"):]
    entries, flags = {}, []
    for line in options.splitlines():
        if line.startswith("  -"):  # a new option: its invocation, then (after 2+ spaces) its help
            invocation, _, text = line.strip().partition("  ")
            flags = re.findall(r"--[\w-]+", invocation)
            for flag in flags:
                entries[flag] = text.strip()
        elif line.startswith("    ") and flags:  # the help continued on an indented line
            for flag in flags:
                entries[flag] = f"{entries[flag]} {line.strip()}".strip()
        else:  # a blank line or another section ends the options
            flags = []
    return entries


@pytest.fixture
def parse_help():
    return help_entries


# ---------------------------------------------------------------------------------------------
# Damaged data, and one tiny run on it in-process (the reference of every resumed run)


def _no_test_evaluation(*args, **kwargs):
    return {}


@pytest.fixture
def no_test_eval(monkeypatch):
    """train.main without its final test-split evaluation (bootstrap AUC, figures), for tests of
    something else."""
    import train

    monkeypatch.setattr(train, "evaluate", _no_test_evaluation)


@pytest.fixture(scope="session")
def broken_data_dir(tmp_path_factory):
    """TINY_COUNTS images of 40 px plus odd and broken files. Read-only: a test that changes files
    copies it first. Train holds grayscale, CMYK, RGBA-PNG and palette-PNG files under .jpg names
    (they must train), the broken files of helpers.BROKEN_FILES (zero bytes, truncated, random
    bytes, text, a 70-megapixel image) and a .DS_Store; validation holds one zero-byte file."""
    import numpy as np
    from PIL import Image

    import synthetic

    out = tmp_path_factory.mktemp("broken_data")
    synthetic.make_synthetic(out, size=40, seed=0, counts=TINY_COUNTS)
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


@pytest.fixture(scope="session")
def reference_run(broken_data_dir, tmp_path_factory):
    """One uninterrupted 2-epoch train.main(helpers.train_argv(P, broken_data_dir)) in-process,
    its test evaluation stubbed: what every stopped and resumed run must equal. Records its stdout,
    every checkpoint it saves (file name, epoch, step), and the signal handlers before and after.
    Read-only: a test that writes to the project copies it (resumable)."""
    import contextlib
    import io
    import signal
    from types import SimpleNamespace

    import train
    from helpers import SIGNALS, train_argv

    project = tmp_path_factory.mktemp("reference_run") / "project"
    saves, real_save = [], train.save_versioned

    def spy(obj, path):
        saves.append((Path(path).name, obj.get("epoch"), obj.get("step")))
        return real_save(obj, path)

    before = {s: signal.getsignal(s) for s in SIGNALS}
    stdout = io.StringIO()
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
            mp.setattr(train, "evaluate", _no_test_evaluation)
            mp.setattr(train, "save_versioned", spy)
            train.main(train_argv(project, broken_data_dir, 2))
        after = {s: signal.getsignal(s) for s in SIGNALS}
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    return SimpleNamespace(project=project, outputs=project / "outputs", stdout=stdout.getvalue(),
                           saves=saves, handlers_before=before, handlers_after=after)


@pytest.fixture
def resumable(reference_run, tmp_path):
    """A copy of reference_run's outputs in a project of its own (2 epochs done, lr 1e-3, batch 8,
    image size 32)."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(reference_run.outputs, project / "outputs")
    return project


@pytest.fixture(scope="session")
def evaluated_project(reference_run, broken_data_dir, tmp_path_factory):
    """A copy of reference_run's project evaluated by predict.py into its own results folder:
    outputs/gallery.pt exists. Read-only: a test that writes to it copies it."""
    import contextlib
    import io
    import shutil

    import metrics
    import predict
    from helpers import call_main, evaluate_argv

    project = tmp_path_factory.mktemp("evaluated") / "project"
    shutil.copytree(reference_run.outputs, project / "outputs")
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(predict, "image_metrics", functools.partial(metrics.image_metrics, n_bootstrap=50))
        status, message = call_main(predict.main, evaluate_argv(project, broken_data_dir))
    assert (status, message) == (0, "")
    assert (project / "outputs" / "gallery.pt").exists()
    return project


# ---------------------------------------------------------------------------------------------
# Tiny networks without a network connection


@pytest.fixture(scope="module")
def siamese():
    """The design's Siamese network from random weights, in eval mode."""
    import torch

    from modules import SiameseNetwork

    torch.manual_seed(0)
    return SiameseNetwork("none").eval()


@pytest.fixture(scope="module")
def images():
    """Four random 32 px images."""
    import torch

    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def offline(monkeypatch):
    """torchvision's resnet18 that fails like a machine without internet when weights are asked for."""
    import urllib.error

    import torchvision

    import modules

    calls = []

    def no_network(*, weights=None, **kwargs):
        calls.append(weights)
        if weights is not None:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return torchvision.models.resnet18(weights=None, **kwargs)

    monkeypatch.setattr(modules, "resnet18", no_network)
    return calls
