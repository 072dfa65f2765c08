"""Tests of plots.py: what the figures' axes, titles and colours say."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import plots
import train
from dataset import load_split, make_pairs

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ---------------------------------------------------------------------------------------------
# Figures: what their axes say


@pytest.fixture
def kept_figures(monkeypatch):
    figures = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=120: figures.update({Path(path).name: fig}))
    yield figures
    for fig in figures.values():
        plots.plt.close(fig)


def test_roc_and_pr_curves_have_plain_labels_and_base_rates(kept_figures, tmp_path):
    val = (np.array([0, 0, 0, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    test = (np.array([0, 0, 1, 1, 1]), np.array([0.2, 0.6, 0.55, 0.9, 0.3]))
    plots.plot_curves({"validation": val, "test": test}, tmp_path)
    roc, pr = kept_figures["roc_curve.png"].axes[0], kept_figures["pr_curve.png"].axes[0]
    assert (roc.get_xlabel(), roc.get_ylabel()) == ("false positive rate (1 - specificity)",
                                                    "true positive rate (sensitivity)")
    assert (pr.get_xlabel(), pr.get_ylabel()) == ("recall (sensitivity)", "precision")
    base_rates = {line.get_label(): line.get_ydata()[0] for line in pr.lines if "base rate" in line.get_label()}
    assert base_rates == {"validation base rate (0.250)": 0.25, "test base rate (0.600)": 0.6}


def test_embedding_plot_names_the_principal_components(kept_figures, tmp_path):
    features = torch.tensor([[3.0, 0, 0], [-3.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])
    plots.plot_embeddings(features, np.array([0, 0, 1, 1]), tmp_path)
    ax = kept_figures["embeddings.png"].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("PC1 (90 % variance)", "PC2 (10 % variance)")


def test_training_curves_have_whole_epochs_and_mark_the_selected_one(tmp_path, monkeypatch):
    closed = []
    monkeypatch.setattr(plots.plt, "close", closed.append)
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 0.5, "train_acc": 0.5, "val_acc": 0.5,
                "val_auc": auc} for e, auc in zip(range(1, 6), (0.5, 0.7, 0.9, 0.8, 0.9))]
    selected = train.selected_epoch(history, "val_auc")
    plots.plot_history(history, tmp_path / "curves.png", selected)
    assert selected == 3 and (tmp_path / "curves.png").exists()
    for ax in closed[0].axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 5]
        assert ticks and all(float(t).is_integer() for t in ticks)
        marks = [line for line in ax.lines if line.get_label().startswith("selected epoch")]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [3, 3]
    plots.plt.close(closed[0])


def test_pair_grid_colours_right_and_wrong_pairs(kept_figures, tiny_data_dir, tmp_path):
    split = load_split(tiny_data_dir, "test")
    labels = split.labels
    partners, targets = make_pairs(labels, 0)
    similarity = np.where(targets == 1, 0.9, 0.2).astype(float)  # every pair right ...
    similarity[[1, 4]] = np.where(targets[[1, 4]] == 1, 0.3, 0.95)  # ... but two, confidently wrong
    similarity[7] = 0.45 if targets[7] == 1 else 0.55  # ... and one barely wrong
    plots.plot_pair_overview(split, (partners, targets, similarity), tmp_path)
    grid = [ax for ax in kept_figures["pair_grid.png"].axes if ax.get_title()]
    assert len(grid) == len(labels) == 10
    for ax in grid:
        i = int(re.match(r"pair (\d+): (right|wrong)", ax.get_title()).group(1))
        wrong = i in (1, 4, 7)
        assert ("wrong" in ax.get_title()) == wrong
        assert ax.title.get_color() == ("tab:red" if wrong else "tab:green")
        relation = "same class" if targets[i] == 1 else "different classes"
        assert f"truth: {relation}\nmodel: similarity {similarity[i]:.2f} -> " in ax.get_title()
    mistakes = [ax.get_title() for ax in kept_figures["confident_mistakes.png"].axes if ax.get_title()]
    assert [int(re.match(r"pair (\d+)", t).group(1)) for t in mistakes][-1] == 7  # least confident last
    assert sorted(int(re.match(r"pair (\d+)", t).group(1)) for t in mistakes) == [1, 4, 7]


def test_prediction_figure_shows_gallery_images_that_exist_and_names_the_rest(kept_figures, tiny_data_dir, tmp_path):
    present = str(sorted((tiny_data_dir / "train_data" / "1").glob("*.jpg"))[0])
    nearest = [(present, 1, 0.93), (str(tmp_path / "moved" / "ISIC_0000001.jpg"), 0, 0.41), (None, 0, 0.40)]
    image, heat = np.full((32, 32, 3), 0.5), np.linspace(0, 1, 32 * 32).reshape(32, 32)
    plots.plot_prediction(image, heat, "x.jpg: P(malignant) 0.80 -> malignant", nearest, tmp_path / "x.png")
    figure = kept_figures["x.png"]
    cells = [ax for ax in figure.axes if ax.get_title().count("\n") == 1 and "similarity" in ax.get_title()]
    assert [ax.get_title() for ax in cells] == [f"{Path(present).name}\nmalignant, similarity 0.930",
                                                "ISIC_0000001.jpg\nbenign, similarity 0.410",
                                                "(path not stored)\nbenign, similarity 0.400"]
    assert [len(ax.images) for ax in cells] == [1, 0, 0]
    assert [t.get_text() for t in cells[1].texts] == ["ISIC_0000001.jpg"]
    heat_axis = next(ax for ax in figure.axes if ax.get_title().startswith("Grad-CAM"))
    assert heat_axis.images[0].get_array().shape == (32, 32, 3)
