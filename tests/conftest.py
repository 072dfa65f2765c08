"""Shared fixtures: a tiny synthetic data folder and one tiny project trained on it by the real
command line (each made once per session, or once per worker under pytest -n), the real ISIC
sample, one torch thread, and a short bootstrap for in-process evaluations."""
import functools
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers import TINY, run_script  # noqa: E402

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
