"""Evaluate a trained checkpoint, or predict single images.

    python predict.py --project runs/exp1 --data DATA              # test metrics and figures
    python predict.py --project runs/exp1 --data CLINIC --out X    # another clinic's D/0, D/1, from gallery.pt
    python predict.py --project runs/exp1 --gallery OWN --data CLINIC --out X   # against the clinic's own gallery
    python predict.py --checkpoint runs/exp1/outputs/best.pth --image x.jpg [--image y.jpg ...]
    python predict.py --checkpoint runs/exp1/outputs/best.pth --pair a.jpg b.jpg

--image prints P(malignant) and the verdict at the threshold chosen on validation, and writes one
figure per image to --out (default PROJECT/predictions/): the image, a Grad-CAM heat map of what
drove its score, and its nearest gallery images with their classes and similarities.

Every image is embedded once; pairs and gallery comparisons are scored from the stored
embeddings by the model's head. P(malignant) of an image (--score):
    gallery    (mean similarity to the malignant gallery images + mean dissimilarity to the benign
                ones) / 2, similarities through the trained head, or the embedding's (1 + cos) / 2
                (the default of bce, contrastive and triplet)
    head-knn   the k gallery images most similar through the trained head, weighted by similarity:
                sum(s_i * y_i) / sum(s_i)
    knn        fraction of malignant among the k nearest gallery images by cosine similarity
    prototype  d_benign / (d_benign + d_malignant), distances to the two class centroids
    direct     the classifier's own output (--loss ce, or bce with --aux-weight)
    probe      a logistic regression on the embeddings, fitted on the gallery images (any model)
The gallery is a seeded, class-balanced sample of the training split (--gallery-size per
class; 0 = every training image). --tta averages each image's features over its four flips.
"""
import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import RawScoresOutputTarget

from calibration import (CALIBRATIONS, calibrated, calibration_metrics, calibration_problem, digits_to_agree,
                         fit_calibration)
from cli import ArgumentParser, Interrupted, interrupts_raise
from dataset import (denormalize, eval_transform, has_split, is_labelled_folder, load_labelled_folder, load_split,
                     load_train_split, write_excluded)
from files import folder_problem, overlaps, write_atomic, write_text_atomic
from images import DataError, attach_cache, check_image, read_rgb
from metrics import auc_or_nan, choose_threshold, image_metrics, retrieval_metrics
from modules import (CONFIG_RULES, WeightsError, describe_checkpoint, last_stage, load_checkpoint, load_state,
                     save_atomic)
from plots import (plot_confusion, plot_curves, plot_embeddings, plot_pair_overview, plot_prediction, plot_reliability,
                   save_pair_figures)
from scoring import (SCORES, describe_device, embed_and_score, embedder, flip_views, pick_device, resolve_score,
                     score_images, cosine_similarity, retrieval_similarities, to_device)


# ---------------------------------------------------------------------------------------------
# Evaluation of a checkpoint on the test split


def checkpoint_stamp(path):
    """sha256 of the checkpoint's bytes: ties a gallery to its checkpoint through copies (cp -r,
    rsync) that change file times. A gallery with an older size-and-time stamp is rebuilt."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def build_gallery(model, train, splits, embed, *, gallery_size, method, k, target_sensitivity, seed, tta=False,
                  stored=None, calibration="platt"):
    """A gallery from the training split, and the threshold chosen and the probability map
    (calibration.py) fitted on splits["validation"]
    (embed_and_score; `splits` may hold more splits to score with the same gallery). A `stored`
    gallery (stored_gallery) gives the gallery and the validation features instead, scored and
    thresholded the same way, so only the other splits are embedded; the gallery keeps the
    validation features and labels for that. Returns (gallery, {name: ScoredSplit})."""
    embedded = None
    if stored is not None:
        device = next(model.parameters()).device
        embedded = {"features": stored["features"].to(device), "labels": stored["labels"].to(device),
                    "paths": stored.get("paths")}
        splits = {**splits, "validation": (stored["validation_features"].to(device),
                                           stored["validation_labels"].numpy())}
    embedded, scored = embed_and_score(model, train, splits, gallery_size, method, k, seed, embed, embedded)
    validation = scored["validation"]
    if stored is not None and stored.get("cross_fitted"):  # a clinic's gallery is its own validation split
        validation.scores = validation_scores(model, method, k, stored, validation.features, seed)
    threshold = choose_threshold(validation.labels, validation.scores, target_sensitivity)
    gallery = {**embedded, "gallery_size": gallery_size, "score": method, "k": k,
               "cross_fitted": bool(stored and stored.get("cross_fitted")),
               "target_sensitivity": target_sensitivity, "tta": tta, "threshold": threshold,
               "calibration": fit_calibration(validation.scores, validation.labels, calibration),
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
    valid for this checkpoint (gallery_problem) and embedded as this evaluation embeds (its
    --gallery-size and --tta; the score, k and threshold are computed again from its validation
    features). Otherwise None, and one line says that the training data is read instead, and why."""
    path = Path(checkpoint).with_name("gallery.pt")
    gallery, problem = load_gallery(path, checkpoint, width, evaluation=True)
    flag = {True: "--tta", False: "--no-tta"}
    if not problem and (gallery["gallery_size"], gallery["tta"]) != (gallery_size, tta):
        problem = (f"made with --gallery-size {gallery['gallery_size']} {flag[gallery['tta']]}, this evaluation "
                   f"asks for --gallery-size {gallery_size} {flag[tta]}")
    if problem:
        print(f"{path}: {problem}; rebuilding the gallery and threshold from the training data")
        return None
    print(f"gallery and validation features from {path}; the training and validation images are not read")
    return gallery


def prepare_results(results, aside=None):
    """A fresh results folder; an earlier one is moved aside, never overwritten (`aside` records
    where, before the move, so that put_back can undo it)."""
    results = Path(results)
    if results.exists() and any(results.iterdir()):
        moved = results.with_name(f"{results.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        if aside is not None:
            aside["moved"] = moved
        shutil.move(results, moved)
        print(f"earlier results moved to {moved}")
    results.mkdir(parents=True, exist_ok=True)
    return results


def other_score_metrics(model, method, k, gallery, validation, evaluated, labels, target_sensitivity, seed,
                        calibration):
    """(image-level metrics, scores, probabilities of the evaluated images) of one more way of
    scoring the stored features (ScoredSplit.features of validation and of the evaluated split),
    its threshold chosen and its probability map fitted on validation like the main one's."""
    val_scores = validation_scores(model, method, k, gallery, validation.features, seed)
    scores = score_images(model, evaluated.features, gallery["features"], gallery["labels"], method, k).cpu().numpy()
    threshold = choose_threshold(labels["validation"], val_scores, target_sensitivity)
    fitted = fit_calibration(val_scores, labels["validation"], calibration)
    probabilities = calibrated(fitted, scores)
    return {"val_auc": auc_or_nan(labels["validation"], val_scores),
            **image_metrics(labels["evaluated"], scores, threshold, seed),
            **probability_metrics(labels["evaluated"], scores, probabilities)}, scores, probabilities


def probability_metrics(labels, scores, probabilities):
    """ECE, Brier score and log loss of the calibrated probabilities, and of the raw scores read
    as probabilities (raw_...)."""
    return {**calibration_metrics(labels, probabilities),
            **{f"raw_{key}": value for key, value in calibration_metrics(labels, scores).items()}}


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


def load_evaluation_splits(data, config, workers, cache=None, from_gallery=False):
    """{train, validation, evaluated}: the split layout's test split is evaluated, or its
    validation split when it has none; a plain labelled folder (DATA/0, DATA/1: another
    clinic's images) is evaluated against the gallery and threshold of the project's own
    training data, or, when `from_gallery` (stored_gallery), of its gallery.pt: then that folder is
    the only one read ({evaluated})."""
    seed, limits = config.seed, dict(zip(("train", "validation", "test"), config.benign_limit))
    external = is_labelled_folder(data)
    home = config.data if external else data
    splits = {}
    if not from_gallery:
        if external and not has_split(home, "train"):
            raise DataError(f"{home}: the model's training data is not there any more and outputs/gallery.pt "
                            f"cannot stand in for it (the line above says why); restore the data, or evaluate "
                            f"the project on its own data again where the data is, to write gallery.pt")
        splits = {"train": load_train_split(home, config.extra_train, limits["train"], seed, max(1, workers)),
                  "validation": load_split(home, "validation", limits["validation"], seed, max(1, workers))}
    if external:
        splits["evaluated"] = load_split(data, None, 0, seed, max(1, workers))
    elif has_split(data, "test"):
        splits["evaluated"] = load_split(data, "test", limits["test"], seed, max(1, workers))
    elif from_gallery:
        raise DataError(f"--data {data}: no test split to evaluate; point --data at a folder with 0/ and 1/, or at "
                        f"a split folder with test_data")
    else:
        print(f"{data}: no test split; evaluating the validation split, whose threshold is also chosen "
              f"on it (an optimistic sensitivity and specificity; the AUC does not depend on it)")
        splits["evaluated"] = splits["validation"]
    if cache:
        for split in splits.values():
            attach_cache(split, cache, config.image_size, workers)
    return splits


def put_back(results, moved, existed):
    """Undo prepare_results after a signal: the unfinished folder removed and the earlier one
    moved back (or an empty one left as it was). Returns what main's closing line says."""
    if moved is not None and not moved.exists():  # stopped before the move: the earlier results are in place
        return f"{results} is as it was"
    shutil.rmtree(results, ignore_errors=True)
    if moved is not None:
        shutil.move(moved, results)
        return f"earlier results moved back to {results}"
    if existed:
        results.mkdir()
    return f"the unfinished results in {results} were removed"


@contextlib.contextmanager
def fresh_results(results):
    """prepare_results, undone by put_back when a signal stops the evaluation inside."""
    results, aside = Path(results), {}
    existed = results.is_dir()
    try:
        yield prepare_results(results, aside)
    except KeyboardInterrupt as stopped:  # Interrupted (predict.py, train.py's final evaluation) or Ctrl-C
        stopped.note = put_back(results, aside.get("moved"), existed)
        raise


def evaluate(checkpoint, data, results, *, gallery_size=None, score="auto", k=None,
             target_sensitivity=None, save_every=100, batch_size=16, device="auto", workers=0,
             cache=None, splits=None, amp=True, tta=None, started=None, summary_rows=(), calibration="platt",
             clinic=None):
    """Metrics of a checkpoint on the test split (or see load_evaluation_splits); writes
    metrics.json, the figures and the saved pairs, and (only for the project's own data and
    results folder) the gallery next to the checkpoint for single-image prediction; ends with the
    run's summary (wall time since `started`, plus the caller's `summary_rows`). tta None: as the
    checkpoint was trained (--tta). `calibration`: the probability map's method
    (calibration.CALIBRATIONS). `clinic`: a labelled folder whose images are the gallery and
    set the threshold and the map instead of the training data (clinic_gallery). Returns the
    metrics dict."""
    started = started or time.time()
    device = pick_device(device) if isinstance(device, str) else device
    if Path(results).exists() and not Path(results).is_dir():
        raise ValueError(f"--out {results}: is a file, not a folder; choose another --out")
    # an earlier results folder is moved aside: it must not be, hold or lie inside what it reads
    for what, path in (("--data", data), ("the checkpoint", checkpoint), ("--gallery", clinic)):
        if path is not None and overlaps(results, path):
            raise ValueError(f"--out {results}: overlaps {what} {path}, which moving earlier results aside "
                             f"would move too; choose a folder of its own for --out")
    model, config, saved = load_checkpoint(checkpoint)  # validated (config, finite weights) before anything is moved
    model.to(device)
    methods = [resolve_score(config, name) for name in ([score] if isinstance(score, str) else score)]
    method = methods[0]
    # None: as the model was trained (train.py --tta, --gallery-size, --k)
    tta = config.tta if tta is None else tta
    gallery_size = config.gallery_size if gallery_size is None else gallery_size
    k = config.k if k is None else k
    seed, size = config.seed, config.image_size
    stored, embed = None, embedder(model, size, batch_size, device, workers, amp, tta=tta)
    if clinic is not None and overlaps(clinic, data):  # its images would meet themselves in the gallery
        raise ValueError(f"--gallery {clinic}: overlaps --data {data}; the clinic's gallery must not hold the "
                         f"images it scores: point --data at other images")
    if clinic is not None:
        stored, gallery_size = clinic_gallery(clinic, embed, tta, workers), 0
    elif splits is None and is_labelled_folder(data):  # another clinic's images: gallery.pt, where it fits
        stored = stored_gallery(checkpoint, feature_width(model, config, device), gallery_size, tta)
    splits = splits or load_evaluation_splits(data, config, workers, cache, from_gallery=stored is not None)
    train, validation, test = splits.get("train"), splits.get("validation"), splits["evaluated"]
    read = list({id(split): split for split in splits.values()}.values())  # test may be validation
    prefix = "test" if test.name == "test" else "val" if test is validation else "external"
    with fresh_results(results) as results:  # put back as it was if a signal stops the evaluation
        gallery, scored = build_gallery(model, train, {"validation": validation, "evaluated": test}, embed,
                                        gallery_size=gallery_size, method=method, k=k,
                                        target_sensitivity=target_sensitivity, seed=seed, tta=tta, stored=stored,
                                        calibration=calibration)
        val, evaluated = scored["validation"], scored["evaluated"]
        probabilities = calibrated(gallery["calibration"], evaluated.scores)
        image = {**image_metrics(test.labels, evaluated.scores, gallery["threshold"], seed),
                 **probability_metrics(test.labels, evaluated.scores, probabilities)}

        metrics = {"checkpoint": str(checkpoint), "checkpoint_epoch": saved.get("epoch"), "loss": config.loss,
                   "score": method, "recipe": config.recipe, "aux_weight": config.aux_weight,
                   "evaluated_split": prefix, "data": str(data), "tta": tta,
                   "gallery": str(clinic) if clinic is not None else "training split",
                   f"n_{prefix}_pairs": len(test), f"n_{prefix}_images": len(test), "gallery_size": gallery_size,
                   "threshold_rule": "youden" if target_sensitivity is None else f"sensitivity>={target_sensitivity}",
                   "val_auc": auc_or_nan(val.labels, val.scores),
                   "calibration": calibration, "calibration_prevalence": gallery["calibration"]["prevalence"],
                   "n_excluded_images": sum(len(split.excluded) for split in read)}
        metrics.update({f"{prefix}_{key}": value for key, value in evaluated.pair_summary.items()})
        metrics.update({f"{prefix}_{key}": value for key, value in image.items()})
        labels = {"validation": val.labels, "evaluated": test.labels}
        others = {  # the same embeddings scored other ways, each thresholded on validation
            name: other_score_metrics(model, name, k, gallery, val, evaluated, labels, target_sensitivity, seed,
                                      calibration)
            for name in dict.fromkeys(methods[1:]) if name != method}
        metrics["other_scores"] = {name: other_metrics for name, (other_metrics, _, _) in others.items()}
        # how well each similarity finds same-class gallery images (the nearest cases --image shows)
        metrics["retrieval"] = {name: retrieval_metrics(similarity.cpu().numpy(), test.labels, gallery["labels"].cpu())
                                for name, similarity in retrieval_similarities(model, evaluated.features,
                                                                               gallery["features"]).items()}
        write_scores(test, {method: evaluated.scores, **{name: scores for name, (_, scores, _) in others.items()}},
                     {method: probabilities, **{name: p for name, (_, _, p) in others.items()}},
                     results / "scores.csv")
        write_text_atomic(results / "metrics.json", json.dumps(metrics, indent=2) + "\n")

        curves = {"validation": (val.labels, val.scores)}
        if test is not validation:
            curves[{"test": "test", "external": Path(data).name}[prefix]] = (test.labels, evaluated.scores)
        save_figures(results, curves, test, evaluated, gallery["threshold"], save_every, size)
        plot_reliability(test.labels, evaluated.scores, probabilities, results)
        save_gallery(gallery, checkpoint, writes_gallery(checkpoint, data, results, config, clinic))
        # every image left out (unreadable, truncated, not an image) is counted and listed beside the results
        excluded = write_excluded(read, results / "excluded_images.txt")
        print_metrics(metrics)
        print_summary(metrics, results, device, time.time() - started,
                      [("checkpoint", describe_checkpoint(checkpoint, saved)), *summary_rows,
                       *([("excluded images", f"{excluded}, listed in {results / 'excluded_images.txt'}")]
                         if excluded else [])])
    return metrics


def save_figures(results, curves, split, scored, threshold, save_every, size):
    """The evaluated split's figures: ROC and PR curves (of every split in `curves`), confusion
    matrix, embedding PCA, every save_every-th pair, the pair grid and the confident mistakes."""
    plot_curves(curves, results)
    plot_confusion(split.labels, scored.scores, threshold, results)
    plot_embeddings(scored.features, split.labels, results)
    save_pair_figures(split, scored.pairs, save_every, results, size)
    plot_pair_overview(split, scored.pairs, results)


def save_gallery(gallery, checkpoint, allowed):
    """gallery.pt next to the checkpoint, stamped with its sha256, when `allowed` (writes_gallery)."""
    gallery_path = Path(checkpoint).with_name("gallery.pt")
    if not allowed:
        print(f"{gallery_path} not updated: only an evaluation of the training data into the project's results "
              f"folder replaces it")
        return
    gallery = {key: value.cpu() if torch.is_tensor(value) else value for key, value in gallery.items()}
    save_atomic({**gallery, "checkpoint_stamp": checkpoint_stamp(checkpoint)}, gallery_path)


def print_metrics(metrics):
    m = {key.removeprefix(metrics["evaluated_split"] + "_"): value for key, value in metrics.items()}
    print(f"\n{metrics['evaluated_split']} ({m['n_benign']} benign, {m['n_malignant']} malignant), "
          f"{metrics['loss']} model, score {metrics['score']}")
    rows = [("pair accuracy", m["pair_accuracy"]), ("pair BCE loss", m["pair_loss"]),
            ("AUC", f"{m['auc']:.4f} (95% CI {m['auc_ci_low']:.4f}-{m['auc_ci_high']:.4f})"),
            ("average precision", m["average_precision"]),
            ("balanced accuracy", m["balanced_accuracy"]),
            ("sensitivity", m["sensitivity"]), ("specificity", m["specificity"]),
            (f"threshold ({metrics['threshold_rule']})", m["threshold"]),
            ("nearest 5, same class", ", ".join(f"{name}: benign {r['precision_at_5_benign']:.2f}, malignant "
                                                f"{r['precision_at_5_malignant']:.2f}"
                                                for name, r in metrics["retrieval"].items())),
            (f"calibration ({metrics['calibration']})", f"ECE {m['ece']:.4f}, Brier {m['brier']:.4f} (raw score: "
                                                       f"ECE {m['raw_ece']:.4f}, Brier {m['raw_brier']:.4f})"),
            ("confusion [tn fp; fn tp]", f"[{m['tn']} {m['fp']}; {m['fn']} {m['tp']}]")]
    for name, value in rows:
        print(f"  {name:<28} {value:.4f}" if isinstance(value, float) else f"  {name:<28} {value}")


def print_summary(metrics, results, device, seconds, rows=()):
    """The closing lines of an evaluating run: where it ran, how long it took, the headline
    numbers and where the files are. `rows` adds (name, value) lines, e.g. the best epoch."""
    results = Path(results)
    pairs = sorted(results.glob("prediction_results_*.png"))
    figures = sorted(p.name for p in results.glob("*.png") if p not in pairs)
    minutes, secs = divmod(round(seconds), 60)
    split = metrics["evaluated_split"]
    m = {key.removeprefix(split + "_"): value for key, value in metrics.items()}
    lines = [("device", describe_device(device)), ("wall time", f"{minutes} min {secs} s"), *rows,
             (f"{split} AUC", f"{m['auc']:.3f} (95% CI {m['auc_ci_low']:.3f}-{m['auc_ci_high']:.3f}), "
                              f"{m['n_benign']} benign / {m['n_malignant']} malignant images"),
             (f"at threshold {m['threshold']:.3f}",
              f"sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f} "
              f"(threshold chosen on validation: {metrics['threshold_rule']})"),
             ("P(malignant) calibration", f"ECE {m['ece']:.3f}, Brier {m['brier']:.3f} (the raw score's: ECE "
                                          f"{m['raw_ece']:.3f}, Brier {m['raw_brier']:.3f}), at "
                                          f"{metrics['calibration_prevalence']:.0%} melanomas"),
             ("results", f"{results}/metrics.json"),
             ("figures", ", ".join(figures) + f", {len(pairs)} prediction_results_<i>.png")]
    print("\nsummary")
    for name, value in lines:
        print(f"  {name:<28} {value}")


# ---------------------------------------------------------------------------------------------
# Single images and pairs


def prediction_gallery(model, config, checkpoint, data, device, width, clinic=None):
    """A clinic's own gallery (--gallery FOLDER, clinic_gallery), or the gallery saved next to the
    checkpoint, or, when it is missing or unusable, one rebuilt in memory from --data with the
    run's settings. `width`: the model's feature width."""
    if clinic is not None:
        embed = embedder(model, config.image_size, 64, device, tta=config.tta)
        gallery, _ = build_gallery(model, None, {}, embed, gallery_size=0, method=config.score, k=config.k,
                                   target_sensitivity=None, seed=config.seed, tta=config.tta,
                                   stored=clinic_gallery(clinic, embed, config.tta, 0))
        return gallery
    gallery_path = Path(checkpoint).with_name("gallery.pt")
    gallery, problem = load_gallery(gallery_path, checkpoint, width)
    if not problem and "calibration" not in gallery:  # written before galleries kept the map
        if "validation_features" in gallery:
            on_device = {**gallery, "features": gallery["features"].to(device), "labels": gallery["labels"].to(device)}
            scores = validation_scores(model, gallery["score"], gallery["k"], on_device,
                                       gallery["validation_features"].to(device), config.seed)
            gallery["calibration"] = fit_calibration(scores, gallery["validation_labels"].numpy())
            print(f"{gallery_path}: no map from score to probability (an older gallery.pt); fitted now from its "
                  f"validation features")
        else:
            problem = "it was written before galleries kept what calibrating P(malignant) needs"
    if problem:
        if data is None:
            raise DataError(f"{gallery_path}: {problem}; pass --data DATA to rebuild it from the training and "
                            f"validation splits (or evaluate the project again)")
        print(f"{gallery_path}: {problem}; rebuilding the gallery from --data {data}")
        seed = config.seed
        train = load_train_split(data, config.extra_train, config.benign_limit[0], seed)
        validation = load_split(data, "validation", config.benign_limit[1], seed)
        gallery, _ = build_gallery(model, train, {"validation": validation},
                                   embedder(model, config.image_size, 64, device, tta=config.tta),
                                   gallery_size=config.gallery_size, method=config.score, k=config.k,
                                   target_sensitivity=None, seed=seed, tta=config.tta)
    return gallery


def grad_cam(model, image, malignant_mean):
    """Grad-CAM heat map (H, W) in [0, 1] on the backbone's last stage (modules.last_stage) for the
    model's image-level score (its image_logit: the head's similarity to the mean malignant
    gallery embedding, the classifier's logit, or the cosine similarity to the mean malignant embedding)."""

    class ImageScore(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images):
            return self.model.image_logit(self.model.embed(images), malignant_mean)

    with torch.enable_grad(), GradCAM(ImageScore(), target_layers=[last_stage(model)]) as cam:
        return cam(input_tensor=image[None], targets=[RawScoresOutputTarget()])[0]


def prediction_folder(checkpoint, project=None):
    """Default --out of single-image prediction: PROJECT/predictions, beside outputs/."""
    if project:
        return Path(project) / "predictions"
    checkpoint = Path(checkpoint)
    return (checkpoint.parent.parent if checkpoint.parent.name == "outputs" else checkpoint.parent) / "predictions"


@dataclass
class Prediction:
    """One image's prediction as values: what --image prints and draws, and what app.py shows."""
    score: float                   # the image-level score (--score), which the threshold applies to
    probability: float             # P(malignant): the score through the gallery's calibration
    verdict: str                   # malignant or benign, at the gallery's threshold
    image: np.ndarray | None = None  # (H, W, 3) in [0, 1], the image as the network sees it
    heat: np.ndarray | None = None   # Grad-CAM heat map (H, W) in [0, 1]
    nearest: list = field(default_factory=list)  # nearest gallery images first: (path or None, class, similarity)


@torch.no_grad()
def feature_width(model, config, device):
    """The width of the model's features, from one blank image: what a stored gallery is checked against."""
    return model.embed(torch.zeros(1, 3, config.image_size, config.image_size, device=device)).shape[1]


@torch.no_grad()
def load_predictor(checkpoint, data=None, device="auto", clinic=None):
    """(model, config, gallery, device): what single-image prediction needs, loaded once, so that
    app.py can keep them between requests. The gallery is checked against the model's feature
    width; `clinic`: a labelled folder to use as the gallery instead (--gallery)."""
    device = pick_device(device)
    model, config, _ = load_checkpoint(checkpoint)
    model.to(device)
    gallery = prediction_gallery(model, config, checkpoint, data, device, feature_width(model, config, device), clinic)
    return model, config, gallery, device


@torch.no_grad()
def predict_files(model, config, gallery, images, device, checkpoint, n_nearest=5, explain=True):
    """A Prediction per image file (already passed check_image) against the loaded gallery; with
    `explain` also its Grad-CAM heat map and nearest gallery images. The one implementation behind
    predict_images (--image) and app.py."""
    batch = to_device(torch.stack([eval_transform(config.image_size)(read_rgb(path)) for path in images]), device)
    features = model.embed(batch).float()
    if gallery.get("tta"):  # embedded as the gallery was: the mean over the four flips
        features = torch.stack([features] + [model.embed(view).float() for view in flip_views(batch)[1:]]).mean(0)
    check_finite(features, checkpoint)
    gallery_features, labels = gallery["features"].to(device), gallery["labels"].to(device)
    threshold = gallery["threshold"]
    scores = score_images(model, features, gallery_features, labels, gallery["score"], gallery["k"]).tolist()
    probabilities = calibrated(gallery["calibration"], scores).tolist()
    predictions = [Prediction(s, p, "malignant" if s >= threshold else "benign") for s, p in zip(scores, probabilities)]
    if not explain:
        return predictions
    # Nearest gallery images by the embedding's cosine, for every model: on ISIC 2017 test it found
    # more same-class images of both classes than the Siamese head's logit (docs/evaluation.md)
    similarity = cosine_similarity(features, gallery_features)
    nearest = similarity.topk(min(n_nearest, len(gallery_features)), dim=1)
    malignant_mean = gallery_features[labels == 1].float().mean(0)
    paths = gallery.get("paths") or [None] * len(gallery_features)
    for i, prediction in enumerate(predictions):
        prediction.image = denormalize(batch[i])
        prediction.heat = grad_cam(model, batch[i], malignant_mean)
        prediction.nearest = [(paths[j], int(labels[j]), s)
                              for s, j in zip(nearest.values[i].tolist(), nearest.indices[i].tolist())]
    return predictions


def nearest_text(prediction):
    """"3 of the 5 nearest gallery images are melanomas": what the similar cases say."""
    malignant = sum(label for _, label, _ in prediction.nearest)
    return (f"{malignant} of the {len(prediction.nearest)} nearest gallery images "
            f"{'is a melanoma' if malignant == 1 else 'are melanomas'}")


def probability_text(prediction, gallery, short=False):
    """"P(malignant) 0.23  benign  (malignant from 0.31; calibrated where 20 % are melanomas)": the
    calibrated probability with as many decimals as it takes to stand on its verdict's side of
    the threshold (the threshold on the score, shown as the probability it maps to)."""
    calibration = gallery["calibration"]
    threshold = float(calibrated(calibration, [gallery["threshold"]])[0])
    digits = digits_to_agree(prediction.probability, threshold)
    shown = f"{prediction.probability:.{digits}f}"
    if prediction.verdict == "benign" and shown == f"{threshold:.{digits}f}":  # a map flat there (isotonic)
        shown = "<" + shown
    text = f"P(malignant) {shown}  {prediction.verdict}  (malignant from {threshold:.{digits}f}"
    return text + (")" if short else f"; calibrated where {calibration['prevalence']:.0%} are melanomas)")


def check_inputs(paths, flag):
    """Each file checked as training checks it (images.check_image: decodable, within
    images.MAX_PIXELS from its header) before anything is decoded."""
    for path in paths:
        reason = check_image(Path(path))
        if reason:
            raise DataError(f"{flag} {path}: {reason}")


@torch.no_grad()
def predict_images(checkpoint, images, data=None, device="auto", out=None, n_nearest=5, clinic=None):
    """P(malignant) of each image and the verdict at the threshold saved with the gallery (or set
    by a clinic's gallery). With `out`, also one figure per image there (see plot_prediction).
    Returns the printed lines."""
    check_inputs(images, "--image")
    model, config, gallery, device = load_predictor(checkpoint, data, device, clinic)
    predictions = predict_files(model, config, gallery, images, device, checkpoint, n_nearest,
                                explain=out is not None)
    lines = [f"{probability_text(p, gallery)}  {path}" for p, path in zip(predictions, images)]
    if out is None:
        return lines
    lines = [f"{line}\n  {nearest_text(p)}" for line, p in zip(lines, predictions)]
    missing = sorted({path for p in predictions for path, _, _ in p.nearest if path and not Path(path).is_file()})
    if missing:  # the training images moved or deleted since gallery.pt was written
        lines.append(f"{len(missing)} nearest gallery image(s) not found (such as {missing[0]}): the figures "
                     f"show their names instead")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stems = [Path(path).stem for path in images]
    for i, (path, p) in enumerate(zip(images, predictions)):
        name = f"{stems[i]}_prediction.png" if stems.count(stems[i]) == 1 else f"{stems[i]}_{i + 1}_prediction.png"
        title = f"{Path(path).name}: {probability_text(p, gallery, short=True)}"
        plot_prediction(p.image, p.heat, title, p.nearest, out / name)
        lines[i] += f"\n  figure: {out / name}"
    return lines


@torch.no_grad()
def compare_pair(model, config, first, second, device):
    """(similarity, verdict) of two image files by a loaded model: same class above 0.5."""
    batch = torch.stack([eval_transform(config.image_size)(read_rgb(path)) for path in (first, second)])
    features = model.embed(to_device(batch, device)).float()
    similarity = model.pair_similarity(features[:1], features[1:]).item()
    return similarity, "same class" if similarity > 0.5 else "different classes"


@torch.no_grad()
def predict_pair(checkpoint, first, second, device="auto"):
    """The model's similarity of two images and its verdict (same class above 0.5)."""
    check_inputs((first, second), "--pair")
    device = pick_device(device)
    model, config, _ = load_checkpoint(checkpoint)
    model.to(device)
    similarity, verdict = compare_pair(model, config, first, second, device)
    return f"similarity {similarity:.4f} -> {verdict}  {first}  {second}"


def table_problem(name, features, labels, width):
    """What makes stored features and their labels unusable with a model whose features are
    `width` wide, or None; `name` says whose they are in the message ("" or "validation ")."""
    if not (torch.is_tensor(features) and features.is_floating_point() and features.ndim == 2):
        return f"its {name}features are not a table of numbers"
    if features.shape[1] != width:
        return f"its {name}features are {features.shape[1]} wide, the checkpoint's are {width}"
    if not torch.isfinite(features).all():
        return f"its {name}features are not finite (NaN or inf)"
    if not (torch.is_tensor(labels) and labels.shape == (len(features),) and set(labels.tolist()) == {0, 1}):
        return f"its {name}labels are not one 0 or 1 per {name or 'feature '}row, with both classes"
    return None


def setting_problem(gallery, keys):
    """The first of the gallery's `keys` (settings of the run) that breaks its modules.CONFIG_RULES rule, or None."""
    for key in keys:
        valid, what = CONFIG_RULES[key]
        if not valid(gallery.get(key)):
            return f"its {key} {gallery.get(key)!r} is not {what}"
    return None


def gallery_problem(gallery, width, evaluation=False):
    """What makes a loaded gallery unusable with a model whose features are `width` wide, or None.
    Its validation features and labels and gallery size are checked where present; `evaluation`
    (of other images without the training data, stored_gallery) needs them: an older gallery.pt
    without them still serves single images, and evaluations rebuild from the training data."""
    features, threshold = gallery.get("features"), gallery.get("threshold")
    problem = table_problem("", features, gallery.get("labels"), width)
    if problem:
        return problem
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold)):
        return f"its threshold {threshold!r} is not a number"
    problem = setting_problem(gallery, ("score", "k"))
    if problem:
        return problem
    problem = "calibration" in gallery and calibration_problem(gallery["calibration"])
    if problem:
        return problem
    paths = gallery.get("paths")
    if paths is not None and not (isinstance(paths, list) and len(paths) == len(features)
                                  and all(isinstance(path, str) for path in paths)):
        return "its paths are not one file name per feature row"
    kept = ("validation_features", "validation_labels", "gallery_size")  # what evaluating other images needs
    if not evaluation and not any(key in gallery for key in kept):
        return None  # an older gallery.pt: enough for single images
    if any(key not in gallery for key in (*kept, "tta")):
        return "it was written before galleries kept the validation features that evaluating other images needs"
    val_labels = gallery["validation_labels"]
    problem = table_problem("validation ", gallery["validation_features"], val_labels, width)
    if problem:
        return problem
    if val_labels.dtype != torch.int64:
        return f"its validation labels are {val_labels.dtype}, not integers"
    return setting_problem(gallery, ("gallery_size", "tta"))


def load_gallery(path, checkpoint, width, evaluation=False):
    """(the saved gallery, None), or (None, why there is none to use: missing, unreadable, made
    for another checkpoint, or what gallery_problem finds); the caller says so in one line."""
    if not path.exists():
        return None, "missing"
    try:
        gallery = load_state(path, "gallery")
    except WeightsError:
        return None, "unreadable (truncated, corrupt or not written by this repository)"
    if not isinstance(gallery, dict):
        return None, "not a gallery file"
    if gallery.get("checkpoint_stamp") != checkpoint_stamp(checkpoint):
        return None, "made for another checkpoint"
    problem = gallery_problem(gallery, width, evaluation)
    return (None, problem) if problem else (gallery, None)


def parse_args(argv=None):
    parser = ArgumentParser("predict.py", description=__doc__)
    parser.add_argument("--project", help="project folder written by train.py (reads outputs/best.pth, "
                                          "writes results/)")
    parser.add_argument("--data", help="split folder made by to_subdirectories.py")
    parser.add_argument("--checkpoint", help="checkpoint to use (default PROJECT/outputs/best.pth)")
    parser.add_argument("--out", help="evaluation: results folder (default PROJECT/results; an existing one is moved "
                                      "aside). --image: folder for the figures (default PROJECT/predictions)")
    images = parser.add_mutually_exclusive_group()
    images.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="P(malignant) of this image and a figure explaining it (repeat for several images)")
    images.add_argument("--pair", nargs=2, metavar=("A", "B"),
                        help="the model's similarity of two images: same class or not")
    parser.add_argument("--gallery-size", type=int, default=None,
                        help="gallery images per class for image-level scores; 0 = every training "
                             "image (default: as trained, train.py --gallery-size)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average each image's features over its four flips (default: as the model "
                             "was trained, see train.py --tta)")
    parser.add_argument("--score", "--classify", choices=SCORES, nargs="+", default=["auto"],
                        help="how P(malignant) is computed (default auto: gallery for bce, contrastive and "
                             "triplet, direct for ce). Several: the first gives the figures and "
                             "the main metrics, the others are scored from the same embeddings into "
                             "metrics.json's other_scores")
    parser.add_argument("--k", type=int, default=None,
                        help="neighbours for --score knn and head-knn (default: as trained, train.py --k)")
    parser.add_argument("--gallery", metavar="FOLDER",
                        help="a clinic's own labelled images (FOLDER/0 and FOLDER/1, or a split folder, pooled) "
                             "as the gallery: they set the threshold and P(malignant)'s calibration too, by "
                             "cross-fitting; nothing is retrained and the project is not touched (evaluation "
                             "needs --out)")
    parser.add_argument("--calibration", choices=CALIBRATIONS, default="platt",
                        help="the map from score to P(malignant), fitted on the validation split: platt (a "
                             "logistic regression on the score, default) or isotonic")
    parser.add_argument("--target-sensitivity", type=float, default=None,
                        help="choose the threshold that reaches this sensitivity on validation "
                             "(default: maximise Youden's J)")
    parser.add_argument("--save-every", type=int, default=100,
                        help="save every N-th test pair as prediction_results_<i>.png (default 100)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per evaluation batch (default 16)")
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--cache", metavar="DIR", help="uint8 image cache folder (see train.py --cache)")
    return parser.parse_args(argv)


def run(args, started):
    """The command the flags ask for: --image, --pair, or an evaluation."""
    if args.image or args.pair:
        flag = "--image" if args.image else "--pair"
        checkpoint = args.checkpoint or (args.project and Path(args.project) / "outputs" / "best.pth")
        if not checkpoint:
            raise ValueError(f"{flag} needs --checkpoint PATH or --project P")
        for path in args.image or args.pair:
            if not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
        if args.pair:
            print(predict_pair(checkpoint, *args.pair, args.device))
            return
        out = args.out or prediction_folder(checkpoint, args.project)
        problem = folder_problem(out)
        if problem:
            raise ValueError(f"--out {out}: {problem}; choose another --out for the figures")
        for line in predict_images(checkpoint, args.image, args.data, args.device, out, clinic=args.gallery):
            print(line)
        return
    if not args.project or not args.data:
        raise ValueError("pass --project P and --data DATA to evaluate, or --checkpoint C --image X")
    if args.save_every < 1 or args.batch_size < 1 or (args.k is not None and args.k < 1):
        raise ValueError("--save-every, --k and --batch-size must be at least 1")
    if args.gallery_size is not None and args.gallery_size < 0:
        raise ValueError(f"--gallery-size {args.gallery_size}: must be 0 (every training image) or more")
    if args.target_sensitivity is not None and not 0 < args.target_sensitivity <= 1:
        raise ValueError(f"--target-sensitivity {args.target_sensitivity}: must be in (0, 1]")
    if args.workers < 0:
        raise ValueError(f"--workers {args.workers}: must be 0 or more")
    problem = args.out and folder_problem(args.out)
    if problem:
        raise ValueError(f"--out {args.out}: {problem}; choose another --out")
    if args.gallery and not args.out:
        raise ValueError("--gallery: pass --out FOLDER for the results; an evaluation against another gallery "
                         "never writes into the project")
    checkpoint = Path(args.checkpoint or Path(args.project) / "outputs" / "best.pth")
    evaluate(checkpoint, args.data, args.out or Path(args.project) / "results", gallery_size=args.gallery_size,
             score=args.score, k=args.k, target_sensitivity=args.target_sensitivity,
             save_every=args.save_every, batch_size=args.batch_size, device=args.device,
             workers=args.workers, cache=args.cache, tta=args.tta, started=started, calibration=args.calibration,
             clinic=args.gallery)


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    try:
        with interrupts_raise():
            run(args, started)
    except Interrupted as stopped:  # one line and 128 + the signal, as a process killed by it
        note = getattr(stopped, "note", None)
        print(f"predict.py: stopped by {signal.Signals(stopped.signum).name}" + (f"; {note}" if note else ""),
              file=sys.stderr)
        sys.exit(128 + stopped.signum)
    except (ValueError, DataError, WeightsError) as error:
        sys.exit(f"predict.py: error: {error}")
    except OSError as error:  # a full disk or a folder without write permission (--out, gallery.pt)
        sys.exit(f"predict.py: error: could not write {error.filename or 'a file'} ({error.strerror or error}); "
                 f"free disk space or fix permissions, or choose another --out")


if __name__ == "__main__":
    main()
