"""Make the demo's real lesions: a seeded subset of the ISIC 2017 challenge (CC-0) at 128 px.

    python assets/make_demo_data.py --source ../shared/data/isic2017 [--out FOLDER]

writes assets/isic2017_demo/{train,validation,test}_data/{0,1}/<isic_id>.jpg (the challenge's own
split: training images from its train split, and so on) beside its LICENSE.md. `make demo`
trains on it; the folder is committed, so nobody needs to run this.
"""
import csv
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent / "isic2017_demo"
sys.path.insert(0, str(OUT.parents[1]))  # the repository root, for config.py
from config import make_parser  # noqa: E402
# (benign, malignant) images per split, drawn from the challenge split of the same name
COUNTS = {"train": (200, 100), "val": (70, 30), "test": (120, 80)}
FOLDERS = {"train": "train_data", "val": "validation_data", "test": "test_data"}
SIDE, QUALITY = 128, 90

LICENSE = """# ISIC 2017 demo subset

{total} dermoscopic images of the ISIC 2017 challenge, part 3 (lesion classification), melanoma
(folder 1) against nevus and seborrheic keratosis (folder 0), resized to {side} x {side} px (JPEG
quality {quality}). Each image keeps its ISIC id and its place in the challenge's own split:

| folder | benign | melanoma | drawn from the challenge's |
| --- | ---: | ---: | --- |
{rows}

Drawn at random per class with seed 0 by `assets/make_demo_data.py`.

## Licence

The ISIC 2017 challenge images are released by the International Skin Imaging Collaboration
(ISIC Archive, https://www.isic-archive.com) under CC-0 1.0 (public domain dedication).

## Citation

Codella N. C. F., Gutman D., Celebi M. E., Helba B., Marchetti M. A., Dusza S. W., Kalloo A.,
Liopyris K., Mishra N., Kittler H., Halpern A. "Skin lesion analysis toward melanoma detection: a
challenge at the 2017 International Symposium on Biomedical Imaging (ISBI), hosted by the
International Skin Imaging Collaboration (ISIC)". ISBI 2018, pp. 168-172. arXiv:1710.05006.
"""


def demo_names(source):
    """{(split, target): the isic_ids labels.csv puts in that challenge split and class, sorted};
    a file that cannot serve the demo's COUNTS ends in one line."""
    path = source / "labels.csv"
    if not path.is_file():
        sys.exit(f"make_demo_data.py: error: --source {source}: no labels.csv there")
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        missing = {"isic_id", "split", "target"} - set(reader.fieldnames or ())
        if missing:
            sys.exit(f"make_demo_data.py: error: {path}: no {', '.join(sorted(missing))} column; "
                     f"it needs isic_id, split and target")
        rows = sorted(reader, key=lambda row: row["isic_id"])
    names = {(split, target): [row["isic_id"] for row in rows if row["split"] == split and row["target"] == str(target)]
             for split in COUNTS for target in (0, 1)}
    for (split, target), found in names.items():
        if len(found) < COUNTS[split][target]:
            sys.exit(f"make_demo_data.py: error: {path}: only {len(found)} of split {split}, target {target} "
                     f"(the demo draws {COUNTS[split][target]})")
    return names


def main(argv=None):
    p = make_parser("make_demo_data.py", __doc__, ("out",), defaults={"out": OUT},
                    helps={"out": "the folder to make (default assets/isic2017_demo)"})
    p.add_argument("--source", required=True, help="the ISIC 2017 folder: labels.csv and images/<isic_id>.jpg")
    args = p.parse_args(argv)
    source, out = Path(args.source), Path(args.out)
    if out.exists():
        sys.exit(f"make_demo_data.py: error: {out} exists; remove it first to make it again")
    names = demo_names(source)
    rng = np.random.default_rng(0)
    table = []
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")  # renamed to out once complete
    try:
        for split, counts in COUNTS.items():
            for target, count in enumerate(counts):
                folder = partial / FOLDERS[split] / str(target)
                folder.mkdir(parents=True)
                for name in rng.choice(names[split, target], count, replace=False):
                    path = source / "images" / f"{name}.jpg"
                    try:
                        with Image.open(path) as image:
                            image.convert("RGB").resize((SIDE, SIDE), Image.LANCZOS).save(folder / f"{name}.jpg",
                                                                                           quality=QUALITY)
                    except OSError as error:  # missing, truncated or not an image
                        sys.exit(f"make_demo_data.py: error: {path}: cannot be read ({error.__class__.__name__}); "
                                 f"re-download the ISIC 2017 images")
            table.append(f"| {FOLDERS[split]} | {counts[0]} | {counts[1]} | {split} split |")
        total = sum(sum(c) for c in COUNTS.values())
        (partial / "LICENSE.md").write_text(LICENSE.format(total=total, side=SIDE, quality=QUALITY,
                                                           rows="\n".join(table)))
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {total} images to {out}")


if __name__ == "__main__":
    main()
