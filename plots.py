"""Every figure: the evaluation's curves, confusion matrix, embedding PCA and pairs
(predict.py), the training curves (train.py), and the single-image prediction figure with its
Grad-CAM overlay (predict.py --image, app.py). Each is written through save_figure."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
import torch
from pytorch_grad_cam.utils.image import show_cam_on_image
from sklearn.calibration import CalibrationDisplay
from sklearn.decomposition import PCA
from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay
from torchvision.transforms import v2

from dataset import CLASS_NAMES
from files import write_atomic
from images import read_rgb


# ---------------------------------------------------------------------------------------------
# Evaluation figures (predict.py)


def save_figure(fig, path, dpi=120):
    """Write a figure atomically (files.write_atomic) and close it."""
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi))
    finally:
        plt.close(fig)


def plot_curves(curves, results):
    """roc_curve.png and pr_curve.png, every split of {name: (labels, scores)} on the same axes;
    the PR curve shows each split's base rate (the precision of calling every image malignant)."""
    axis_labels = {"roc_curve": ("false positive rate (1 - specificity)", "true positive rate (sensitivity)"),
                   "pr_curve": ("recall (sensitivity)", "precision")}
    for name, display in (("roc_curve", RocCurveDisplay), ("pr_curve", PrecisionRecallDisplay)):
        fig, ax = plt.subplots(figsize=(5.5, 5), layout="constrained")
        for i, (split, (labels, scores)) in enumerate(curves.items()):
            shown = display.from_predictions(labels, scores, name=split, ax=ax,
                                             plot_chance_level=name == "roc_curve" and i == len(curves) - 1)
            if name == "pr_curve":
                base_rate = float(np.mean(np.asarray(labels) == 1))
                ax.axhline(base_rate, ls="--", lw=1, color=shown.line_.get_color(),
                           label=f"{split} base rate ({base_rate:.3f})")
        xlabel, ylabel = axis_labels[name]
        ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(-0.01, 1.01), ylim=(-0.01, 1.01),
               title="ROC, P(malignant)" if name == "roc_curve" else "precision-recall, malignant")
        ax.legend(loc="lower right" if name == "roc_curve" else "upper right", fontsize=8)
        save_figure(fig, results / f"{name}.png")


def plot_reliability(labels, scores, probabilities, results):
    """reliability_diagram.png: the share of melanomas against the mean P(malignant) in 10 bins of
    equal counts, for the raw score read as a probability and for the calibrated probability
    (calibration.py); a calibrated model lies on the diagonal."""
    fig, ax = plt.subplots(figsize=(5.5, 5), layout="constrained")
    for name, values in (("raw score", np.clip(scores, 0, 1)), ("calibrated P(malignant)", probabilities)):
        CalibrationDisplay.from_predictions(labels, values, n_bins=10, strategy="quantile", name=name, ax=ax)
    ax.set(xlabel="mean P(malignant) in the bin", ylabel="share of melanomas in the bin",
           title="reliability (10 bins of equal counts)")
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, results / "reliability_diagram.png")


def plot_shots(summary, shots, path):
    """new_clinic.py's curve: each way's mean test AUC (± sd over the draws) against the labelled
    images per class of the new clinic."""
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    for row, by_k in summary.items():
        means, sds = zip(*(by_k[k]["auc"] for k in shots))
        ax.errorbar(shots, means, yerr=sds, marker="o", capsize=3, label=row,
                    ls="--" if "own" in row else "-")
    ax.set(xscale="log", xticks=shots, xticklabels=[str(k) for k in shots], xlabel="labelled images per class (k)",
           ylabel="test AUC", title="a new clinic: k labelled images per class")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_confusion(labels, scores, threshold, results):
    fig, ax = plt.subplots(figsize=(4.5, 4), layout="constrained")
    ConfusionMatrixDisplay.from_predictions(labels, (scores >= threshold).astype(int), labels=[0, 1],
                                            display_labels=CLASS_NAMES, ax=ax, colorbar=False)
    ax.set_title(f"test, threshold {threshold:.3f}")
    save_figure(fig, results / "confusion_matrix.png")


def plot_embeddings(features, labels, results):
    pca = PCA(n_components=2)
    points = pca.fit_transform(features.cpu().numpy())
    fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
    for c, colour in ((0, "tab:blue"), (1, "tab:red")):
        ax.scatter(*points[labels == c].T, s=8, alpha=0.6, c=colour, label=CLASS_NAMES[c])
    first, second = pca.explained_variance_ratio_ * 100
    ax.set(xlabel=f"PC1 ({first:.0f} % variance)", ylabel=f"PC2 ({second:.0f} % variance)",
           title="test embeddings, PCA")
    ax.legend()
    save_figure(fig, results / "embeddings.png")


def pair_verdict(target, similarity):
    """(caption, right) of one pair: the true relation, the model's similarity and verdict."""
    truth = "same class" if target == 1 else "different classes"
    verdict = "same class" if similarity > 0.5 else "different classes"  # pair accuracy's threshold
    right = (similarity > 0.5) == (target == 1)
    return f"truth: {truth}\nmodel: similarity {similarity:.2f} -> {verdict}", bool(right)


def save_pair_figures(split, pairs, every, results, size=224):
    """prediction_results_<i>.png for every `every`-th test pair: both images with their classes,
    the true relation, the model's similarity and verdict, right or wrong."""
    partners, targets, similarity = pairs
    for i in range(0, len(partners), every):
        fig, axes = plt.subplots(1, 2, figsize=(6, 4), layout="constrained")
        for ax, index in zip(axes, (i, int(partners[i]))):
            image = v2.functional.resize(split.read(index), [size, size], antialias=True)
            ax.imshow(image.permute(1, 2, 0).numpy())
            ax.set_title(f"{split.paths[index].name}\n{CLASS_NAMES[split.labels[index]]}", fontsize=8)
            ax.axis("off")
        caption, right = pair_verdict(targets[i], similarity[i])
        fig.suptitle(f"pair {i}: {'right' if right else 'wrong'}\n{caption}", fontsize=10,
                     color="tab:green" if right else "tab:red")
        save_figure(fig, results / f"prediction_results_{i}.png", dpi=100)


def plot_pair_grid(split, pairs, indices, path, title, size=112):
    """Pairs in a grid of 4 columns: each cell both images side by side, titled with the true
    relation and the model's verdict, green when right and red when wrong."""
    partners, targets, similarity = pairs
    rows = max(1, -(-len(indices) // 4))
    fig, axes = plt.subplots(rows, 4, figsize=(12, 0.4 + 2.2 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    gap = torch.full((3, size, size // 16), 255, dtype=torch.uint8)
    for ax, i in zip(axes.flat, indices):
        first, second = (v2.functional.resize(split.read(index), [size, size], antialias=True)
                         for index in (i, int(partners[i])))
        ax.imshow(torch.cat([first, gap, second], dim=2).permute(1, 2, 0).numpy())
        caption, right = pair_verdict(targets[i], similarity[i])
        ax.set_title(f"pair {i}: {'right' if right else 'wrong'}\n{caption}", fontsize=8,
                     color="tab:green" if right else "tab:red")
    if len(indices) == 0:
        fig.text(0.5, 0.45, "no pairs to show", ha="center", va="center", fontsize=12)
    fig.suptitle(title)
    save_figure(fig, path, dpi=100)


def plot_pair_overview(split, pairs, results, size=112):
    """pair_grid.png (16 test pairs spread over the split) and confident_mistakes.png (the wrong
    pairs whose similarity is furthest from 0.5)."""
    partners, targets, similarity = pairs
    spread = np.unique(np.linspace(0, len(partners) - 1, min(16, len(partners))).astype(int))
    right = (similarity > 0.5) == (targets == 1)
    plot_pair_grid(split, pairs, spread, results / "pair_grid.png",
                   f"test pairs: {right[spread].sum()} of {len(spread)} right", size)
    wrong = np.flatnonzero(~right)
    worst = wrong[np.argsort(-np.abs(similarity[wrong] - 0.5), kind="stable")][:8]
    plot_pair_grid(split, pairs, worst, results / "confident_mistakes.png",
                   f"the most confident mistakes ({len(wrong)} of {len(partners)} test pairs wrong)", size)


# ---------------------------------------------------------------------------------------------
# Training curves (train.py)


def plot_history(history, path, selected=None):
    """Loss, accuracy and validation AUC per epoch; `selected` marks the epoch best.pth holds."""
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    left.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    left.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation (pair BCE)")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    right.plot(epochs, [r["train_acc"] for r in history], "o-", label="train accuracy")
    right.plot(epochs, [r["val_acc"] for r in history], "o-", label="validation pair accuracy")
    right.plot(epochs, [r["val_auc"] for r in history], "s--", label="validation AUC (image level)")
    right.set(xlabel="epoch", ylim=(0, 1.02), title="accuracy and AUC")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        if selected is not None:
            ax.axvline(selected, color="grey", ls=":", label=f"selected epoch {selected} (best.pth)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Single-image prediction (predict.py --image, app.py)


def heat_overlay(image, heat):
    """The Grad-CAM heat map over the image (H, W, 3) in [0, 1], as --image draws it and app.py shows it."""
    return show_cam_on_image(image.astype(np.float32), heat, use_rgb=True)


def gallery_thumbnail(path, side=96):
    """A gallery image's file as a (side, side, 3) uint8 array, for the figure and app.py."""
    return v2.functional.resize(read_rgb(path), [side, side], antialias=True).permute(1, 2, 0).numpy()


def plot_prediction(image, heat, title, nearest, path):
    """One figure a reader can check: the image as the network saw it, the Grad-CAM heat map over
    it, and its nearest gallery images (path, class, similarity) with their pictures."""
    fig = plt.figure(figsize=(max(8.0, 2.0 * len(nearest)), 7.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.6, 1])
    left, right = top.subplots(1, 2)
    left.imshow(image)
    left.set_title("image (as the network sees it)", fontsize=9)
    right.imshow(heat_overlay(image, heat))
    right.set_title("Grad-CAM: where the score came from (red = most)", fontsize=9)
    for ax in (left, right):
        ax.axis("off")
    top.suptitle(title)
    for ax, (gallery_path, label, similarity) in zip(bottom.subplots(1, max(1, len(nearest)), squeeze=False)[0],
                                                    nearest):
        name = Path(gallery_path).name if gallery_path else "(path not stored)"
        if gallery_path and Path(gallery_path).is_file():
            ax.imshow(gallery_thumbnail(gallery_path))
        else:  # moved or deleted since training, or a gallery saved without paths: the name only
            ax.text(0.5, 0.5, name, ha="center", va="center", fontsize=7, wrap=True)
        ax.set_title(f"{name}\n{CLASS_NAMES[label]}, similarity {similarity:.3f}", fontsize=7,
                     color="tab:red" if label == 1 else "tab:blue")
        ax.axis("off")
    bottom.suptitle("nearest gallery images", fontsize=10)
    save_figure(fig, path, dpi=100)
