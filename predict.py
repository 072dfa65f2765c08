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
import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import RawScoresOutputTarget

from calibration import CALIBRATIONS, calibrated, calibration_metrics, digits_to_agree, fit_calibration
from checkpoints import best_path, describe_checkpoint, gallery_path, load_checkpoint, save_gallery
from cli import one_line_errors
from config import COMMAND_FLAGS, at_least, check_flags, make_parser
from dataset import denormalize, eval_transform, has_split, is_labelled_folder, load_split, load_train_split, write_excluded
from devices import describe_device, pick_device, to_device
from files import folder_problem, overlaps, write_text_atomic
from gallery import (Scoring, build_gallery, check_finite, clinic_gallery, feature_width, prediction_gallery,
                     stored_gallery, validation_scores, writes_gallery)
from images import DataError, attach_cache, check_image, read_rgb
from metrics import auc_or_nan, choose_threshold, image_metrics, retrieval_metrics
from modules import last_stage
from plots import (plot_confusion, plot_curves, plot_embeddings, plot_pair_overview, plot_prediction, plot_reliability,
                   save_pair_figures)
from scores_csv import write_scores
from scoring import Embedding, cosine_similarity, embedder, flip_views, resolve_score, retrieval_similarities, score_images

# ---------------------------------------------------------------------------------------------
# Evaluation of a checkpoint on the test split


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


def probability_metrics(labels, scores, probabilities):
    """ECE, Brier score and log loss of the calibrated probabilities, and of the raw scores read
    as probabilities (raw_...)."""
    return {**calibration_metrics(labels, probabilities),
            **{f"raw_{key}": value for key, value in calibration_metrics(labels, scores).items()}}


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


def save_figures(results, curves, split, scored, threshold, save_every, size):
    """The evaluated split's figures: ROC and PR curves (of every split in `curves`), confusion
    matrix, embedding PCA, every save_every-th pair, the pair grid and the confident mistakes."""
    plot_curves(curves, results)
    plot_confusion(split.labels, scored.scores, threshold, results)
    plot_embeddings(scored.features, split.labels, results)
    save_pair_figures(split, scored.pairs, save_every, results, size)
    plot_pair_overview(split, scored.pairs, results)


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


@dataclass
class EvaluationSettings:
    """predict.py's evaluation flags. None: as the checkpoint was trained (train.py's --gallery-size,
    --k, --tta). `clinic`: a labelled folder whose images are the gallery and set the threshold
    and the map instead of the training data (gallery.clinic_gallery)."""
    gallery_size: int | None = None
    score: list = field(default_factory=lambda: ["auto"])  # the first gives the figures and main metrics
    k: int | None = None
    target_sensitivity: float | None = None
    tta: bool | None = None
    calibration: str = "platt"
    clinic: str | None = None
    save_every: int = 100
    batch_size: int = 16
    device: str | torch.device = "auto"
    workers: int = 0
    cache: str | None = None
    amp: bool = True


def check_results_folder(results, inputs):
    """--out must be a folder that is not, holds no and lies in none of `inputs` ({what: path}): an
    earlier results folder is moved aside, and must not take what the evaluation reads with it."""
    if Path(results).exists() and not Path(results).is_dir():
        raise ValueError(f"--out {results}: is a file, not a folder; choose another --out")
    for what, path in inputs.items():
        if path is not None and overlaps(results, path):
            raise ValueError(f"--out {results}: overlaps {what} {path}, which moving earlier results aside "
                             f"would move too; choose a folder of its own for --out")
    if inputs.get("--gallery") is not None and overlaps(inputs["--gallery"], inputs["--data"]):
        raise ValueError(f"--gallery {inputs['--gallery']}: overlaps --data {inputs['--data']}; the clinic's "
                         f"gallery must not hold the images it scores: point --data at other images")


def scoring_of(settings, config):
    """gallery.Scoring from the flags, each left out as the model was trained."""
    return Scoring(config.gallery_size if settings.gallery_size is None else settings.gallery_size,
                   resolve_score(config, settings.score[0]), config.k if settings.k is None else settings.k,
                   settings.target_sensitivity, config.tta if settings.tta is None else settings.tta,
                   settings.calibration)


def evaluate(checkpoint, data, results, settings=None, splits=None, started=None, summary_rows=()):
    """Metrics of a checkpoint on the test split (or see load_evaluation_splits); writes
    metrics.json, scores.csv, the figures and the saved pairs, and (only for the project's own
    data and results folder, gallery.writes_gallery) the gallery next to the checkpoint for
    single-image prediction; ends with the run's summary (wall time since `started`, plus the
    caller's `summary_rows`). Returns the metrics dict."""
    settings, started = settings or EvaluationSettings(), started or time.time()
    check_results_folder(results, {"--data": data, "the checkpoint": checkpoint, "--gallery": settings.clinic})
    model, config, saved = load_checkpoint(checkpoint)  # validated (config, finite weights) before anything is moved
    device = pick_device(settings.device) if isinstance(settings.device, str) else settings.device
    model.to(device)
    scoring = scoring_of(settings, config)
    embed = embedder(model, Embedding(config.image_size, settings.batch_size, device, settings.workers, settings.amp,
                                      tta=scoring.tta))
    stored = None
    if settings.clinic is not None:
        stored, scoring.gallery_size = clinic_gallery(settings.clinic, embed, scoring.tta, settings.workers), 0
    elif splits is None and is_labelled_folder(data):  # another clinic's images: gallery.pt, where it fits
        stored = stored_gallery(checkpoint, feature_width(model, config, device), scoring.gallery_size, scoring.tta)
    splits = splits or load_evaluation_splits(data, config, settings.workers, settings.cache,
                                              from_gallery=stored is not None)
    others = [resolve_score(config, name) for name in dict.fromkeys(settings.score[1:]) if name != scoring.method]
    with fresh_results(results) as results:  # put back as it was if a signal stops the evaluation
        gallery, scored = build_gallery(model, splits.get("train"), {"validation": splits.get("validation"),
                                                                      "evaluated": splits["evaluated"]},
                                        embed, scoring, config.seed, stored)
        test = splits["evaluated"]
        prefix = "test" if test.name == "test" else "val" if test is splits.get("validation") else "external"
        metrics, scores = measure(model, config, gallery, scored, test, others, prefix)
        metrics = {"checkpoint": str(checkpoint), "checkpoint_epoch": saved.get("epoch"), "data": str(data),
                   "gallery": str(settings.clinic) if settings.clinic is not None else "training split",
                   "n_excluded_images": sum(len(split.excluded) for split in unique(splits)), **metrics}
        write_evaluation(results, metrics, scores, splits, scored, gallery, settings.save_every, config.image_size)
        if writes_gallery(checkpoint, data, results, config, settings.clinic):
            save_gallery(gallery, checkpoint)
        else:
            print(f"{gallery_path(checkpoint)} not updated: only an evaluation of the training data into the "
                  f"project's results folder replaces it")
        excluded = write_excluded(unique(splits), results / "excluded_images.txt")
        print_metrics(metrics)
        print_summary(metrics, results, device, time.time() - started,
                      [("checkpoint", describe_checkpoint(checkpoint, saved)), *summary_rows,
                       *([("excluded images", f"{excluded}, listed in {results / 'excluded_images.txt'}")]
                         if excluded else [])])
    return metrics


def unique(splits):
    """The splits read, each once (the evaluated split may be the validation split)."""
    return list({id(split): split for split in splits.values()}.values())


def measure(model, config, gallery, scored, test, others, prefix):
    """(metrics, {method: (scores, probabilities)}) of the evaluated split: the main score's image,
    pair, calibration and retrieval metrics, and each of `others` (more score methods) scored
    from the same embeddings, thresholded and calibrated on validation alike."""
    val, evaluated, seed = scored["validation"], scored["evaluated"], config.seed
    probabilities = calibrated(gallery["calibration"], evaluated.scores)
    metrics = {"loss": config.loss, "score": gallery["score"], "recipe": config.recipe,
               "aux_weight": config.aux_weight, "evaluated_split": prefix, "tta": gallery["tta"],
               f"n_{prefix}_pairs": len(test), f"n_{prefix}_images": len(test),
               "gallery_size": gallery["gallery_size"],
               "threshold_rule": ("youden" if gallery["target_sensitivity"] is None
                                  else f"sensitivity>={gallery['target_sensitivity']}"),
               "val_auc": auc_or_nan(val.labels, val.scores), "calibration": gallery["calibration"]["method"],
               "calibration_prevalence": gallery["calibration"]["prevalence"]}
    metrics.update({f"{prefix}_{key}": value for key, value in evaluated.pair_summary.items()})
    metrics.update({f"{prefix}_{key}": value for key, value in {
        **image_metrics(test.labels, evaluated.scores, gallery["threshold"], seed),
        **probability_metrics(test.labels, evaluated.scores, probabilities)}.items()})
    scores = {gallery["score"]: (evaluated.scores, probabilities)}
    metrics["other_scores"] = {}
    for method in others:  # the same embeddings scored other ways, each thresholded on validation
        metrics["other_scores"][method], scores[method] = other_score_metrics(model, method, gallery, val, evaluated,
                                                                              seed)
    # how well each similarity finds same-class gallery images (the nearest cases --image shows)
    metrics["retrieval"] = {name: retrieval_metrics(similarity.cpu().numpy(), test.labels, gallery["labels"].cpu())
                            for name, similarity in retrieval_similarities(model, evaluated.features,
                                                                           gallery["features"]).items()}
    return metrics, scores


def other_score_metrics(model, method, gallery, validation, evaluated, seed):
    """(image-level metrics, (scores, probabilities) of the evaluated images) of one more way of
    scoring the stored features (ScoredSplit.features of validation and of the evaluated split),
    its threshold chosen and its probability map fitted on validation like the main one's."""
    k, labels = gallery["k"], evaluated.labels
    val_scores = validation_scores(model, method, k, gallery, validation.features, seed)
    scores = score_images(model, evaluated.features, gallery["features"], gallery["labels"], method, k).cpu().numpy()
    threshold = choose_threshold(validation.labels, val_scores, gallery["target_sensitivity"])
    probabilities = calibrated(fit_calibration(val_scores, validation.labels, gallery["calibration"]["method"]),
                               scores)
    return {"val_auc": auc_or_nan(validation.labels, val_scores), **image_metrics(labels, scores, threshold, seed),
            **probability_metrics(labels, scores, probabilities)}, (scores, probabilities)


def write_evaluation(results, metrics, scores, splits, scored, gallery, save_every, size):
    """scores.csv, metrics.json and the figures of an evaluation into `results`."""
    test, val, evaluated = splits["evaluated"], scored["validation"], scored["evaluated"]
    write_scores(test, {name: s for name, (s, _) in scores.items()}, {name: p for name, (_, p) in scores.items()},
                 results / "scores.csv")
    write_text_atomic(results / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    curves = {"validation": (val.labels, val.scores)}
    if metrics["evaluated_split"] != "val":
        name = "test" if metrics["evaluated_split"] == "test" else Path(metrics["data"]).name
        curves[name] = (test.labels, evaluated.scores)
    save_figures(results, curves, test, evaluated, gallery["threshold"], save_every, size)
    plot_reliability(test.labels, evaluated.scores, scores[gallery["score"]][1], results)


# ---------------------------------------------------------------------------------------------
# Single images and pairs


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
def load_predictor(checkpoint, data=None, device="auto", clinic=None):
    """(model, config, gallery, device): what single-image prediction needs, loaded once, so that
    app.py can keep them between requests. The gallery is checked against the model's feature
    width; `clinic`: a labelled folder to use as the gallery instead (--gallery)."""
    device = pick_device(device)
    model, config, _ = load_checkpoint(checkpoint)
    model.to(device)
    gallery = prediction_gallery(model, config, checkpoint, data, device, clinic)
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


PREDICT_FLAGS = ("project", "data", "checkpoint", "out", "gallery_size", "tta", "score", "k", "gallery",
                 "target_sensitivity", "save_every", "batch_size", "device", "workers", "cache")


def add_image_flag(parser, help):
    """--image, repeatable: the images predict.py and ensemble.py score."""
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help=help)


def parse_args(argv=None):
    """The flags (config.py declares them); None: as the model was trained."""
    parser = make_parser(
        "predict.py", __doc__, PREDICT_FLAGS,
        defaults={"gallery_size": None, "tta": None, "k": None, "batch_size": 16, "workers": 0},
        helps={"project": "project folder written by train.py (reads outputs/best.pth, writes results/)",
               "out": "evaluation: results folder (default PROJECT/results; an existing one is moved aside). "
                      "--image: folder for the figures (default PROJECT/predictions)",
               "gallery_size": "gallery images per class for image-level scores; 0 = every training image "
                               "(default: as trained, train.py --gallery-size)",
               "tta": "average each image's features over its four flips (default: as the model was trained)",
               "k": "neighbours for --score knn and head-knn (default: as trained, train.py --k)",
               "gallery": COMMAND_FLAGS["gallery"].help + " (evaluation needs --out)",
               "batch_size": "images per evaluation batch"})
    images = parser.add_mutually_exclusive_group()
    add_image_flag(images, "P(malignant) of this image and a figure explaining it (repeat for several images)")
    images.add_argument("--pair", nargs=2, metavar=("A", "B"),
                        help="the model's similarity of two images: same class or not")
    parser.add_argument("--calibration", choices=CALIBRATIONS, default="platt",
                        help="the map from score to P(malignant), fitted on the validation split: platt (a "
                             "logistic regression on the score, default) or isotonic")
    return parser.parse_args(argv)


def run(args, started):
    """The command the flags ask for: --image, --pair, or an evaluation."""
    check_flags(args, PREDICT_FLAGS, rules={"batch_size": at_least(1)})
    if args.image or args.pair:
        flag = "--image" if args.image else "--pair"
        checkpoint = args.checkpoint or (args.project and best_path(args.project))
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
    problem = args.out and folder_problem(args.out)
    if problem:
        raise ValueError(f"--out {args.out}: {problem}; choose another --out")
    if args.gallery and not args.out:
        raise ValueError("--gallery: pass --out FOLDER for the results; an evaluation against another gallery "
                         "never writes into the project")
    settings = EvaluationSettings(**{name: getattr(args, name) for name in (
        "gallery_size", "score", "k", "target_sensitivity", "tta", "calibration", "save_every", "batch_size",
        "device", "workers", "cache")}, clinic=args.gallery)
    evaluate(args.checkpoint or best_path(args.project), args.data, args.out or Path(args.project) / "results",
             settings, started=started)


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    with one_line_errors("predict.py", "free disk space or fix permissions, or choose another --out"):
        run(args, started)


if __name__ == "__main__":
    main()
