"""The scripts in assets/ run for real: the architecture figure, and the demo's subset drawn from
an ISIC 2017 layout (a tiny synthetic one, with the demo's counts scaled down). tests/test_app.py
serves and drives the page with screenshot_app.py's functions."""
import csv
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, SUBPROCESS_ENV

SMALL_COUNTS = {"train": (3, 2), "val": (2, 1), "test": (2, 2)}  # (benign, malignant) per challenge split


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "assets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_draw_architecture_writes_the_figure_where_asked(tmp_path):
    out = tmp_path / "architecture.png"
    result = subprocess.run([sys.executable, "assets/draw_architecture.py", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}"
    with Image.open(out) as image, Image.open(ROOT / "assets" / "architecture.png") as committed:
        assert image.format == "PNG" and image.size == committed.size
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left beside it


# ---------------------------------------------------------------------------------------------
# make_demo_data.py


@pytest.fixture
def maker(monkeypatch):
    module = load("make_demo_data")
    monkeypatch.setattr(module, "COUNTS", SMALL_COUNTS)
    return module


def isic2017_layout(folder, per_class=4):
    """labels.csv and images/<isic_id>.jpg as ../shared/data/isic2017 holds them: per_class
    images of 64 x 48 px for each challenge split and class. Returns {isic_id: (split, target)}."""
    rng, where = np.random.default_rng(0), {}
    (folder / "images").mkdir(parents=True)
    for split in SMALL_COUNTS:
        for target in (0, 1):
            for _ in range(per_class):
                isic_id = f"ISIC_{len(where):07d}"
                Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
                    folder / "images" / f"{isic_id}.jpg")
                where[isic_id] = (split, target)
    with open(folder / "labels.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["isic_id", "target", "diagnosis", "split"])
        writer.writerows([isic_id, target, "nevus", split] for isic_id, (split, target) in where.items())
    return where


def drawn(out):
    return sorted(path.relative_to(out).as_posix() for path in out.rglob("*.jpg"))


def test_the_demo_subset_keeps_each_images_split_and_class(maker, tmp_path, capsys):
    where = isic2017_layout(tmp_path / "isic2017")
    out = tmp_path / "demo"
    maker.main(["--source", str(tmp_path / "isic2017"), "--out", str(out)])
    assert capsys.readouterr().out.strip() == f"wrote 12 images to {out}"
    for split, counts in SMALL_COUNTS.items():
        for target, count in enumerate(counts):
            files = sorted((out / maker.FOLDERS[split] / str(target)).glob("*.jpg"))
            assert len(files) == count and all(where[f.stem] == (split, target) for f in files)
            with Image.open(files[0]) as image:
                assert image.size == (128, 128) and image.mode == "RGB"
    licence = (out / "LICENSE.md").read_text()
    assert licence.startswith("# ISIC 2017 demo subset\n\n12 dermoscopic images") and "CC-0" in licence
    assert "| train_data | 3 | 2 | train split |" in licence
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "isic2017"]  # no partial folder left
    maker.main(["--source", str(tmp_path / "isic2017"), "--out", str(tmp_path / "again")])
    assert drawn(tmp_path / "again") == drawn(out)  # seed 0: the same images every time


def test_the_demo_maker_keeps_an_existing_folder(maker, tmp_path):
    isic2017_layout(tmp_path / "isic2017")
    out = tmp_path / "demo"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    with pytest.raises(SystemExit, match="exists; remove it first"):
        maker.main(["--source", str(tmp_path / "isic2017"), "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("damage, message", [
    ("no column", "labels.csv: no split column; it needs isic_id, split and target"),
    ("too few", "labels.csv: only 1 of split test, target 1 (the demo draws 2)"),
    ("missing image", "cannot be read (FileNotFoundError); re-download the ISIC 2017 images"),
])
def test_an_unusable_source_is_one_line_and_leaves_nothing(damage, message, maker, tmp_path):
    source = tmp_path / "isic2017"
    where = isic2017_layout(source)
    lines = (source / "labels.csv").read_text().splitlines()
    if damage == "no column":
        lines = [",".join(line.split(",")[:3]) for line in lines]
    elif damage == "too few":
        test_malignant = [line for line in lines if line.endswith(",1,nevus,test")]
        lines = [line for line in lines if line not in test_malignant[1:]]  # one of the two the demo draws
    else:
        for isic_id in where:
            (source / "images" / f"{isic_id}.jpg").unlink()
    (source / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as stop:
        maker.main(["--source", str(source), "--out", str(tmp_path / "demo")])
    assert str(stop.value.code).startswith("make_demo_data.py: error: ") and message in str(stop.value.code)
    assert "\n" not in str(stop.value.code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["isic2017"]  # no demo, no partial folder


def test_the_shipped_demo_is_what_the_script_draws_from_isic2017(tmp_path, capsys):
    """The committed assets/isic2017_demo: the same files, the same licence, and images within a
    grey level of the shipped ones on average (another Pillow may resize or encode a little
    differently). 3 s on the real data."""
    source = ROOT.parent / "shared" / "data" / "isic2017"
    if not (source / "labels.csv").is_file():
        pytest.skip("../shared/data/isic2017 is not here")
    load("make_demo_data").main(["--source", str(source), "--out", str(tmp_path / "demo")])
    shipped, made = ROOT / "assets" / "isic2017_demo", tmp_path / "demo"
    files = sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(made) for p in made.rglob("*") if p.is_file())
    assert (shipped / "LICENSE.md").read_text() == (made / "LICENSE.md").read_text()
    for name in (f for f in files if f.suffix == ".jpg"):
        with Image.open(shipped / name) as ours, Image.open(made / name) as theirs:
            assert np.abs(np.asarray(ours, dtype=float) - np.asarray(theirs, dtype=float)).mean() < 1, name
