"""Tests of synthetic.py: the synthetic lesions in the split layout, and their command line."""
import subprocess
import sys
from pathlib import Path

from PIL import Image

from dataset import SPLITS, load_split
from synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The synthetic generator and its command line


def test_make_synthetic_writes_the_layout_with_the_requested_counts(tmp_path):
    counts = {"train": (3, 2), "validation": (2, 1), "test": (1, 2)}
    assert make_synthetic(tmp_path, size=32, seed=1, counts=counts) == 11
    for split, (benign, malignant) in counts.items():
        for label, count in ((0, benign), (1, malignant)):
            files = sorted((tmp_path / SPLITS[split] / str(label)).iterdir())
            assert len(files) == count and all(f.suffix == ".jpg" for f in files)
            with Image.open(files[0]) as image:
                assert image.size == (32, 32) and image.mode == "RGB" and image.format == "JPEG"
    assert load_split(tmp_path, "test").counts() == [1, 2]


def test_make_synthetic_is_seeded(tmp_path):
    counts = {"train": (1, 1)}
    make_synthetic(tmp_path / "a", size=32, seed=3, counts=counts)
    make_synthetic(tmp_path / "b", size=32, seed=3, counts=counts)
    make_synthetic(tmp_path / "c", size=32, seed=4, counts=counts)
    name = Path("train_data") / "1" / "SYN_train_1_0000.jpg"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_synthetic_command_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = subprocess.run([sys.executable, "synthetic.py", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "not empty" in result.stderr and str(out) in result.stderr
    assert "Traceback" not in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
