"""Shared fixtures: a tiny synthetic data folder (made once per session) and the real ISIC sample."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_COUNTS = {"train": (8, 6), "validation": (6, 4), "test": (6, 4)}  # (benign, malignant) per split


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """DATA/{train,validation,test}_data/{0,1}/*.jpg with TINY_COUNTS images of 48 px. Read-only:
    a test that changes files copies it first."""
    import dataset

    out = tmp_path_factory.mktemp("tiny_data")
    dataset.make_synthetic(out, size=48, seed=0, counts=TINY_COUNTS)
    return out


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
