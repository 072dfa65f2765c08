"""Tests of gallery.py: a gallery built from the training split (its threshold and probability map
fitted on validation scores), the same gallery from stored features without embedding anything,
when an evaluation writes gallery.pt, and the checks on a model's features. The images are stood
in for by feature rows: gallery.py only sees what `embed` returns."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from calibration import fit_calibration
from config import RunConfig
from files import WeightsError
from gallery import Scoring, build_gallery, check_finite, feature_width, validation_scores, writes_gallery
from metrics import choose_threshold
from modules import EmbeddingNetwork, SiameseNetwork
from scoring import choose_gallery, score_images

pytestmark = pytest.mark.usefixtures("single_torch_thread")


class Cosine(nn.Module):
    """A model whose features are given: pair similarity (1 + cos) / 2, as EmbeddingNetwork's."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def pair_similarity(self, e1, e2):
        return (1 + F.cosine_similarity(e1, e2)) / 2


class Split:
    """A split of feature rows instead of images: its name, labels, paths and features."""

    def __init__(self, name, labels, seed):
        generator = torch.Generator().manual_seed(seed)
        self.name, self.labels = name, np.asarray(labels)
        self.paths = [f"/data/{name}/{label}/{i}.jpg" for i, label in enumerate(labels)]
        self.features = torch.randn(len(labels), 6, generator=generator) + 2.0 * torch.as_tensor(labels)[:, None]

    def __len__(self):
        return len(self.labels)


def embedding_of(calls):
    def embed(split, indices, desc):
        calls.append((split.name, desc))
        return split.features if indices is None else split.features[torch.as_tensor(indices)]
    return embed


@pytest.fixture
def splits():
    return Split("train", [0] * 12 + [1] * 8, seed=0), Split("validation", [0, 1] * 6, seed=1)


def test_build_gallery_from_the_training_split_sets_its_threshold_and_map_on_validation(splits):
    train, validation = splits
    calls, scoring = [], Scoring(gallery_size=3, method="knn", k=3, target_sensitivity=None, tta=False)
    gallery, scored = build_gallery(Cosine(), train, {"validation": validation}, embedding_of(calls), scoring, seed=4)
    picks = choose_gallery(train.labels, 3, 4)
    assert torch.equal(gallery["features"], train.features[picks])
    assert gallery["labels"].tolist() == train.labels[picks].tolist() == [0, 0, 0, 1, 1, 1]
    expected = score_images(None, validation.features, gallery["features"], gallery["labels"], "knn", 3).numpy()
    assert np.allclose(scored["validation"].scores, expected)
    assert gallery["threshold"] == choose_threshold(validation.labels, expected)
    assert gallery["calibration"] == fit_calibration(expected, validation.labels, "platt")
    assert torch.equal(gallery["validation_features"], validation.features)
    assert gallery["validation_labels"].tolist() == validation.labels.tolist()
    assert (gallery["gallery_size"], gallery["score"], gallery["k"], gallery["tta"]) == (3, "knn", 3, False)
    assert not gallery["cross_fitted"]
    assert [name for name, _ in calls] == ["train", "validation"]  # each split embedded once


def test_build_gallery_with_a_target_sensitivity_chooses_that_threshold(splits):
    train, validation = splits
    scoring = Scoring(3, "prototype", 3, target_sensitivity=1.0)
    gallery, scored = build_gallery(Cosine(), train, {"validation": validation}, embedding_of([]), scoring, seed=0)
    scores, labels = scored["validation"].scores, validation.labels
    assert gallery["threshold"] == choose_threshold(labels, scores, 1.0)
    assert (scores[labels == 1] >= gallery["threshold"]).all()  # every validation melanoma found
    assert gallery["target_sensitivity"] == 1.0


def test_a_stored_gallery_gives_the_same_gallery_without_embedding_train_or_validation(splits):
    train, validation = splits
    test = Split("test", [1, 0, 0, 1], seed=2)
    scoring = Scoring(3, "knn", 3)
    built, _ = build_gallery(Cosine(), train, {"validation": validation}, embedding_of([]), scoring, seed=4)
    calls = []
    again, scored = build_gallery(Cosine(), None, {"test": test}, embedding_of(calls), scoring, seed=4, stored=built)
    assert [name for name, _ in calls] == ["test"]  # only the split the stored gallery lacks
    assert again["threshold"] == built["threshold"] and again["calibration"] == built["calibration"]
    assert torch.equal(again["features"], built["features"])
    assert set(scored) == {"test", "validation"}


def test_scoring_as_trained_takes_the_runs_settings():
    config = RunConfig(gallery_size=16, score="prototype", k=5, tta=True)
    assert Scoring.as_trained(config) == Scoring(16, "prototype", 5, None, True, "platt")


def test_writes_gallery_only_for_the_checkpoints_own_data_and_results(tmp_path):
    project = tmp_path / "exp"
    best, data = project / "outputs" / "best.pth", tmp_path / "data"
    config = RunConfig(data=str(data))
    assert writes_gallery(best, data, project / "results", config)
    assert not writes_gallery(project / "outputs" / "last.pth", data, project / "results", config)
    assert not writes_gallery(best, tmp_path / "other", project / "results", config)
    assert not writes_gallery(best, data, tmp_path / "elsewhere", config)
    assert not writes_gallery(best, data, project / "results", config, clinic=tmp_path / "clinic")
    assert not writes_gallery(best, data, project / "results", RunConfig(data=""))


def test_check_finite_refuses_nan_features_naming_the_checkpoint():
    check_finite(torch.ones(3, 4), "best.pth")
    with pytest.raises(WeightsError, match="checkpoint best.pth: the model's outputs are not finite"):
        check_finite(torch.tensor([[1.0, float("nan")]]), "best.pth")


def test_feature_width_is_the_models_embedding_width():
    torch.manual_seed(0)
    config = RunConfig(image_size=32)
    assert feature_width(SiameseNetwork("none").eval(), config, torch.device("cpu")) == 1000
    assert feature_width(EmbeddingNetwork("none", embed_dim=12).eval(), config, torch.device("cpu")) == 12


def test_cross_fitted_validation_scores_never_meet_their_own_image():
    class NoModel:
        pass

    rng = torch.Generator().manual_seed(0)
    features = torch.randn(20, 8, generator=rng)
    labels = torch.tensor([0, 1] * 10)
    gallery = {"features": features, "labels": labels, "cross_fitted": True}
    # k = 1: against a gallery holding the image itself its nearest neighbour is itself, and the
    # score is its own label
    scores = validation_scores(NoModel(), "knn", 1, gallery, features, seed=0)
    assert not (scores == labels.numpy()).all()
    with_itself = validation_scores(NoModel(), "knn", 1, {**gallery, "cross_fitted": False}, features, 0)
    assert (with_itself == labels.numpy()).all()
