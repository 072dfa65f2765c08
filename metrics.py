"""Image-level and pair metrics, computed by scikit-learn (the bootstrap's resampled AUCs from
scipy's ranks): the numbers the ISIC challenge and a dermatology reader look at (ROC AUC with a
bootstrap interval, balanced accuracy, sensitivity, specificity at a threshold chosen on
validation), next to the study's pair accuracy and loss; and the paired difference of two
models' AUCs on the same images."""
import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (average_precision_score, balanced_accuracy_score, confusion_matrix,
                             log_loss, roc_auc_score, roc_curve)


def pair_metrics(similarity, targets):
    """The study's numbers: accuracy at similarity 0.5 and the BCE loss."""
    similarity, targets = np.asarray(similarity, dtype=np.float64), np.asarray(targets)
    return {"pair_accuracy": float(((similarity > 0.5) == (targets == 1)).mean()),
            "pair_loss": float(log_loss(targets, np.clip(similarity, 1e-7, 1 - 1e-7), labels=[0, 1]))}


def auc_or_nan(labels, scores):
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


def bootstrap_aucs(labels, scores, n=1000, seed=0, block=4_000_000):
    """(resamples, models) AUCs: the images drawn n times with replacement, and every model's
    scores (a (models, images) array, or one row) scored on the same draws, so that differences
    between models are paired. Labels are 0 (benign) and 1 (malignant); a draw lacking a class is
    dropped. All draws at once, about `block` values at a time: each AUC is the Mann-Whitney
    statistic of the draw's ranks (scipy's rankdata, ties averaged), which is what roc_auc_score
    gives, without its seconds of per-call checks per score (bench.py's bootstrap mode)."""
    labels, scores = np.asarray(labels) == 1, np.atleast_2d(np.asarray(scores, dtype=np.float64))
    rng = np.random.default_rng(seed)
    aucs, rows = [], max(1, block // max(1, len(labels) * len(scores)))
    for start in range(0, n, rows):
        samples = rng.integers(0, len(labels), (min(rows, n - start), len(labels)))
        malignant = labels[samples]
        n_malignant = malignant.sum(1)
        n_benign = len(labels) - n_malignant
        usable = (n_malignant > 0) & (n_benign > 0)  # a resample needs both classes
        rank_sums = np.stack([(rankdata(model[samples], axis=1) * malignant).sum(1) for model in scores], 1)
        u = rank_sums - (n_malignant * (n_malignant + 1) / 2)[:, None]
        aucs.append(u[usable] / (n_malignant * n_benign)[usable, None])
    return np.concatenate([np.empty((0, len(scores))), *aucs])


def percentile_interval(values, level=0.95):
    if not len(values):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def bootstrap_auc(labels, scores, n=1000, seed=0, level=0.95, block=4_000_000):
    """Percentile interval of the AUC over n resamples of the images."""
    return percentile_interval(bootstrap_aucs(labels, scores, n, seed, block)[:, 0], level)


def paired_auc_difference(labels, scores, baseline_scores, n=1000, seed=0, level=0.95):
    """(difference, low, high): the AUC of `scores` minus that of `baseline_scores`, both on the
    same images, with the percentile interval of the difference over n resamples of the images,
    each resample scoring both. Several rows (seeds) on each side are paired row by row and
    averaged: the mean difference over seeds, its interval from the same resamples. Far narrower
    than two unpaired intervals when the two scores agree on which images are hard."""
    scores, baseline_scores = np.atleast_2d(scores), np.atleast_2d(baseline_scores)
    if scores.shape != baseline_scores.shape:
        raise ValueError(f"paired scores need the same shape, got {scores.shape} and {baseline_scores.shape}")
    difference = np.mean([auc_or_nan(labels, a) - auc_or_nan(labels, b) for a, b in zip(scores, baseline_scores)])
    aucs = bootstrap_aucs(labels, np.concatenate([scores, baseline_scores]), n, seed)
    resampled = (aucs[:, :len(scores)] - aucs[:, len(scores):]).mean(1)
    return (float(difference), *percentile_interval(resampled, level))


def signed(difference, low, high):
    """A paired difference and its interval as the tables print it: '+0.012 (+0.003, +0.020)'."""
    return f"{difference:+.3f} ({low:+.3f}, {high:+.3f})"


def retrieval_metrics(similarity, labels, gallery_labels, k=5):
    """How well a similarity finds same-class gallery images for each query image: precision@k
    per class (the share of the k most similar gallery images of the query's class, averaged over
    the class's queries; a class-balanced gallery gives 0.5 by chance) and the mean average
    precision of the whole ranking (scikit-learn's average_precision_score per query)."""
    similarity, labels, gallery_labels = np.asarray(similarity), np.asarray(labels), np.asarray(gallery_labels)
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    same = gallery_labels[nearest] == labels[:, None]
    result = {f"precision_at_{k}_{name}": float(same[labels == c].mean()) if (labels == c).any() else float("nan")
              for c, name in enumerate(("benign", "malignant"))}
    result["mean_average_precision"] = float(np.mean([average_precision_score(gallery_labels == label, row)
                                                      for row, label in zip(similarity, labels)]))
    return result


def choose_threshold(labels, scores, target_sensitivity=None):
    """On validation: the threshold maximising Youden's J (sensitivity + specificity - 1), or
    the highest threshold whose sensitivity reaches target_sensitivity."""
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    thresholds = np.minimum(thresholds, 1.0)  # sklearn puts +inf first
    if target_sensitivity is None:
        return float(thresholds[np.argmax(tpr - fpr)])
    return float(thresholds[np.argmax(tpr >= target_sensitivity)])  # tpr rises as threshold falls


def image_metrics(labels, scores, threshold, seed=0, n_bootstrap=1000):
    """Flat dict of the image-level metrics at a fixed threshold (P(malignant) >= threshold)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    predicted = (scores >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    low, high = bootstrap_auc(labels, scores, n_bootstrap, seed)
    return {
        "auc": auc_or_nan(labels, scores), "auc_ci_low": low, "auc_ci_high": high,
        "average_precision": float(average_precision_score(labels, scores)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "sensitivity": float(tp / max(1, tp + fn)), "specificity": float(tn / max(1, tn + fp)),
        "threshold": float(threshold),
        "tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp),
        "n_benign": int((labels == 0).sum()), "n_malignant": int((labels == 1).sum()),
    }
