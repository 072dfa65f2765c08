"""P(malignant) of images by several trained models at once: an ensemble of runs. Three seeds of
--recipe long scored 0.013 AUC above a single run on HAM10000 validation (docs/results.md).

    python ensemble.py --checkpoints runs/s0/outputs/best.pth runs/s1/outputs/best.pth \
        runs/s2/outputs/best.pth --image lesion.jpg [--image other.jpg ...]

An image's P(malignant) is the mean of the models' calibrated P(malignant), each model scoring it
against its own gallery.pt as predict.py --image does (compare.py --ensemble scores the same mean
on a whole split). The verdict's threshold is chosen as one model's is, by Youden's J on the
validation images, here on their mean P(malignant): each gallery.pt keeps its model's validation
features, so the models must have been validated on the same images (the same --data, every
validation image or the same seed).
"""
import time
from pathlib import Path

import numpy as np
import torch

from calibration import calibrated, digits_to_agree
from cli import one_line_errors
from config import make_parser
from gallery import validation_scores
from metrics import choose_threshold
from predict import add_image_flag, check_inputs, load_predictor, predict_files


def validated_on(config, gallery):
    """What fixes a run's validation images: its data and their labels, and its seed when its cap on
    benign validation images (--benign-limit) drew a subset of them."""
    labels = gallery["validation_labels"]
    drawn = 0 < config.benign_limit[1] <= int((labels == 0).sum())
    return str(Path(config.data).resolve()) if config.data else None, labels.tolist(), config.seed if drawn else None


@torch.no_grad()
def validation_probabilities(model, config, gallery, device):
    """The model's calibrated P(malignant) of its validation images, scored against its gallery
    again from the features gallery.pt keeps."""
    on_device = {**gallery, "features": gallery["features"].to(device), "labels": gallery["labels"].to(device)}
    scores = validation_scores(model, gallery["score"], gallery["k"], on_device,
                               gallery["validation_features"].to(device), config.seed)
    return calibrated(gallery["calibration"], scores)


def load_members(checkpoints, data=None, device="auto"):
    """[(model, config, gallery, device)] of each checkpoint, and the threshold: Youden's J on the
    members' mean P(malignant) of their shared validation images."""
    members = [load_predictor(checkpoint, data, device) for checkpoint in checkpoints]
    first_config, first_gallery = members[0][1], members[0][2]
    for checkpoint, (_, config, gallery, _) in zip(checkpoints[1:], members[1:]):
        if validated_on(config, gallery) != validated_on(first_config, first_gallery):
            raise ValueError(f"--checkpoints {checkpoint} was validated on other images than {checkpoints[0]} (its "
                             f"--data, --benign-limit or seed differ); an ensemble's threshold needs models "
                             f"validated on the same images")
    labels = first_gallery["validation_labels"].numpy()
    mean = np.mean([validation_probabilities(*member) for member in members], axis=0)
    return members, choose_threshold(labels, mean)


def predict_images(checkpoints, images, data=None, device="auto"):
    """One line per image: the ensemble's P(malignant), its verdict and each model's P(malignant)."""
    check_inputs(images, "--image")
    members, threshold = load_members(checkpoints, data, device)
    each = []  # (models, images)
    for checkpoint, (model, config, gallery, on) in zip(checkpoints, members):
        each.append([p.probability for p in predict_files(model, config, gallery, images, on, checkpoint,
                                                          explain=False)])
    each = np.array(each)
    prevalence = members[0][2]["calibration"]["prevalence"]
    lines = []
    for path, probability, models in zip(images, each.mean(0), each.T):
        digits = digits_to_agree(probability, threshold)
        verdict = "malignant" if probability >= threshold else "benign"
        lines.append(f"P(malignant) {probability:.{digits}f}  {verdict}  (malignant from {threshold:.{digits}f}; "
                     f"the mean of {len(models)} models: {' '.join(f'{p:.2f}' for p in models)}; calibrated "
                     f"where {prevalence:.0%} are melanomas)  {path}")
    return lines


def parse_args(argv=None):
    parser = make_parser("ensemble.py", __doc__, ("data", "device"),
                         helps={"data": "the models' split folder, to rebuild a gallery.pt that is missing"})
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="PATH",
                        help="the models' checkpoints (two or more), e.g. each seed's outputs/best.pth")
    add_image_flag(parser, "P(malignant) of this image (repeat for several images)", required=True)
    return parser.parse_args(argv)


def run(args):
    if len(args.checkpoints) < 2:
        raise ValueError("--checkpoints: give two or more models; predict.py --image scores with one")
    if len(set(map(str, args.checkpoints))) != len(args.checkpoints):
        raise ValueError("--checkpoints: a model given twice would count twice; give each once")
    for flag, paths in (("--checkpoints", args.checkpoints), ("--image", args.image)):
        for path in paths:
            if not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
    for line in predict_images(args.checkpoints, args.image, args.data, args.device):
        print(line)


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    with one_line_errors("ensemble.py", "free disk space or fix permissions"):
        run(args)
    print(f"{len(args.image)} image(s) in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
