"""Make the demo's real lesions: a seeded subset of the ISIC 2017 challenge (CC-0) at 128 px.

    python assets/make_demo_data.py --source ../shared/data/isic2017

writes assets/isic2017_demo/{train,validation,test}_data/{0,1}/<isic_id>.jpg (the challenge's own
split: training images from its train split, and so on) beside its LICENSE.md. `make demo`
trains on it; the folder is committed, so nobody needs to run this.
"""
import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent / "isic2017_demo"
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="the ISIC 2017 folder: labels.csv and images/<isic_id>.jpg")
    args = p.parse_args(argv)
    source = Path(args.source)
    if not (source / "labels.csv").is_file():
        sys.exit(f"make_demo_data.py: error: --source {source}: no labels.csv there")
    if OUT.exists():
        sys.exit(f"make_demo_data.py: error: {OUT} exists; remove it first to make it again")
    with open(source / "labels.csv", newline="") as file:
        rows = sorted(csv.DictReader(file), key=lambda row: row["isic_id"])
    rng = np.random.default_rng(0)
    table = []
    for split, counts in COUNTS.items():
        for target, count in enumerate(counts):
            names = [row["isic_id"] for row in rows if row["split"] == split and int(row["target"]) == target]
            folder = OUT / FOLDERS[split] / str(target)
            folder.mkdir(parents=True)
            for name in rng.choice(names, count, replace=False):
                with Image.open(source / "images" / f"{name}.jpg") as image:
                    image.convert("RGB").resize((SIDE, SIDE), Image.LANCZOS).save(folder / f"{name}.jpg",
                                                                                   quality=QUALITY)
        table.append(f"| {FOLDERS[split]} | {counts[0]} | {counts[1]} | {split} split |")
    total = sum(sum(c) for c in COUNTS.values())
    (OUT / "LICENSE.md").write_text(LICENSE.format(total=total, side=SIDE, quality=QUALITY, rows="\n".join(table)))
    print(f"wrote {total} images to {OUT}")


if __name__ == "__main__":
    main()
