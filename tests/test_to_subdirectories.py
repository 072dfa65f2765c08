"""Tests of to_subdirectories.py: the split at full ISIC 2020 scale, the real sample, and the
ways a user's CSV, image folder or output folder can be wrong."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import to_subdirectories as tsd  # noqa: E402
from dataset import SPLITS  # noqa: E402
from stratified_split import draw_split_names  # noqa: E402

SHARED = (Path(__file__).parents[1] / ".." / "shared" / "data").resolve()
ISIC2020_CSV = SHARED / "isic2020_train.csv"
SAMPLE = SHARED / "isic_sample"
RATIOS = (0.70, 0.15, 0.15)


def layout(out):
    """{file name: (split, label)} of a written split; fails if a file is in two places."""
    placed = {}
    for split in SPLITS.values():
        for label in (0, 1):
            for path in (out / split / str(label)).iterdir():
                assert path.name not in placed, f"{path.name} placed twice"
                placed[path.name] = (split, label)
    return placed


def make_data(root, rows, header=("isic_id", "target"), create=True, lineterminator="\r\n"):
    """A CSV and an image folder (tiny placeholder files: the split script never decodes them)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    csv_path = root / "meta.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator=lineterminator)
        writer.writerow(header)
        writer.writerows(rows)
    if create:
        for row in rows:
            name = str(row[0])
            if name and "/" not in name and "\\" not in name and not name.startswith("."):
                file = images / (name if name.endswith(".jpg") else name + ".jpg")
                file.write_bytes(b"\xff\xd8" + name.encode())
    return csv_path, images


def simple_rows(n_benign=20, n_malignant=10):
    labels = [0] * n_benign + [1] * n_malignant
    return [(f"IMG_{i:04d}", label) for i, label in enumerate(labels)]


def run_main(csv_path, images, out, *extra):
    return tsd.main(["--csv", str(csv_path), "--images", str(images), "--out", str(out), *extra])


def error_of(excinfo):
    """The one-line message of a user error."""
    message = str(excinfo.value.code)
    assert message.startswith("to_subdirectories.py: error: "), message
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------
# Full scale: the ISIC 2020 ground truth with placeholder images


@pytest.fixture(scope="module")
def isic2020(tmp_path_factory):
    if not ISIC2020_CSV.is_file():
        pytest.skip(f"{ISIC2020_CSV} not available")
    images = tmp_path_factory.mktemp("isic2020") / "image"
    images.mkdir()
    with open(ISIC2020_CSV, newline="", encoding="utf-8-sig") as f:
        truth = {row["image_name"] + ".jpg": (int(row["target"]), row["patient_id"]) for row in csv.DictReader(f)}
    # Placeholders as hard links to a few small files: ten times faster than 33k writes on a busy
    # disk, and at most 2,001 links per file even after the split links them again.
    for i, name in enumerate(truth):
        if i % 1000 == 0:
            source = images.parent / f"placeholder-{i // 1000}.jpg"
            source.write_bytes(b"x")
        try:
            os.link(source, images / name)
        except OSError:  # a file system without hard links
            (images / name).write_bytes(b"x")
    yield images, truth
    shutil.rmtree(images)  # 33k files: don't leave them for pytest's basetemp rotation


def test_full_scale_isic2020_split(isic2020, tmp_path, capsys):
    images, truth = isic2020
    assert len(truth) == 33126
    info = run_main(ISIC2020_CSV, images, tmp_path / "DATA", "--seed", "0")
    printed = capsys.readouterr().out
    placed = layout(tmp_path / "DATA")

    # every image exactly once, in the folder of its class
    assert set(placed) == set(truth)
    assert all(placed[name][1] == truth[name][0] for name in truth)

    # no patient in two splits
    splits_of_patient = defaultdict(set)
    for name, (split, _) in placed.items():
        splits_of_patient[truth[name][1]].add(split)
    assert len(splits_of_patient) == 2056
    assert all(len(s) == 1 for s in splits_of_patient.values())

    # per class within 1 % (of the class) of 70/15/15
    for label, n_class in ((0, 32542), (1, 584)):
        for split, ratio in zip(SPLITS.values(), RATIOS):
            n = sum(1 for s, lab in placed.values() if s == split and lab == label)
            assert abs(n / n_class - ratio) <= 0.01, (split, label, n, n_class)

    # the table and split.json
    assert "patients" in printed and "train_data" in printed and "per-image" not in printed
    saved = json.loads((tmp_path / "DATA" / "split.json").read_text())
    assert saved["grouping"] == "patient_id" and saved["seed"] == 0 and saved == info
    assert sum(c["total"] for c in saved["counts"].values()) == 33126
    assert sum(c["patients"] for c in saved["counts"].values()) == 2056
    assert sum(saved["files"].values()) == 33126

    # same seed twice -> the identical split; another seed -> another split
    rows, _ = tsd.read_metadata(ISIC2020_CSV)
    labels, groups = [r["target"] for r in rows], [r["patient_id"] for r in rows]
    again = draw_split_names(labels, groups, RATIOS, seed=0)
    assert again == [placed[r["name"]][0] for r in rows]
    other = draw_split_names(labels, groups, RATIOS, seed=1)
    assert other != again
    shutil.rmtree(tmp_path / "DATA")


# ---------------------------------------------------------------------------------------------
# The real sample (Kaggle layout, no patient_id)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The sample, copied to a temp folder: linking needs files we own on the same file system."""
    if not (SAMPLE / "train-metadata.csv").is_file():
        pytest.skip(f"{SAMPLE} not available")
    root = tmp_path_factory.mktemp("sample")
    shutil.copytree(SAMPLE / "train-image" / "image", root / "image")
    return SAMPLE / "train-metadata.csv", root / "image"


def test_sample_per_image_fallback_with_hard_links(sample, tmp_path, capsys):
    csv_path, images = sample
    info = run_main(csv_path, images, tmp_path / "DATA")
    printed = capsys.readouterr().out
    assert "no patient_id column" in printed and "per-image split" in printed
    placed = layout(tmp_path / "DATA")
    # 2 training images are near copies of validation or test images of the drawn split: left out
    assert info["near_copies"]["left_out_of_train"] == ["ISIC_0000279.jpg", "ISIC_0000512.jpg"]
    assert len(placed) == 557 - 2
    assert info["grouping"] == "image" and info["patients"] is None
    assert [info["counts"][s]["patients"] for s in SPLITS.values()] == [None] * 3
    for label, n_class in ((0, 398), (1, 159)):
        for split, ratio in zip(SPLITS.values(), RATIOS):
            n = sum(1 for s, lab in placed.values() if s == split and lab == label)
            assert abs(n - ratio * n_class) <= 3, (split, label, n)
    # the table shows '-' for patients in a per-image split
    table = printed[printed.index("split  "):].splitlines()
    assert [line.split()[0] for line in table] == [*"split train_data validation_data test_data total".split()]
    assert all(line.split()[-1] == "-" for line in table[1:])
    # hard links by default
    name, (split, label) = next(iter(placed.items()))
    written, source = (tmp_path / "DATA" / split / str(label) / name).stat(), (images / name).stat()
    assert written.st_ino == source.st_ino and written.st_nlink > 1
    assert info["files"] == {"link": 555}


def test_sample_copy_gives_independent_files(sample, tmp_path):
    csv_path, images = sample
    info = run_main(csv_path, images, tmp_path / "DATA", "--copy")
    assert info["files"] == {"copy": 555}
    for name, (split, label) in list(layout(tmp_path / "DATA").items())[:20]:
        written = tmp_path / "DATA" / split / str(label) / name
        assert written.stat().st_ino != (images / name).stat().st_ino
        assert written.stat().st_nlink == 1
        assert written.read_bytes() == (images / name).read_bytes()


# ---------------------------------------------------------------------------------------------
# The output folder: refuse, force, fall back to copies, atomic on interruption


def test_refuses_non_empty_out_without_force(tmp_path):
    csv_path, images = make_data(tmp_path, simple_rows())
    out = tmp_path / "DATA"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, images, out)
    assert "--force" in error_of(e) and str(out) in error_of(e)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_empty_existing_out_is_written_into_never_replaced(tmp_path, monkeypatch):
    """An empty --out may be a mount point: nothing can be renamed onto it or remove it, so the
    split is built inside it and its own folder stays (the same inode), with nothing left over."""
    csv_path, images = make_data(tmp_path, simple_rows())
    out = tmp_path / "DATA"
    out.mkdir()
    inode = out.stat().st_ino
    real_rename, real_rmdir = os.rename, os.rmdir

    def like_a_mount_point(src, dst, *args, **kwargs):
        if Path(dst) == out or Path(src) == out:
            raise OSError(16, "Device or resource busy")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", like_a_mount_point)
    run_main(csv_path, images, out)
    assert len(layout(out)) == 30 and out.stat().st_ino == inode
    assert sorted(p.name for p in out.iterdir()) == ["split.json", "test_data", "train_data", "validation_data"]
    assert not list(tmp_path.glob("DATA.*"))


def test_force_replaces_the_split_and_keeps_other_files(tmp_path):
    csv_path, images = make_data(tmp_path, simple_rows(40, 20))
    out = tmp_path / "DATA"
    run_main(csv_path, images, out, "--seed", "0")
    first = layout(out)
    (out / "notes.txt").write_text("mine")
    (out / "train_data" / "0" / "stale.jpg").write_bytes(b"old")  # must not survive --force
    run_main(csv_path, images, out, "--seed", "3", "--force")
    second = layout(out)
    assert set(second) == set(first) and second != first
    assert json.loads((out / "split.json").read_text())["seed"] == 3
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob("DATA.*"))  # no temp or trash folders left


def test_link_failure_falls_back_to_copy(tmp_path, monkeypatch, capsys):
    csv_path, images = make_data(tmp_path, simple_rows())

    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(tsd.os, "link", no_link)
    info = run_main(csv_path, images, tmp_path / "DATA")
    assert info["files"] == {"copy": 30}
    assert "hard links were not possible" in capsys.readouterr().out
    assert len(layout(tmp_path / "DATA")) == 30


def interrupt_after(n, monkeypatch):
    real_place, calls = tsd.place, []

    def place(src, dst, copy):
        calls.append(dst)
        if len(calls) > n:
            raise KeyboardInterrupt
        return real_place(src, dst, copy)

    monkeypatch.setattr(tsd, "place", place)
    return calls


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    csv_path, images = make_data(tmp_path, simple_rows())
    calls = interrupt_after(10, monkeypatch)
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, images, tmp_path / "DATA")
    assert e.value.code == 130 and len(calls) == 11
    assert not (tmp_path / "DATA").exists()
    assert not list(tmp_path.glob("DATA.*"))


def test_interrupted_force_run_keeps_the_old_split(tmp_path, monkeypatch):
    csv_path, images = make_data(tmp_path, simple_rows())
    out = tmp_path / "DATA"
    run_main(csv_path, images, out, "--seed", "0")
    before, split_json = layout(out), (out / "split.json").read_text()
    interrupt_after(5, monkeypatch)
    with pytest.raises(SystemExit):
        run_main(csv_path, images, out, "--seed", "1", "--force")
    assert layout(out) == before and (out / "split.json").read_text() == split_json
    assert not list(tmp_path.glob("DATA.*"))


@pytest.mark.parametrize("copy", [[], ["--copy"]])
def test_force_refuses_an_out_that_contains_the_image_folder(tmp_path, copy):
    out = tmp_path / "DATA"
    csv_path, images = make_data(out / "train_data", simple_rows())  # images in DATA/train_data/images
    (images / "notes.txt").write_text("mine, not in the CSV")
    before = sorted(p.name for p in images.iterdir())
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, images, out, "--force", *copy)
    assert "overlap" in error_of(e) and str(images) in error_of(e)
    assert sorted(p.name for p in images.iterdir()) == before


def test_force_refuses_an_out_inside_the_image_folder_also_through_a_symlink(tmp_path):
    csv_path, images = make_data(tmp_path, simple_rows())
    (tmp_path / "link").symlink_to(images)
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, images, tmp_path / "link" / "DATA", "--force")
    assert "overlap" in error_of(e)
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, tmp_path / "link", images, "--force")  # --images a symlink to --out
    assert "overlap" in error_of(e)
    assert not (images / "DATA").exists()


def test_symlinked_source_images_are_linked_to_the_real_file(tmp_path):
    csv_path, store = make_data(tmp_path, simple_rows())
    images = tmp_path / "links"
    images.mkdir()
    for path in store.iterdir():  # relative links, as in ../store/IMG_17.jpg
        (images / path.name).symlink_to(Path("..") / store.name / path.name)
    info = run_main(csv_path, images, tmp_path / "DATA")
    assert info["files"] == {"link": 30}
    for name, (split, label) in layout(tmp_path / "DATA").items():
        written = tmp_path / "DATA" / split / str(label) / name
        assert not written.is_symlink() and written.stat().st_ino == (store / name).stat().st_ino


def test_unreadable_source_image_is_named_not_the_output(tmp_path, monkeypatch):
    csv_path, images = make_data(tmp_path, simple_rows())
    locked, real_copy = os.path.realpath(images / "IMG_0007.jpg"), shutil.copy2

    def copy2(src, dst):
        if src == locked:  # what a chmod 000 file gives a user who is not root
            raise PermissionError(13, "Permission denied", src)
        return real_copy(src, dst)

    monkeypatch.setattr(tsd.shutil, "copy2", copy2)
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, images, tmp_path / "DATA", "--copy")
    message = error_of(e)
    assert message.startswith(f"to_subdirectories.py: error: --images: cannot read {locked} (Permission denied)")
    assert "--out" not in message
    assert not (tmp_path / "DATA").exists() and not list(tmp_path.glob("DATA.*"))


def test_a_partial_split_of_a_killed_run_is_removed_and_one_still_running_kept(tmp_path):
    csv_path, images = make_data(tmp_path, simple_rows())
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    dead = tmp_path / f"DATA.partial-{killed.pid}"
    (dead / "train").mkdir(parents=True)  # kill -9 while the split was being built beside --out
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    alive = tmp_path / f"DATA.partial-{running.pid}"
    alive.mkdir()
    try:
        run_main(csv_path, images, tmp_path / "DATA")
        assert not dead.exists() and alive.is_dir() and (tmp_path / "DATA" / "split.json").is_file()
    finally:
        running.kill()
        running.wait()


def test_sigterm_removes_the_unfinished_split_and_restores_the_handler(tmp_path, monkeypatch, capsys):
    csv_path, images = make_data(tmp_path, simple_rows())
    real_place, calls = tsd.place, []

    def place(src, dst, copy):
        calls.append(dst)
        if len(calls) == 5:
            assert list(tmp_path.glob("DATA.partial-*"))  # the folder a SIGTERM used to leave behind
            signal.raise_signal(signal.SIGTERM)  # the real signal, to the script's own handler
        return real_place(src, dst, copy)

    def not_handled(signum, frame):  # instead of the default action, which would end pytest too
        raise AssertionError("to_subdirectories.py does not handle SIGTERM")

    monkeypatch.setattr(tsd, "place", place)
    before = signal.signal(signal.SIGTERM, not_handled)
    try:
        with pytest.raises(SystemExit) as e:
            run_main(csv_path, images, tmp_path / "DATA")
        assert signal.getsignal(signal.SIGTERM) is not_handled
    finally:
        signal.signal(signal.SIGTERM, before)
    assert e.value.code == 128 + signal.SIGTERM and len(calls) == 5
    assert "removed the unfinished split" in capsys.readouterr().err
    assert not (tmp_path / "DATA").exists() and not list(tmp_path.glob("DATA.*"))


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_images_are_reported_and_skipped(tmp_path, capsys):
    rows = simple_rows(30, 10)
    csv_path, images = make_data(tmp_path, rows)
    gone = ["IMG_0003", "IMG_0007", "IMG_0011", "IMG_0013", "IMG_0017", "IMG_0019", "IMG_0031"]
    for name in gone:
        (images / f"{name}.jpg").unlink()
    info = run_main(csv_path, images, tmp_path / "DATA")
    printed = capsys.readouterr().out
    assert "7 of 40 images" in printed and "IMG_0003.jpg" in printed and "(2 more)" in printed
    assert set(layout(tmp_path / "DATA")) == {f"{r[0]}.jpg" for r in rows} - {f"{n}.jpg" for n in gone}
    assert info["skipped"]["missing_images"] == 7


def test_all_images_missing_is_an_error_with_a_hint(tmp_path):
    csv_path, images = make_data(tmp_path, simple_rows(), create=False)
    (images / "image").mkdir()
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, images, tmp_path / "DATA")
    message = error_of(e)
    assert "none of the images" in message and "did you mean --images" in message
    assert not (tmp_path / "DATA").exists()


@pytest.mark.parametrize("header, missing", [(("name", "target"), "isic_id"), (("isic_id", "label"), "target")])
def test_missing_columns(tmp_path, header, missing):
    csv_path, images = make_data(tmp_path, simple_rows(), header=header)
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, images, tmp_path / "DATA")
    message = error_of(e)
    assert missing in message and "found " + ", ".join(header) in message
    assert "isic_id (or image_name) and target" in message


def test_image_name_column_crlf_bom_and_blank_cells(tmp_path):
    """The original ISIC 2020 train.csv: image_name, patient_id, CRLF, blank cells; plus a BOM."""
    rows = [(f"ISIC_{i}", f"IP_{i // 3}", "" if i % 4 else "male", "", i >= 24) for i in range(36)]
    csv_path, images = make_data(tmp_path, [(n, p, s, a, int(t)) for n, p, s, a, t in rows],
                                 header=("image_name", "patient_id", "sex", "age_approx", "target"))
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    info = run_main(csv_path, images, tmp_path / "DATA")
    placed = layout(tmp_path / "DATA")
    assert len(placed) == 36 and info["grouping"] == "patient_id" and info["patients"] == 12
    patient_split = {}
    for name, patient, *_ in rows:
        assert patient_split.setdefault(patient, placed[name + ".jpg"][0]) == placed[name + ".jpg"][0]


def test_blank_patient_ids_are_their_own_group(tmp_path, capsys):
    rows = [(f"A_{i}", f"P{i // 2}" if i % 5 else "", int(i >= 40)) for i in range(60)]
    csv_path, images = make_data(tmp_path, rows, header=("isic_id", "patient_id", "target"))
    info = run_main(csv_path, images, tmp_path / "DATA")
    assert "12 images have a blank patient_id" in capsys.readouterr().out
    placed = layout(tmp_path / "DATA")
    assert len(placed) == 60 and info["grouping"] == "patient_id"
    splits = defaultdict(set)
    for name, patient, _ in rows:
        if patient:
            splits[patient].add(placed[name + ".jpg"][0])
    assert all(len(s) == 1 for s in splits.values())


def test_duplicates_kept_once(tmp_path, capsys):
    rows = simple_rows() + [("IMG_0001", 0), ("IMG_0002", 1), ("IMG_0002.jpg", 0)]
    csv_path, images = make_data(tmp_path, rows)
    info = run_main(csv_path, images, tmp_path / "DATA")
    printed = capsys.readouterr().out
    assert "3 duplicate rows" in printed and "IMG_0001" in printed
    assert "differs from the first row for 1 of those duplicates: IMG_0002" in printed and "IMG_0002" in printed
    placed = layout(tmp_path / "DATA")
    assert len(placed) == 30 and placed["IMG_0002.jpg"][1] == 0  # the first row wins
    assert info["skipped"]["duplicates"] == 3


def test_bad_targets_reported_and_skipped(tmp_path, capsys):
    bad = [("BAD_0", ""), ("BAD_1", "nan"), ("BAD_2", "2"), ("BAD_3", "malignant"), ("BAD_4", "-1"),
           ("BAD_5", "NaN"), ("BAD_6", "0.5")]
    rows = simple_rows() + [("GOOD_0", "1.0"), ("GOOD_1", " 0 ")] + bad
    csv_path, images = make_data(tmp_path, rows)
    info = run_main(csv_path, images, tmp_path / "DATA")
    printed = capsys.readouterr().out
    assert "7 rows" in printed and "target is not 0 or 1" in printed and "BAD_0 (target='')" in printed
    placed = layout(tmp_path / "DATA")
    assert len(placed) == 32 and placed["GOOD_0.jpg"][1] == 1 and placed["GOOD_1.jpg"][1] == 0
    assert not any(name.startswith("BAD") for name in placed)
    assert info["skipped"]["bad_targets"] == 7


def test_names_leaving_the_image_folder_are_skipped(tmp_path, capsys):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"do not copy")
    bad = [("../secret", 0), (str(secret), 1), ("sub/x", 0), ("sub\\x", 1), ("..", 0), ("", 1), (".hidden", 0)]
    csv_path, images = make_data(tmp_path, simple_rows() + bad)
    (images / "sub").mkdir()
    (images / "sub" / "x.jpg").write_bytes(b"x")
    run_main(csv_path, images, tmp_path / "DATA")
    printed = capsys.readouterr().out
    assert "7 rows" in printed and "'../secret'" in printed and "is a path" in printed
    placed = layout(tmp_path / "DATA")
    assert len(placed) == 30 and "secret.jpg" not in placed and "x.jpg" not in placed


def test_nothing_usable_is_an_error(tmp_path):
    csv_path, images = make_data(tmp_path, [("../a", 0), ("B", "x"), ("C", "")])
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, images, tmp_path / "DATA")
    assert "no usable rows" in error_of(e)
    assert not (tmp_path / "DATA").exists()


@pytest.mark.parametrize("content, expected", [(b"", "is empty"), (b"\r\n\r\n", "is empty"),
                                               (b"isic_id,target\r\n", "no rows"),
                                               (b"\xff\xfei\x00s\x00", "not UTF-8")])
def test_empty_or_unreadable_csv(tmp_path, content, expected):
    csv_path, images = make_data(tmp_path, simple_rows())
    csv_path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, images, tmp_path / "DATA")
    assert expected in error_of(e) and "--csv" in error_of(e)


def test_missing_csv_and_missing_images_folder(tmp_path):
    csv_path, images = make_data(tmp_path, simple_rows())
    with pytest.raises(SystemExit) as e:
        run_main(tmp_path / "nope.csv", images, tmp_path / "DATA")
    assert "--csv" in error_of(e) and "nope.csv" in error_of(e) and "no such file" in error_of(e)
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, tmp_path / "no_images", tmp_path / "DATA")
    assert "--images" in error_of(e) and "no_images" in error_of(e)
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, images, csv_path)
    assert "--out" in error_of(e) and "is a file" in error_of(e)


@pytest.mark.parametrize("n_benign, n_malignant, cls", [
    (20, 2, "class 1 (malignant)"), (1, 20, "class 0 (benign)"), (20, 0, "class 1 (malignant)")])
def test_too_few_images_of_a_class(tmp_path, n_benign, n_malignant, cls):
    csv_path, images = make_data(tmp_path, simple_rows(n_benign, n_malignant))
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, images, tmp_path / "DATA")
    assert cls in error_of(e) and "at least one" in error_of(e)


def test_too_few_patients_of_a_class(tmp_path):
    # 10 malignant images but from only 2 patients: cannot give every split one
    rows = [(f"B{i}", f"P{i}", 0) for i in range(30)] + [(f"M{i}", f"Q{i % 2}", 1) for i in range(10)]
    csv_path, images = make_data(tmp_path, rows, header=("isic_id", "patient_id", "target"))
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, images, tmp_path / "DATA")
    assert "class 1 (malignant)" in error_of(e) and "of 2 patients" in error_of(e)


@pytest.mark.parametrize("ratios", [("0.7", "0.2", "0.2"), ("0.8", "0.2", "0"), ("1.2", "-0.1", "-0.1"),
                                    ("nan", "0.5", "0.5")])
def test_bad_ratios(tmp_path, ratios):
    csv_path, images = make_data(tmp_path, simple_rows())
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, images, tmp_path / "DATA", "--ratios", *ratios)
    assert "--ratios" in error_of(e) and "sum to 1" in error_of(e)


def test_other_ratios(tmp_path):
    csv_path, images = make_data(tmp_path, simple_rows(100, 40))
    info = run_main(csv_path, images, tmp_path / "DATA", "--ratios", "0.6", "0.2", "0.2")
    assert [info["counts"][s]["benign"] for s in SPLITS.values()] == [60, 20, 20]
    assert [info["counts"][s]["malignant"] for s in SPLITS.values()] == [24, 8, 8]


# ---------------------------------------------------------------------------------------------
# The command line


def test_command_line_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "to_subdirectories.py"), "--csv", str(tmp_path / "x.csv"),
                             "--images", str(tmp_path), "--out", str(tmp_path / "DATA")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"to_subdirectories.py: error: --csv {tmp_path / 'x.csv'}: no such file; "
        "point it at train-metadata.csv of the ISIC download"]


def test_help_documents_every_flag(parse_help, capsys):
    with pytest.raises(SystemExit) as e:
        tsd.parse_args(["--help"])
    assert e.value.code == 0
    entries = parse_help(capsys.readouterr().out)
    assert set(entries) == {"--help", "--csv", "--images", "--out", "--split-column", "--ratios", "--seed", "--copy",
                            "--force"}
    undocumented = [flag for flag, text in entries.items() if len(text.split()) < 3]
    assert undocumented == []
    # the defaults a user relies on are stated where they apply
    assert "(default: train-metadata.csv)" in entries["--csv"] and "(default: DATA)" in entries["--out"]
    assert "(default: 0.7 0.15 0.15" in entries["--ratios"] and "(default: 0)" in entries["--seed"]


# ---------------------------------------------------------------------------------------------
# An official split column (ISIC 2017, HAM10000)


def official_counts(out):
    """{split folder: (benign, malignant)} of a written split; only the folders that exist."""
    return {split: tuple(len(list((out / split / str(label)).iterdir())) for label in (0, 1))
            for split in SPLITS.values() if (out / split).is_dir()}


@pytest.mark.parametrize("name, expected", [
    # ISIC 2017's published train split is 1626 + 374: 7 of its images are near copies of validation or
    # test images (5 of test, 2 of validation), left out
    ("isic2017", {"train_data": (1622, 371), "validation_data": (120, 30), "test_data": (483, 117)}),
    ("ham10000", {"train_data": (6231, 779), "validation_data": (1336, 167)}),
])
def test_official_split_column_gives_the_published_counts(name, expected, tmp_path, capsys):
    source = SHARED / name
    if not (source / "labels.csv").is_file():
        pytest.skip(f"{source} not available")
    out = tmp_path / name
    info = run_main(source / "labels.csv", source / "images", out)
    assert official_counts(out) == expected
    assert info["split_column"] == "split" and "seed" not in info
    printed = capsys.readouterr().out
    assert "using the split in column split" in printed
    if "test_data" not in expected:  # HAM10000's test split is held out: said, and no empty folder
        assert "no test_data images" in printed and not (out / "test_data").exists()


def test_split_column_values_are_mapped_and_bad_ones_reported(tmp_path, capsys):
    rows = [(f"IMG_{i}", i % 2, split) for i, split in
            enumerate(["train"] * 6 + ["Validation"] * 4 + ["val"] * 2 + ["TEST"] * 4 + ["holdout", ""])]
    csv_path, images = make_data(tmp_path, rows, header=("isic_id", "target", "split"))
    out = tmp_path / "DATA"
    run_main(csv_path, images, out, "--ratios", "0.5", "0.25", "0.25")  # ratios do not apply
    placed = layout(out)
    assert {name: split for name, (split, _) in placed.items()} == {
        f"IMG_{i}.jpg": ("train_data" if i < 6 else "validation_data" if i < 12 else "test_data")
        for i in range(16)}
    assert "2 rows" in capsys.readouterr().out  # 'holdout' and blank: skipped, with a warning


def test_split_column_named_by_flag_and_missing_column_refused(tmp_path):
    rows = [(f"IMG_{i}", i % 2, "train" if i < 4 else "test") for i in range(8)]
    csv_path, images = make_data(tmp_path, rows, header=("isic_id", "target", "partition"))
    run_main(csv_path, images, tmp_path / "A", "--split-column", "partition")
    assert official_counts(tmp_path / "A") == {"train_data": (2, 2), "test_data": (2, 2)}
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, images, tmp_path / "B", "--split-column", "fold")
    assert "--split-column fold" in error_of(e)


def test_split_column_that_leaves_a_split_without_a_class_is_refused(tmp_path):
    rows = [("IMG_0", 0, "train"), ("IMG_1", 1, "train"), ("IMG_2", 0, "test"), ("IMG_3", 0, "test")]
    csv_path, images = make_data(tmp_path, rows, header=("isic_id", "target", "split"))
    with pytest.raises(SystemExit) as e:
        run_main(csv_path, images, tmp_path / "DATA")
    assert "test_data without malignant" in error_of(e)
    assert not (tmp_path / "DATA").exists()


# ---------------------------------------------------------------------------------------------
# Near copies across splits


def test_a_training_near_copy_of_a_test_image_is_left_out_and_every_cross_split_copy_counted(tmp_path, capsys):
    from synthetic import make_synthetic
    from PIL import Image

    lesions = tmp_path / "lesions"
    make_synthetic(lesions, size=96, seed=1, counts={"test": (6, 6)})
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(lesions.rglob("*.jpg")):
        shutil.copy(path, images / path.name)
    benign, malignant = (sorted(p.stem for p in images.glob(f"SYN_test_{label}_*")) for label in (0, 1))
    split = ["train"] * 3 + ["val"] * 1 + ["test"] * 2  # per class
    rows = [(name, label, s) for label, names in enumerate((benign, malignant)) for name, s in zip(names, split)]
    test_image, val_image = next(r[0] for r in rows if r[2] == "test"), next(r[0] for r in rows if r[2] == "val")
    # a resized, re-encoded copy of a test image in train, and an exact copy of a validation image in test
    Image.open(images / f"{test_image}.jpg").resize((80, 60)).save(images / "COPY_train.jpg", quality=70)
    shutil.copy(images / f"{val_image}.jpg", images / "COPY_test.jpg")
    target = {r[0]: r[1] for r in rows}
    rows += [("COPY_train", target[test_image], "train"), ("COPY_test", target[val_image], "test")]
    csv_path = tmp_path / "meta.csv"
    csv_path.write_text("isic_id,target,split\n" + "".join(f"{n},{t},{s}\n" for n, t, s in rows))
    info = run_main(csv_path, images, tmp_path / "DATA")
    out = capsys.readouterr().out
    assert info["near_copies"]["pairs"] == {"train_data/validation_data": 0, "train_data/test_data": 1,
                                            "validation_data/test_data": 1}
    assert info["near_copies"]["left_out_of_train"] == ["COPY_train.jpg"]
    assert "COPY_train.jpg" not in layout(tmp_path / "DATA") and "COPY_test.jpg" in layout(tmp_path / "DATA")
    assert info["counts"]["train_data"]["total"] == 6
    assert "left out of train_data: 1 image(s)" in out and "train_data/test_data 1" in out
    saved = json.loads((tmp_path / "DATA" / "split.json").read_text())
    assert saved["near_copies"]["left_out_of_train"] == ["COPY_train.jpg"]


def test_ids_stored_with_another_image_extension_are_used_and_said(tmp_path, capsys):
    rows = simple_rows(6, 4)
    csv_path, images = make_data(tmp_path, rows)
    renamed = {"IMG_0001": "IMG_0001.JPG", "IMG_0002": "IMG_0002.jpeg", "IMG_0007": "IMG_0007.png"}
    for stem, name in renamed.items():
        (images / f"{stem}.jpg").rename(images / name)
    info = run_main(csv_path, images, tmp_path / "DATA")
    placed = layout(tmp_path / "DATA")
    assert len(placed) == 10 and set(renamed.values()) <= set(placed) and info["skipped"]["missing_images"] == 0
    assert "note: 3 image(s) of the CSV are stored with another extension" in capsys.readouterr().out
