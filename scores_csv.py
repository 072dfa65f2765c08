"""results/scores.csv: every evaluated image with its label, its raw score by each score method
and the calibrated P(malignant) by each. predict.py writes it; compare.py and ensemble.py read it
back to pair and average runs without evaluating them again."""
import csv

import numpy as np

from files import write_atomic


def write_scores(split, scores, probabilities, path):
    """scores.csv: every evaluated image with its label, its raw score by each score method, then
    the calibrated P(malignant) by each (columns <method>_probability)."""
    columns = {**scores, **{f"{name}_probability": values for name, values in probabilities.items()}}

    def write(tmp):
        with open(tmp, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["image", "label", *columns])
            for i, image in enumerate(split.paths):
                writer.writerow([str(image), int(split.labels[i]), *(f"{s[i]:.6f}" for s in columns.values())])
    write_atomic(path, write)


def read_scores(path, probabilities=False):
    """(images, labels, {score: per-image values}) of a scores.csv (write_scores): the raw scores, or
    with probabilities=True each score's calibrated P(malignant) (which ranks as its score does)."""
    try:
        with open(path, newline="") as file:
            header, *rows = list(csv.reader(file))
        return ([row[0] for row in rows], np.array([int(row[1]) for row in rows]),
                {name.removesuffix("_probability"): np.array([float(row[i]) for row in rows])
                 for i, name in enumerate(header[2:], 2) if name.endswith("_probability") == probabilities})
    except (OSError, ValueError, IndexError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from None
