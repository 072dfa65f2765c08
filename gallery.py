"""The gallery an image is scored against: labelled images embedded once, with the threshold
chosen and the probability map (calibration.py) fitted on validation images scored against it.
It comes from the training split (build_gallery), from gallery.pt beside the checkpoint
(checkpoints.load_gallery), or from a clinic's own labelled images (clinic_gallery).
"""
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from calibration import fit_calibration
from checkpoints import gallery_path, load_gallery
from dataset import load_labelled_folder, load_split, load_train_split
from files import WeightsError
from images import DataError
from metrics import choose_threshold
from scoring import Embedding, embed_and_score, embed_gallery, embedder, score_images


@dataclass
class Scoring:
    """How images are scored against a gallery: its images per class (0: every training image),
    the --score method and its k, the threshold's rule (None: Youden's J), --tta, and the
    probability map's method."""
    gallery_size: int
    method: str
    k: int
    target_sensitivity: float | None = None
    tta: bool = False
    calibration: str = "platt"

    @classmethod
    def as_trained(cls, config):
        return cls(config.gallery_size, config.score, config.k, None, config.tta)


def writes_gallery(checkpoint, data, results, config, clinic=None):
    """Whether this evaluation replaces the gallery.pt next to the checkpoint that single-image
    predictions use: only when it evaluates the checkpoint's own training data into its project's
    results folder. Evaluation on other data, or into --out, never writes to the project."""
    checkpoint = Path(checkpoint).resolve()
    same_data = bool(config.data) and Path(data).resolve() == Path(config.data).resolve()
    # best.pth only: evaluating last.pth must not replace the gallery best.pth predicts with
    own_results = Path(results).resolve() == checkpoint.parent.parent / "results"
    return checkpoint.name == "best.pth" and own_results and same_data and clinic is None


def check_finite(features, checkpoint):
    """Non-finite features (diverged weights that passed the load check) would score every image alike."""
    if not torch.isfinite(features).all():
        raise WeightsError(f"checkpoint {checkpoint}: the model's outputs are not finite (NaN or inf); the run "
                           f"diverged, use an earlier checkpoint or train again with a lower --lr")


@torch.no_grad()
def feature_width(model, config, device):
    """The width of the model's features, from one blank image: what a stored gallery is checked against."""
    return model.embed(torch.zeros(1, 3, config.image_size, config.image_size, device=device)).shape[1]


def build_gallery(model, train, splits, embed, scoring, seed, stored=None):
    """A gallery from the training split, and the threshold chosen and the probability map fitted
    on splits["validation"] (`splits` may hold more splits to score with the same gallery). A
    `stored` gallery (stored_gallery, clinic_gallery) gives the gallery and the validation
    features instead, scored and thresholded the same way, so only the other splits are embedded;
    the gallery keeps the validation features and labels for that. Returns (gallery,
    {name: ScoredSplit})."""
    if stored is not None:
        device = next(model.parameters()).device
        embedded = {"features": stored["features"].to(device), "labels": stored["labels"].to(device),
                    "paths": stored.get("paths")}
        splits = {**splits, "validation": (stored["validation_features"].to(device),
                                           stored["validation_labels"].numpy())}
    else:
        embedded = embed_gallery(train, scoring.gallery_size, seed, embed)
    scored = embed_and_score(model, splits, embedded, embed, scoring.method, scoring.k, seed)
    validation = scored["validation"]
    if stored is not None and stored.get("cross_fitted"):  # a clinic's gallery is its own validation split
        validation.scores = validation_scores(model, scoring.method, scoring.k, stored, validation.features, seed)
    gallery = {**embedded, "gallery_size": scoring.gallery_size, "score": scoring.method, "k": scoring.k,
               "cross_fitted": bool(stored and stored.get("cross_fitted")),
               "target_sensitivity": scoring.target_sensitivity, "tta": scoring.tta,
               "threshold": choose_threshold(validation.labels, validation.scores, scoring.target_sensitivity),
               "calibration": fit_calibration(validation.scores, validation.labels, scoring.calibration),
               "validation_features": validation.features, "validation_labels": torch.as_tensor(validation.labels)}
    return gallery, scored


def validation_scores(model, method, k, gallery, features, seed):
    """The validation images' scores against the gallery; for a gallery that is its own
    validation split (a clinic's images, clinic_gallery) cross-fitted: the images split into
    stratified folds, each scored against a gallery of the others, so none meets itself."""
    if not gallery.get("cross_fitted"):
        return score_images(model, features, gallery["features"], gallery["labels"], method, k).cpu().numpy()
    labels = gallery["labels"].cpu().numpy()
    scores = np.empty(len(labels))
    folds = StratifiedKFold(min(5, np.bincount(labels, minlength=2).min()), shuffle=True, random_state=seed)
    for rest, held in folds.split(labels, labels):
        scores[held] = score_images(model, features[held], gallery["features"][rest], gallery["labels"][rest],
                                    method, k).cpu().numpy()
    return scores


def clinic_gallery(folder, embed, tta, workers):
    """A clinic's own labelled images (--gallery FOLDER: its 0/ and 1/, or its splits pooled) as
    the gallery, every image of them; they are its validation split too, scored by cross-fitting
    (validation_scores), so their labels set the threshold and the probability map. Nothing is
    trained and the project is not touched."""
    images = load_labelled_folder(folder, "--gallery", max(1, workers))
    counts = images.counts()
    if min(counts) < 2:
        raise DataError(f"--gallery {folder}: {counts[0]} benign and {counts[1]} malignant image(s); a clinic's "
                        f"gallery needs at least 2 of each class to set a threshold, add images")
    features = embed(images, None, "embedding the clinic's gallery")
    labels = torch.as_tensor(images.labels, device=features.device)
    return {"features": features, "labels": labels, "paths": [str(Path(p).resolve()) for p in images.paths],
            "validation_features": features, "validation_labels": labels.cpu(), "gallery_size": 0, "tta": tta,
            "cross_fitted": True}


def stored_gallery(checkpoint, width, gallery_size, tta):
    """gallery.pt when it can stand in for the training data in an evaluation of other images:
    valid for this checkpoint (checkpoints.gallery_problem) and embedded as this evaluation embeds
    (its --gallery-size and --tta; the score, k and threshold are computed again from its
    validation features). Otherwise None, and one line says that the training data is read
    instead, and why."""
    gallery, problem = load_gallery(checkpoint, width)
    flag = {True: "--tta", False: "--no-tta"}
    if not problem and (gallery["gallery_size"], gallery["tta"]) != (gallery_size, tta):
        problem = (f"made with --gallery-size {gallery['gallery_size']} {flag[gallery['tta']]}, this evaluation "
                   f"asks for --gallery-size {gallery_size} {flag[tta]}")
    if problem:
        print(f"{gallery_path(checkpoint)}: {problem}; rebuilding the gallery and threshold from the training data")
        return None
    print(f"gallery and validation features from {gallery_path(checkpoint)}; the training and validation images "
          f"are not read")
    return gallery


def prediction_gallery(model, config, checkpoint, data, device, clinic=None):
    """A clinic's own gallery (--gallery FOLDER, clinic_gallery), or the gallery saved next to the
    checkpoint, or, when it is missing or unusable, one rebuilt in memory from --data with the
    run's settings."""
    embed = embedder(model, Embedding(config.image_size, 64, device, tta=config.tta))
    if clinic is not None:
        scoring = replace(Scoring.as_trained(config), gallery_size=0)
        gallery, _ = build_gallery(model, None, {}, embed, scoring, config.seed,
                                   stored=clinic_gallery(clinic, embed, config.tta, 0))
        return gallery
    gallery, problem = load_gallery(checkpoint, feature_width(model, config, device))
    if not problem:
        return gallery
    if data is None:
        raise DataError(f"{gallery_path(checkpoint)}: {problem}; pass --data DATA to rebuild it from the training "
                        f"and validation splits (or evaluate the project again)")
    print(f"{gallery_path(checkpoint)}: {problem}; rebuilding the gallery from --data {data}")
    train = load_train_split(data, config.extra_train, config.benign_limit[0], config.seed)
    validation = load_split(data, "validation", config.benign_limit[1], config.seed)
    gallery, _ = build_gallery(model, train, {"validation": validation}, embed, Scoring.as_trained(config),
                               config.seed)
    return gallery
