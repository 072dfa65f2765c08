"""
Turn the ISIC 2020 download (a metadata CSV + a folder of images) into the split class folders
the rest of the project reads:

    DATA/{train_data,validation_data,test_data}/{0,1}/<name>.jpg     (0 benign, 1 malignant)
    DATA/split.json                                                  how the split was made

When the CSV has a split column (`split`, values train / val / test, as in ISIC 2017 and
HAM10000; --split-column names another) that official split is used. Otherwise the split is
drawn (stratified_split.py): 70/15/15 per class by default, grouped by patient (no patient in two
splits) when the CSV has a patient_id column; the Kaggle "256x256 RESIZED" metadata has none, so
then it is per image, and the script says so. Images are hard-linked (no extra disk space) unless
--copy is given or linking is impossible (another file system), in which case they are copied.
Near copies of one photo across splits (a perceptual hash, near_duplicates.py) are counted, and a
training image that is a near copy of a validation or test image is left out of train_data;
split.json lists them.

    python to_subdirectories.py --csv train-metadata.csv --images train-image/image --out DATA
"""

import csv
import glob
import json
import os
import shutil
import signal
from collections import Counter
from pathlib import Path

from cli import Interrupted, interrupts_raise, one_line_errors
from config import check_flags, make_parser
from dataset import CLASS_NAMES, SPLITS
from files import left_by_an_ended_process, overlaps
from near_duplicates import NEAR_BITS, leaks
from stratified_split import draw_split_names

NAME_COLUMNS = ("isic_id", "image_name")  # Kaggle metadata has isic_id, the ISIC 2020 csv image_name
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SHOW = 5  # how many example names a warning lists
# An official split column (ISIC 2017, HAM10000): its values, case-insensitive, -> our folders.
SPLIT_VALUES = {"train": SPLITS["train"], "training": SPLITS["train"], "val": SPLITS["validation"],
                "valid": SPLITS["validation"], "validation": SPLITS["validation"], "test": SPLITS["test"]}


def examples(items):
    shown = ", ".join(str(item) for item in items[:SHOW])
    return shown + (f", ... ({len(items) - SHOW} more)" if len(items) > SHOW else "")


# ---------------------------------------------------------------------------------------------
# Reading the CSV


def parse_target(value):
    """0 or 1 from '0', '1', '1.0', ' 1 '; None for anything else (blank, NaN, 2, 'malignant')."""
    try:
        number = float((value or "").strip())
    except ValueError:
        return None
    return int(number) if number in (0.0, 1.0) else None


def file_name(name):
    """The file on disk for a CSV name: '<name>.jpg' unless the name already has an image extension.
    None when the name could point outside the image folder (separators, '..', absolute, hidden)."""
    if not name or name.startswith(".") or "\0" in name or "/" in name or "\\" in name:
        return None
    if os.path.isabs(name) or os.path.splitdrive(name)[0]:  # 'C:x' on Windows
        return None
    return name if name.lower().endswith(IMAGE_EXTENSIONS) else name + ".jpg"


def read_csv(csv_path):
    """The header and the (line number, cells) records of the CSV; one-line errors if unreadable."""
    if not csv_path.is_file():
        raise ValueError(f"--csv {csv_path}: no such file; point it at train-metadata.csv of the ISIC download")
    try:
        # newline='' lets the csv module handle CRLF; utf-8-sig drops an Excel byte-order mark
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            records = [(reader.line_num, record) for record in reader]
    except UnicodeDecodeError:
        raise ValueError(f"--csv {csv_path}: not UTF-8 text; save it as a UTF-8 CSV")
    except (OSError, csv.Error) as e:
        raise ValueError(f"--csv {csv_path}: cannot read it ({e})")
    if not header or not any(value.strip() for value in header):
        raise ValueError(f"--csv {csv_path}: the file is empty; expected a header with isic_id (or image_name) "
                         f"and target")
    return header, records


def find_columns(header, csv_path):
    """(column names, {lower-case name: index}, the file name column). Columns are matched
    case-insensitively and without surrounding spaces; the first of two equal names wins."""
    columns = [value.strip() for value in header]
    index = {column.lower(): i for i, column in reversed(list(enumerate(columns)))}
    name_column = next((c for c in NAME_COLUMNS if c in index), None)
    if name_column is None or "target" not in index:
        hint = " (is it comma-separated?)" if len(columns) == 1 and any(s in columns[0] for s in ";\t") else ""
        raise ValueError(f"--csv {csv_path}: expected columns isic_id (or image_name) and target, "
                         f"found {', '.join(columns)}{hint}")
    return columns, index, name_column


def cell(record, index, column):
    """The stripped cell of a named (lower-case) column; '' when the column or the cell is absent."""
    i = index.get(column)
    return record[i].strip() if i is not None and i < len(record) else ""


def parse_rows(records, index, split_column, report):
    """The usable rows of the records; every skipped row is listed in report under its reason."""
    name_column, has_split = report["name_column"], report["split_column"] is not None
    rows, seen = [], {}
    for line, record in records:
        raw_name, raw_target = cell(record, index, name_column), cell(record, index, "target")
        name = file_name(raw_name)
        if name is None:
            report["bad_names"].append(f"line {line}: {raw_name!r}")
            continue
        target = parse_target(raw_target)
        if target is None:
            report["bad_targets"].append(f"{raw_name} (target={raw_target!r})")
            continue
        raw_split = cell(record, index, split_column.lower())
        split = SPLIT_VALUES.get(raw_split.lower()) if has_split else None
        if has_split and split is None:
            report["bad_splits"].append(f"{raw_name} ({split_column}={raw_split!r})")
            continue
        if name in seen:  # the same image twice: keep the first row
            report["duplicates"].append(raw_name)
            if seen[name] != target:
                report["conflicting_duplicates"].append(raw_name)
            continue
        seen[name] = target
        patient = cell(record, index, "patient_id") or None
        report["blank_patient_ids"] += report["has_patient_id"] and patient is None
        rows.append({"name": name, "target": target, "patient_id": patient, "split": split})
    return rows


def read_metadata(csv_path, split_column="split"):
    """Usable rows of the metadata CSV and a report of what was skipped and why.

    rows: [{"name": file name on disk, "target": 0 or 1, "patient_id": str, or None if blank,
            "split": a folder of SPLITS from the split column, or None when the CSV has none}]
    report: columns, name_column, has_patient_id, split_column (or None), rows_read and the
    lists of skipped rows.
    """
    csv_path = Path(csv_path)
    header, records = read_csv(csv_path)
    columns, index, name_column = find_columns(header, csv_path)
    records = [(line, record) for line, record in records if any(value.strip() for value in record)]
    if not records:
        raise ValueError(f"--csv {csv_path}: the file has a header but no rows")
    has_split = split_column.lower() in index
    report = {"columns": columns, "name_column": name_column, "has_patient_id": "patient_id" in index,
              "split_column": split_column.lower() if has_split else None,
              "rows_read": len(records), "bad_names": [], "bad_targets": [], "bad_splits": [], "duplicates": [],
              "conflicting_duplicates": [], "blank_patient_ids": 0}
    return parse_rows(records, index, split_column, report), report


def print_report(report, csv_path):
    if report["bad_names"]:
        print(f"warning: {len(report['bad_names'])} rows of {csv_path} skipped: the {report['name_column']} "
              f"is blank or is a path, not a file name: {examples(report['bad_names'])}")
    if report["bad_targets"]:
        print(f"warning: {len(report['bad_targets'])} rows of {csv_path} skipped: target is not 0 or 1: "
              f"{examples(report['bad_targets'])}")
    if report["bad_splits"]:
        print(f"warning: {len(report['bad_splits'])} rows of {csv_path} skipped: {report['split_column']} is not "
              f"train, val/validation or test: {examples(report['bad_splits'])}")
    if report["duplicates"]:
        print(f"warning: {len(report['duplicates'])} duplicate rows in {csv_path}, each image kept once "
              f"(first row wins): {examples(report['duplicates'])}")
    if report["conflicting_duplicates"]:
        print(f"warning: the target differs from the first row for {len(report['conflicting_duplicates'])} "
              f"of those duplicates: {examples(report['conflicting_duplicates'])}")


# ---------------------------------------------------------------------------------------------
# Splitting


def check_splittable(labels, groups, n_splits):
    """Every split needs at least one image (and one patient) of every class."""
    for c, class_name in enumerate(CLASS_NAMES):
        images = sum(1 for label in labels if label == c)
        patients = len({g for g, label in zip(groups, labels) if label == c}) if groups is not None else images
        if images < n_splits or patients < n_splits:
            of = f" of {patients} patients" if groups is not None else ""
            raise ValueError(f"class {c} ({class_name}) has only {images} usable images{of}; each of the {n_splits} "
                             f"splits needs at least one, so add more {class_name} images to the CSV and image folder")


def draw_split(rows, labels, grouped, has_patient_id, ratios, seed, csv_path):
    """The split of each row, drawn per class by ratio (grouped by patient when possible)."""
    if grouped:
        # An image without a patient id is its own group: it cannot share a patient with anything.
        groups = [row["patient_id"] or f"\0image:{row['name']}" for row in rows]
        blanks = sum(row["patient_id"] is None for row in rows)
        if blanks:
            print(f"note: {blanks:,} images have a blank patient_id; each is treated as a patient of its own")
    else:
        groups = None
        why = "an empty patient_id column" if has_patient_id else "no patient_id column"
        print(f"note: {csv_path} has {why}, so the split falls back to a per-image split "
              f"(images of one patient may end up in different splits)")
    check_splittable(labels, groups, len(SPLITS))
    n_patients = len({g for g in groups if not g.startswith("\0")}) if grouped else None
    print(f"splitting {len(rows):,} images" + (f" of {n_patients:,} patients" if grouped else "")
          + f" {'/'.join(f'{r:g}' for r in ratios)} per class, "
          + ("grouped by patient_id" if grouped else "per image") + f", seed {seed}")
    return draw_split_names(labels, groups, ratios, seed)


# ---------------------------------------------------------------------------------------------
# Writing the folders


class UnreadableSource(Exception):
    """A source image that cannot be read: the fault is in --images, not in --out."""


def place(src, dst, copy):
    """Hard-link src to dst (no extra disk space), or copy when asked or when linking fails
    (another file system, no permission, too many links). Returns 'link' or 'copy'.
    A symlinked source is resolved first: linking the link itself would leave a dangling link."""
    src = os.path.realpath(src)
    if not copy:
        try:
            os.link(src, dst)
            return "link"
        except OSError:
            pass
    try:
        shutil.copy2(src, dst)
    except OSError as error:
        if error.filename == src:
            raise UnreadableSource(src, error.strerror or str(error)) from None
        raise
    return "copy"


def remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def move_into_place(tmp, out):
    """Publish the finished split. A fresh --out is one rename. An existing one (empty, or with
    --force; perhaps a mount point, which nothing can be renamed onto) keeps its own folder: it
    loses split.json first, so a run cut short here never leaves a split that looks complete;
    only the split folders and split.json are replaced, anything else in --out is left alone."""
    if not out.exists():
        os.rename(tmp, out)
        return
    trash = out / f".old-{os.getpid()}"  # inside --out: on its file system, even when it is a mount point
    remove(trash)
    trash.mkdir()
    try:
        if (out / "split.json").exists():
            os.rename(out / "split.json", trash / "split.json")
        for split in SPLITS.values():
            if (out / split).exists() or (out / split).is_symlink():
                os.rename(out / split, trash / split)
            if (tmp / split).exists():  # an official split may lack one (HAM10000 has no test)
                os.rename(tmp / split, out / split)
        os.rename(tmp / "split.json", out / "split.json")
    finally:
        remove(trash)
    remove(tmp)


def print_table(counts, grouped, n_patients):
    print(f"{'split':<16}{'benign':>9}{'malignant':>11}{'total':>9}{'patients':>10}")
    total = {key: sum(c[key] for c in counts.values()) for key in ("benign", "malignant", "total")}
    for split, c in [*counts.items(), ("total", {**total, "patients": n_patients})]:
        patients = f"{c['patients']:,}" if grouped else "-"
        print(f"{split:<16}{c['benign']:>9,}{c['malignant']:>11,}{c['total']:>9,}{patients:>10}")


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv):
    parser = make_parser(
        "to_subdirectories.py", "Split the ISIC 2020 images into DATA/{train_data,validation_data,test_data}/{0,1}/ "
                                "(0 benign, 1 malignant), per class and grouped by patient.",
        ("out", "seed", "force"), defaults={"out": "DATA"},
        helps={"out": "output folder for the split class folders and split.json",
               "seed": "random seed of the split; the same seed and CSV give the same split",
               "force": "write into a non-empty --out, replacing its train_data, validation_data, test_data and "
                        "split.json (other files there are left alone)"})
    parser.add_argument("--csv", default="train-metadata.csv",
                        help="metadata CSV with an isic_id (or image_name) column and a 0/1 target column; "
                             "a patient_id column makes the split patient-grouped (default: %(default)s)")
    parser.add_argument("--images", default="train-image/image",
                        help="folder holding <isic_id>.jpg for every row of the CSV (default: %(default)s)")
    parser.add_argument("--split-column", default=None, metavar="NAME",
                        help="CSV column holding an official split (values train, val/validation, test): "
                             "used instead of drawing one; default: a column named 'split' when there is one")
    parser.add_argument("--ratios", type=float, nargs=3, default=[0.7, 0.15, 0.15],
                        metavar=("TRAIN", "VAL", "TEST"),
                        help="fractions of every class for train, validation and test; each > 0, summing "
                             "to 1 (default: 0.7 0.15 0.15, as in the study)")
    parser.add_argument("--copy", action="store_true",
                        help="copy the images instead of hard-linking them (hard links share the file "
                             "with --images: no extra disk space, but editing one edits the other)")
    return parser.parse_args(argv)


def checked_ratios(args):
    """The three ratios as floats; --ratios and --seed checked."""
    ratios = [float(r) for r in args.ratios]
    if not all(r > 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:  # 'r > 0' is False for NaN too
        raise ValueError(f"--ratios {' '.join(f'{r:g}' for r in ratios)}: need three fractions > 0 that sum to 1, "
                         f"e.g. --ratios 0.7 0.15 0.15")
    check_flags(args, ("seed",))
    return ratios


def output_folder(out):
    """--out made absolute without following a symlinked --out, then the symlink resolved: the
    temp folder must sit next to (or inside) the real folder."""
    out = Path(os.path.abspath(out))
    return out.resolve() if out.is_symlink() else out


def check_folders(images, out, force):
    """--images exists, --out is a folder (or absent) apart from --images and empty unless --force."""
    if not images.is_dir():
        raise ValueError(f"--images {images}: no such folder; point it at the folder with the .jpg files "
                         f"(train-image/image in the Kaggle download)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder; choose another --out")
    # --force replaces folders in --out: never where the source images are, nor inside their folder;
    # without it, only a new --out inside the image folder is harmless
    if overlaps(images, out) and (force or images.resolve() not in out.resolve().parents):
        raise ValueError(f"--out {out} and --images {images} overlap (one folder is inside the other), so --force "
                         f"could delete source images; choose an --out outside the image folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out}: folder is not empty; pass --force to replace the split in it, "
                         f"or choose another --out")


def read_rows(csv_path, split_column):
    """The usable rows of the CSV and the report on it (printed); split_column is the
    --split-column flag (None: use a column named 'split' when there is one)."""
    rows, report = read_metadata(csv_path, split_column or "split")
    if split_column and not report["split_column"]:
        raise ValueError(f"--split-column {split_column}: {csv_path} has no such column (it has "
                         f"{', '.join(report['columns'])}); name another or leave the flag out to draw a split")
    print(f"{csv_path}: {report['rows_read']:,} rows, file name column {report['name_column']}")
    print_report(report, csv_path)
    if not rows:
        raise ValueError(f"--csv {csv_path}: no usable rows left (see the warnings above); "
                         f"every row needs a file name and a target of 0 or 1")
    return rows, report


def keep_rows_on_disk(rows, images, csv_path):
    """(the rows whose image is in the folder, the names of the missing images). A CSV id names
    the file <id>.jpg; where that is missing but one file <id> with another image extension is
    there (.JPG, .jpeg, .png), that file is used, and a line says how many."""
    try:
        on_disk = {entry.name for entry in os.scandir(images) if entry.is_file()}
    except OSError as e:
        raise ValueError(f"--images {images}: cannot list the folder ({e})")
    by_stem = {}
    for name in on_disk:
        stem, extension = os.path.splitext(name)
        if extension.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(stem, []).append(name)
    renamed = 0
    for row in rows:
        others = by_stem.get(os.path.splitext(row["name"])[0], [])
        if row["name"] not in on_disk and len(others) == 1:
            row["name"], renamed = others[0], renamed + 1
    if renamed:
        print(f"note: {renamed:,} image(s) of the CSV are stored with another extension (e.g. .JPG, .png); "
              f"those files are used")
    missing = [row["name"] for row in rows if row["name"] not in on_disk]
    if missing:
        print(f"warning: {len(missing):,} of {len(rows):,} images of the CSV are not in {images}, skipped: "
              f"{examples(missing)}")
        rows = [row for row in rows if row["name"] in on_disk]
    if not rows:
        hint = f" (did you mean --images {images / 'image'}?)" if (images / "image").is_dir() else ""
        raise ValueError(f"--images {images}: none of the images listed in {csv_path} is there{hint}; "
                         f"expected files like {images / missing[0]}")
    return rows, missing


def assign_splits(rows, report, grouped, ratios, seed, csv_path):
    """The split of each row: the CSV's own split column when it has one, else drawn here,
    grouped by patient when the CSV says who the patient is, else per image."""
    if report["split_column"]:
        print(f"using the split in column {report['split_column']} of {csv_path} (--ratios and --seed do not apply)")
        return [row["split"] for row in rows]
    labels = [row["target"] for row in rows]
    return draw_split(rows, labels, grouped, report["has_patient_id"], ratios, seed, csv_path)


def find_near_copies(rows, assignment, images):
    """(assignment without the training images that are near copies of a validation or test image,
    report): a patient-grouped split cannot see two files of one photo under two patients or
    names, and an official split may hold such copies itself (ISIC 2017 does). The report counts
    the near copies between each two splits (near_duplicates.leaks) and names the training images
    left out."""
    paths = [os.path.join(images, row["name"]) for row in rows]
    members = {split: [i for i, s in enumerate(assignment) if s == split] for split in SPLITS.values()}
    found = leaks({split: ([paths[i] for i in indices], [rows[i]["target"] for i in indices])
                   for split, indices in members.items()})
    folders = list(SPLITS.values())
    pairs = {f"{first}/{second}": 0 for i, first in enumerate(folders) for second in folders[i + 1:]}
    row_of, left_out = {path: i for i, path in enumerate(paths)}, set()
    for what, path, _, _ in found:
        if what in pairs:  # across splits; "both classes in ..." is train.py's to say
            pairs[what] += 1
            if what.startswith(f"{SPLITS['train']}/"):
                left_out.add(row_of[path])
    names = sorted(rows[i]["name"] for i in left_out)
    if any(pairs.values()):
        counts = ", ".join(f"{name} {n}" for name, n in pairs.items() if n)
        print(f"near copies across splits (perceptual hashes within {NEAR_BITS} of 256 bits): {counts}")
    if names:
        print(f"left out of train_data: {len(names)} image(s) that are near copies of validation or test images, "
              f"so no evaluated lesion is trained on (listed in split.json): {examples(names)}")
    assignment = [None if i in left_out else split for i, split in enumerate(assignment)]
    return assignment, {"max_bits": NEAR_BITS, "pairs": pairs, "left_out_of_train": names}


def count_splits(rows, assignment, grouped, from_column, csv_path, out):
    """{split: benign, malignant, total and patients (None unless grouped)} of every split that
    has images; a split without one of the classes is an error."""
    labels = [row["target"] for row in rows]
    counts = {}
    for split in SPLITS.values():
        members = [i for i, s in enumerate(assignment) if s == split]
        if not members:
            print(f"note: no {split} images in {csv_path}; {out / split} is not created")
            continue
        c = Counter(labels[i] for i in members)
        patients = len({rows[i]["patient_id"] for i in members} - {None}) if grouped else None
        counts[split] = {"benign": c[0], "malignant": c[1], "total": len(members), "patients": patients}
        for label, class_name in enumerate(CLASS_NAMES):
            if c[label] == 0:
                fix = ("the CSV's split column puts none there; fix the column" if from_column else
                       f"the class has only {labels.count(label)}; add more {class_name} images or change "
                       f"--ratios or --seed")
                raise ValueError(f"the split left {split} without {class_name} images ({fix})")
    return counts


def split_info(args, ratios, report, grouped, counts, n_patients, n_missing):
    """What split.json records; "files" (how many were linked or copied) is filled in by write_split."""
    drawn = {"seed": args.seed, "ratios": dict(zip(SPLITS.values(), ratios)),
             "grouping": "patient_id" if grouped else "image"}
    return {**({"split_column": report["split_column"]} if report["split_column"] else drawn),
            "source_csv": str(Path(args.csv).resolve()), "images": str(Path(args.images).resolve()),
            "counts": counts, "patients": n_patients, "files": {},
            "skipped": {"missing_images": n_missing, "bad_names": len(report["bad_names"]),
                        "bad_targets": len(report["bad_targets"]), "bad_splits": len(report["bad_splits"]),
                        "duplicates": len(report["duplicates"])}}


def place_images(tmp, rows, assignment, splits, images, copy):
    """Link or copy every row's image into tmp/<split>/<label>/; how many of each, as a Counter."""
    methods = Counter()
    folders = {(split, label): tmp / split / str(label) for split in splits for label in (0, 1)}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for row, split in zip(rows, assignment):  # os.path.join: pathlib costs a second per 33k files
        if split is None:  # left out (find_near_copies)
            continue
        src = os.path.join(images, row["name"])
        dst = os.path.join(folders[split, row["target"]], row["name"])
        methods[place(src, dst, copy)] += 1
    return methods


def write_split(out, rows, assignment, images, copy, info, csv_path):
    """Build the split and split.json in a temp folder next to --out (inside it, when it exists),
    then move it into place, so an interrupted run never leaves a half-written split that looks
    complete. Sets info["files"]; returns the Counter of linked and copied images."""
    tmp = out / f".partial-{os.getpid()}" if out.is_dir() else out.parent / f"{out.name}.partial-{os.getpid()}"
    leftovers = out.glob(".partial-*") if out.is_dir() else out.parent.glob(f"{glob.escape(out.name)}.partial-*")
    for leftover in leftovers:  # from a run killed with SIGKILL; not one still running
        if left_by_an_ended_process(leftover, ".partial-"):
            remove(leftover)
    with interrupts_raise():  # Ctrl-C and SIGTERM (kill, a job scheduler) alike; a second one cannot cut the clean-up
        try:
            remove(tmp)
            methods = place_images(tmp, rows, assignment, info["counts"], images, copy)
            info["files"] = dict(methods)
            (tmp / "split.json").write_text(json.dumps(info, indent=2) + "\n")
            move_into_place(tmp, out)
        except KeyboardInterrupt as interrupt:  # a signal (cli.Interrupted) or Ctrl-C: one_line_errors says so
            remove(tmp)
            stopped = interrupt if isinstance(interrupt, Interrupted) else Interrupted(signal.SIGINT)
            stopped.note = f"removed the unfinished split (--out {out})"
            raise stopped from None
        except UnreadableSource as e:
            remove(tmp)
            source, reason = e.args
            raise ValueError(f"--images: cannot read {source} ({reason}); fix its permissions, or remove its row "
                             f"from {csv_path}")
        except OSError as e:
            remove(tmp)
            raise ValueError(f"--out {out}: cannot write the split ({e}); check the free space and permissions there")
        except BaseException:
            remove(tmp)
            raise
    return methods


def print_summary(out, methods, copy, counts, grouped, n_patients):
    how = ", ".join(f"{n:,} {'hard-linked' if m == 'link' else 'copied'}" for m, n in sorted(methods.items()))
    if methods["copy"] and not copy:
        how += " (hard links were not possible here, e.g. another file system)"
    print(f"wrote {out} ({how}):")
    print_table(counts, grouped, n_patients)


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors("to_subdirectories.py", interrupts=False):  # write_split takes the signals
        return split(args)


def split(args):
    """Read the CSV, split its rows, and write the split folders and split.json."""
    ratios = checked_ratios(args)
    csv_path, images, out = Path(args.csv), Path(args.images), output_folder(args.out)
    check_folders(images, out, args.force)
    # 1. Read the CSV and keep the rows whose image is on disk.
    rows, report = read_rows(csv_path, args.split_column)
    rows, missing = keep_rows_on_disk(rows, images, csv_path)
    # 2. Split, and count what each split holds.
    grouped = report["has_patient_id"] and any(row["patient_id"] for row in rows)
    assignment = assign_splits(rows, report, grouped, ratios, args.seed, csv_path)
    assignment, near_copies = find_near_copies(rows, assignment, images)
    n_patients = len({row["patient_id"] for row in rows} - {None}) if grouped else None
    counts = count_splits(rows, assignment, grouped, report["split_column"], csv_path, out)
    # 3. Write the folders and split.json.
    info = split_info(args, ratios, report, grouped, counts, n_patients, len(missing))
    info["near_copies"] = near_copies
    methods = write_split(out, rows, assignment, images, args.copy, info, csv_path)
    print_summary(out, methods, args.copy, counts, grouped, n_patients)
    return info


if __name__ == "__main__":
    main()
