"""Synthetic lesions for the demo and the tests, written in the split layout dataset.py reads:
benign = round, symmetric, one even colour; malignant = irregular border, asymmetric, several
colours (the ABCD rule of dermoscopy, exaggerated so a CPU can learn it).

    python synthetic.py --out data/demo      # writes the synthetic demo data set
"""
from pathlib import Path

import numpy as np
from PIL import Image

from config import make_parser
from dataset import CLASSES, SPLITS

SYNTHETIC_COUNTS = {"train": (160, 80), "validation": (40, 20), "test": (60, 30)}  # benign, malignant


def synthetic_lesion(rng, malignant, size):
    """One (size, size, 3) uint8 image of a lesion on skin."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    skin = np.array([0.93, 0.76, 0.65]) + rng.normal(0, 0.03, 3)
    image = skin + rng.normal(0, 0.02, (size, size, 3))
    cx, cy = 0.5 + rng.normal(0, 0.04, 2)
    radius = rng.uniform(0.2, 0.3)
    angle = np.arctan2(yy - cy, xx - cx)
    distance = np.hypot(xx - cx, yy - cy)
    if malignant:
        # Irregular border: a few random harmonics on the radius, and an off-centre bulge.
        harmonics = sum(rng.uniform(0.06, 0.16) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
                        for k in rng.choice(np.arange(2, 9), 3, replace=False))
        border = radius * (1 + harmonics + 0.25 * np.cos(angle - rng.uniform(0, 2 * np.pi)))
    else:
        border = radius * (1 + 0.03 * np.cos(2 * angle + rng.uniform(0, np.pi)))
    inside = distance < border
    brown = np.array([0.55, 0.35, 0.22]) + rng.normal(0, 0.03, 3)
    image[inside] = brown + rng.normal(0, 0.015, (inside.sum(), 3))
    if malignant:
        # Several colours: dark brown, black and blue-grey blotches inside the lesion.
        for colour in ([0.3, 0.18, 0.1], [0.08, 0.06, 0.06], [0.45, 0.5, 0.6], [0.7, 0.3, 0.3]):
            bx, by = cx + rng.normal(0, radius / 2, 2)
            blotch = inside & (np.hypot(xx - bx, yy - by) < rng.uniform(0.3, 0.6) * radius)
            image[blotch] = np.array(colour) + rng.normal(0, 0.03, (blotch.sum(), 3))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_synthetic(out, size=96, seed=0, counts=None):
    """Writes the synthetic data set in the split layout; returns the number of images."""
    out, rng, total = Path(out), np.random.default_rng(seed), 0
    for split, per_class in (counts or SYNTHETIC_COUNTS).items():
        for label, count in enumerate(per_class):
            folder = out / SPLITS[split] / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(synthetic_lesion(rng, label == 1, size)).save(
                    folder / f"SYN_{split}_{label}_{i:04d}.jpg", quality=92)
                total += 1
    return total


def main(argv=None):
    parser = make_parser("synthetic.py", "Write the synthetic demo data set in the split layout:\n\n"
                                         "    python synthetic.py --out data/synthetic", ("out", "seed"),
                         required=("out",), helps={"out": "output folder (the --data of train.py)",
                                                   "seed": "random seed"})
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise SystemExit(f"synthetic.py: error: --out {args.out} is not empty; choose a new folder")
    n = make_synthetic(args.out, args.size, args.seed)
    print(f"wrote {n} synthetic images to {args.out}")


if __name__ == "__main__":
    main()
