"""P(malignant) of images by several trained models at once: an ensemble of runs. Three seeds of
--recipe long scored 0.013 AUC above a single run on HAM10000 validation (docs/results.md).

    python ensemble.py --checkpoints runs/s0/outputs/best.pth runs/s1/outputs/best.pth \
        runs/s2/outputs/best.pth --image lesion.jpg [--image other.jpg ...]
    python ensemble.py --scores runs/s0/results runs/s1/results runs/s2/results

An image's P(malignant) is the mean of the models' calibrated P(malignant), each model scoring it
against its own gallery.pt as predict.py --image does (compare.py --ensemble scores the same mean
on a whole split). The verdict's threshold is chosen as one model's is, by Youden's J (or the
--target-sensitivity the models were evaluated with) on the validation images, here on their mean
P(malignant): each gallery.pt keeps its model's validation features, so the models must have been
validated on the same images (the same --data, every validation image or the same seed).

--scores scores the ensemble on the images its models were evaluated on, from each model's
scores.csv (train.py's PROJECT/results, or predict.py's --out: the same --data for all): its ROC
AUC with a 95 % interval, the ECE of its P(malignant), and its paired AUC difference from each
model and from the models' mean.
"""
import time
from pathlib import Path

import numpy as np
import torch

from calibration import calibrated, digits_to_agree, expected_calibration_error
from cli import one_line_errors
from config import make_parser
from gallery import validation_scores
from metrics import auc_or_nan, bootstrap_auc, choose_threshold, paired_auc_difference, signed
from predict import add_image_flag, check_inputs, load_predictor, predict_files
from scores_csv import read_scores


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
    """[(model, config, gallery, device)] of each checkpoint, and the threshold chosen by the
    members' rule (Youden's J, or --target-sensitivity) on their mean P(malignant) of their shared
    validation images."""
    members = [load_predictor(checkpoint, data, device) for checkpoint in checkpoints]
    first_config, first_gallery = members[0][1], members[0][2]
    for checkpoint, (_, config, gallery, _) in zip(checkpoints[1:], members[1:]):
        if validated_on(config, gallery) != validated_on(first_config, first_gallery):
            raise ValueError(f"--checkpoints {checkpoint} was validated on other images than {checkpoints[0]} (its "
                             f"--data, --benign-limit or seed differ); an ensemble's threshold needs models "
                             f"validated on the same images")
        if gallery["target_sensitivity"] != first_gallery["target_sensitivity"]:
            raise ValueError(f"--checkpoints {checkpoint} chose its threshold by another --target-sensitivity than "
                             f"{checkpoints[0]}; an ensemble's threshold needs one rule: evaluate them alike")
    labels = first_gallery["validation_labels"].numpy()
    mean = np.mean([validation_probabilities(*member) for member in members], axis=0)
    return members, choose_threshold(labels, mean, first_gallery["target_sensitivity"])


def member_probabilities(members, checkpoints, images):
    """(models, images): each member's calibrated P(malignant) of the image files, against its own
    gallery, as predict.py --image scores them."""
    return np.array([[p.probability for p in predict_files(model, config, gallery, images, on, checkpoint,
                                                           explain=False)]
                     for checkpoint, (model, config, gallery, on) in zip(checkpoints, members)])


def ensemble_text(probability, threshold, models, prevalence):
    """'P(malignant) 0.39  malignant  (malignant from 0.12; the mean of 3 models: 0.30 0.33 0.52;
    calibrated where 11% are melanomas)': the ensemble's P(malignant), its verdict and each model's."""
    digits = digits_to_agree(probability, threshold)
    verdict = "malignant" if probability >= threshold else "benign"
    return (f"P(malignant) {probability:.{digits}f}  {verdict}  (malignant from {threshold:.{digits}f}; the mean of "
            f"{len(models)} models: {' '.join(f'{p:.2f}' for p in models)}; calibrated where {prevalence:.0%} are "
            f"melanomas)")


def predict_images(checkpoints, images, data=None, device="auto"):
    """One line per image: the ensemble's P(malignant), its verdict and each model's P(malignant)."""
    check_inputs(images, "--image")
    members, threshold = load_members(checkpoints, data, device)
    each = member_probabilities(members, checkpoints, images)
    prevalence = members[0][2]["calibration"]["prevalence"]
    return [f"{ensemble_text(probability, threshold, models, prevalence)}  {path}"
            for path, probability, models in zip(images, each.mean(0), each.T)]


def ensemble_of(score_files):
    """(images, labels, members, ensemble) of models evaluated on the same images: each model's
    calibrated P(malignant) by its own score (the first of its scores.csv), a (models, images)
    array, and their mean, the ensemble's P(malignant)."""
    read = [read_scores(path, probabilities=True) for path in score_files]
    for path, (images, labels, probabilities) in zip(score_files, read):
        if not probabilities:
            raise ValueError(f"{path}: holds no calibrated P(malignant) (a <score>_probability column); evaluate "
                             f"its model again with predict.py")
        if len(set(labels.tolist())) < 2:
            raise ValueError(f"{path}: holds {int((labels == 0).sum())} benign and {int(labels.sum())} malignant "
                             f"images; an AUC needs both classes")
        if images != read[0][0]:
            raise ValueError(f"{path}: scores other images than {score_files[0]}; an ensemble needs its models "
                             f"evaluated on the same images (the same --data)")
    members = np.stack([next(iter(probabilities.values())) for *_, probabilities in read])
    return read[0][0], read[0][1], members, members.mean(0)


def ensemble_statistics(labels, members, ensemble):
    """What an ensemble's table shows: its AUC with the interval of 1,000 resamples of the images,
    the ECE of its P(malignant), each member's AUC, and the paired AUC difference from each member
    and from the members' mean (the same resamples for both)."""
    return {"auc": auc_or_nan(labels, ensemble), "interval": bootstrap_auc(labels, ensemble),
            "ece": expected_calibration_error(labels, ensemble),
            "member_aucs": [auc_or_nan(labels, member) for member in members],
            "minus_each": [paired_auc_difference(labels, ensemble, member) for member in members],
            "minus_mean": paired_auc_difference(labels, np.stack([ensemble] * len(members)), members)}


def score_lines(score_files):
    """The ensemble of the models' scores.csv files on their images: AUC, ECE and paired differences."""
    _, labels, members, ensemble = ensemble_of(score_files)
    stats = ensemble_statistics(labels, members, ensemble)
    lines = [f"ensemble of {len(members)} models on {len(labels)} images ({int(labels.sum())} malignant): ROC AUC "
             f"{stats['auc']:.3f} (95% CI {stats['interval'][0]:.3f}-{stats['interval'][1]:.3f}), ECE of its "
             f"P(malignant) {stats['ece']:.3f}",
             "AUC of each model, and the ensemble's minus it on the same images (95% interval over 1,000 "
             "resamples of the images):"]
    for path, auc, difference in zip(score_files, stats["member_aucs"], stats["minus_each"]):
        lines.append(f"  {auc:.3f}  {signed(*difference)}  {path}")
    lines.append(f"  {np.mean(stats['member_aucs']):.3f}  {signed(*stats['minus_mean'])}  the models' mean")
    return lines


def score_files(paths):
    """--scores as scores.csv files: a results folder stands for the scores.csv in it."""
    files = [Path(path) / "scores.csv" if Path(path).is_dir() else Path(path) for path in paths]
    for path in files:
        if not path.is_file():
            inside = path.parent / "results" / "scores.csv"
            raise ValueError(f"--scores {path}: no such file; " + (
                f"pass {inside.parent}, the project's results folder" if inside.is_file() else
                "evaluate the model with predict.py (train.py does at its end) to write it"))
    return files


def parse_args(argv=None):
    parser = make_parser("ensemble.py", __doc__, ("checkpoints", "data", "device"),
                         helps={"data": "the models' split folder, to rebuild a gallery.pt that is missing"})
    parser.add_argument("--scores", nargs="+", metavar="PATH",
                        help="instead of --checkpoints, the models' evaluations (two or more): results folders "
                             "holding scores.csv, e.g. each seed's PROJECT/results, or the scores.csv files")
    add_image_flag(parser, "P(malignant) of this image by the --checkpoints (repeat for several images)")
    return parser.parse_args(argv)


def run(args):
    if bool(args.checkpoints) == bool(args.scores):
        raise ValueError("give --checkpoints (with --image) or --scores, one of the two")
    if args.scores and args.image:
        raise ValueError("--image: scored by --checkpoints, not --scores; give the models' checkpoints")
    flag, paths = ("--checkpoints", args.checkpoints) if args.checkpoints else ("--scores", args.scores)
    if len(paths) < 2:
        raise ValueError(f"{flag}: give two or more models; predict.py takes one")
    if args.scores:
        paths = score_files(paths)  # so that a results folder and its scores.csv are one model
    if len({Path(path).resolve() for path in paths}) != len(paths):
        raise ValueError(f"{flag}: a model given twice would count twice; give each once")
    if args.scores:
        print("\n".join(score_lines(paths)))
        return
    if not args.image:
        raise ValueError("--image: give an image for the --checkpoints to score, or --scores to score an evaluation")
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
    print(f"{len(args.image or args.scores)} {'image(s)' if args.image else 'evaluations'} in "
          f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
