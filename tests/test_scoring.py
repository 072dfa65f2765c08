"""Tests of scoring.py: the gallery, P(malignant) by each classifier against
direct computations, the similarity matrix, embedding, and which scores each loss's model allows."""
import numpy as np
import pytest
import torch

import scoring
from dataset import eval_transform, load_split, make_pairs
from config import RunConfig
from modules import EmbeddingNetwork, ImageClassifier, SiameseNetwork
from scoring import Embedding, choose_gallery, embed_images, resolve_score, score_images, similarity_matrix

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def siamese():
    torch.manual_seed(0)
    return SiameseNetwork("none").eval()


def toy(n, g, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, dim, generator=generator)
    gallery = torch.randn(g, dim, generator=generator)
    labels = torch.tensor([0, 1] * (g // 2) + [0] * (g % 2))
    return features, gallery, labels


# ---------------------------------------------------------------------------------------------
# choose_gallery


def test_choose_gallery_is_class_balanced_sorted_and_unique():
    labels = np.array([0] * 30 + [1] * 7)
    np.random.default_rng(0).shuffle(labels)
    picks = choose_gallery(labels, per_class=5, seed=0)
    assert len(picks) == 10 and len(set(picks.tolist())) == 10
    assert np.array_equal(picks, np.sort(picks))
    assert (labels[picks] == 0).sum() == 5 and (labels[picks] == 1).sum() == 5


def test_choose_gallery_takes_all_of_a_smaller_class():
    labels = np.array([0] * 30 + [1] * 3)
    picks = choose_gallery(labels, per_class=8, seed=0)
    assert (labels[picks] == 0).sum() == 8
    assert sorted(picks[labels[picks] == 1].tolist()) == [30, 31, 32]


def test_choose_gallery_is_fixed_by_the_seed():
    labels = np.array([0, 1] * 40)
    first = choose_gallery(labels, 6, seed=3)
    assert np.array_equal(first, choose_gallery(labels.tolist(), 6, seed=3))
    assert not np.array_equal(first, choose_gallery(labels, 6, seed=4))


# ---------------------------------------------------------------------------------------------
# score_images


@pytest.mark.parametrize("k", [1, 3, 7, 50])
def test_knn_probability_is_the_malignant_fraction_of_the_k_nearest_by_cosine(k):
    features, gallery, labels = toy(12, 15, 8, seed=k)
    result = score_images(None, features, gallery, labels, "knn", k=k)
    x = features.numpy() / np.linalg.norm(features.numpy(), axis=1, keepdims=True)
    g = gallery.numpy() / np.linalg.norm(gallery.numpy(), axis=1, keepdims=True)
    cosine = x @ g.T
    expected = [labels.numpy()[np.argsort(-row)[:min(k, 15)]].mean() for row in cosine]
    assert result.shape == (12,)
    assert np.allclose(result.numpy(), expected)


def test_knn_probability_ignores_feature_scale():
    features, gallery, labels = toy(6, 10, 5, seed=0)
    plain = score_images(None, features, gallery, labels, "knn", k=3)
    scaled = score_images(None, features * 7, gallery * 0.1, labels, "knn", k=3)
    assert torch.equal(plain, scaled)


def test_prototype_probability_is_distance_ratio_to_normalised_centroids():
    features, gallery, labels = toy(9, 14, 6, seed=1)
    result = score_images(None, features, gallery, labels, "prototype")
    x = features.double().numpy()
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    g = gallery.double().numpy()
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    benign_centre, malignant_centre = g[labels.numpy() == 0].mean(0), g[labels.numpy() == 1].mean(0)
    d_benign = np.linalg.norm(x - benign_centre, axis=1)
    d_malignant = np.linalg.norm(x - malignant_centre, axis=1)
    assert np.allclose(result.numpy(), d_benign / (d_benign + d_malignant), atol=1e-6)
    assert ((result >= 0) & (result <= 1)).all()


def test_prototype_probability_is_high_near_the_malignant_gallery_images():
    gallery = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([1, 1, 0, 0])
    result = score_images(None, torch.tensor([[1.0, 0.05], [0.05, 1.0]]), gallery, labels, "prototype")
    assert result[0] > 0.9 and result[1] < 0.1


def test_gallery_probability_is_mean_similarity_to_malignant_and_dissimilarity_to_benign(siamese):
    features, gallery, labels = toy(5, 6, 1000, seed=2)
    result = score_images(siamese, features, gallery, labels, "gallery")
    expected = []
    with torch.no_grad():
        for f in features:
            similarity = [siamese.pair_similarity(f[None], r[None]).item() for r in gallery]
            to_malignant = np.mean([s for s, c in zip(similarity, labels) if c == 1])
            to_benign = np.mean([1 - s for s, c in zip(similarity, labels) if c == 0])
            expected.append((to_malignant + to_benign) / 2)
    assert result.shape == (5,)
    assert np.allclose(result.numpy(), expected, atol=1e-5)


def test_direct_probability_is_the_classifier_output():
    torch.manual_seed(0)
    model = ImageClassifier("none").eval()
    features = torch.randn(4, 1000)
    result = score_images(model, features, None, torch.tensor([0, 1]), "direct")
    assert torch.allclose(result, model.malignant_probability(features).detach())


def test_probe_probability_is_a_logistic_regression_fitted_on_the_gallery_images():
    from sklearn.linear_model import LogisticRegression

    rng = torch.Generator().manual_seed(0)
    gallery_labels = torch.tensor([0] * 12 + [1] * 12)
    gallery = torch.randn(24, 6, generator=rng) + 1.5 * gallery_labels[:, None]
    features = torch.randn(10, 6, generator=rng)
    scores = score_images(None, features, gallery, gallery_labels, "probe")  # any model: only its features
    # by hand: standardise by the gallery's statistics, then scikit-learn's regression, classes weighted alike
    mean, std = gallery.numpy().mean(0), gallery.numpy().std(0)
    fitted = LogisticRegression(C=scoring.PROBE_C, class_weight="balanced", max_iter=5000).fit(
        (gallery.numpy() - mean) / std, gallery_labels.numpy())
    expected = fitted.predict_proba((features.numpy() - mean) / std)[:, 1]
    assert scores.numpy() == pytest.approx(expected, abs=1e-5)
    assert score_images(None, gallery[gallery_labels == 1][:3], gallery, gallery_labels, "probe").min() > 0.5


def test_unknown_classifier_raises_value_error():
    features, gallery, labels = toy(2, 4, 3, seed=0)
    with pytest.raises(ValueError, match="banana"):
        score_images(None, features, gallery, labels, "banana")


# ---------------------------------------------------------------------------------------------
# similarity_matrix and score_split


@pytest.mark.parametrize("chunk", [65536, 7, 1])
def test_similarity_matrix_equals_looping_pair_similarity(siamese, chunk):
    features, gallery, _ = toy(5, 3, 1000, seed=3)
    result = similarity_matrix(siamese, features, gallery, chunk=chunk)
    with torch.no_grad():
        expected = torch.tensor([[siamese.pair_similarity(f[None], g[None]).item() for g in gallery]
                                 for f in features])
    assert result.shape == (5, 3)
    assert torch.allclose(result, expected, atol=1e-6)


def test_similarity_matrix_puts_the_model_in_eval_mode():
    torch.manual_seed(0)
    model = SiameseNetwork("none").train()  # AlphaDropout and batch statistics would make rows random
    features, gallery, _ = toy(4, 3, 1000, seed=4)
    first = similarity_matrix(model, features, gallery)
    assert not model.training
    assert torch.equal(first, similarity_matrix(model, features, gallery))


def test_score_split_scores_the_fixed_pairs_of_make_pairs(siamese):
    features, gallery, gallery_labels = toy(10, 4, 1000, seed=5)
    labels = np.array([0] * 6 + [1] * 4)
    scored = scoring.score_split(siamese, features, labels, {"features": gallery, "labels": gallery_labels}, "knn",
                                 3, seed=9)
    scores, summary, (partners, targets, similarity) = scored.scores, scored.pair_summary, scored.pairs
    expected_partners, expected_targets = make_pairs(labels, 9)
    assert np.array_equal(partners, expected_partners) and np.array_equal(targets, expected_targets)
    with torch.no_grad():
        direct = siamese.pair_similarity(features, features[torch.as_tensor(partners)]).numpy()
    assert np.allclose(similarity, direct, atol=1e-6)
    assert summary["pair_accuracy"] == pytest.approx(np.mean((similarity > 0.5) == (targets == 1)))
    assert np.allclose(scores, score_images(siamese, features, gallery, gallery_labels, "knn", 3).numpy())


# ---------------------------------------------------------------------------------------------
# embed_images


def test_embed_images_equals_model_embed_of_each_eval_transformed_image(tiny_data_dir, siamese):
    split = load_split(tiny_data_dir, "validation")
    features = embed_images(siamese, split, Embedding(32, batch_size=4, device=CPU))
    with torch.no_grad():
        expected = torch.cat([siamese.embed(eval_transform(32)(split.read(i))[None]) for i in range(len(split))])
    assert features.shape == (len(split), 1000) and features.dtype == torch.float32
    assert torch.allclose(features, expected, atol=1e-4)
    subset = embed_images(siamese, split, Embedding(32, batch_size=2, device=CPU), indices=np.array([7, 2, 5]))
    assert torch.allclose(subset, expected[[7, 2, 5]], atol=1e-4)


def test_embed_images_of_an_embedding_model_gives_unit_rows(tiny_data_dir):
    torch.manual_seed(0)
    model = EmbeddingNetwork("none", embed_dim=8)
    split = load_split(tiny_data_dir, "test")
    features = embed_images(model, split, Embedding(32, batch_size=16, device=CPU), indices=[0, 9])
    assert features.shape == (2, 8) and not model.training
    assert torch.allclose(features.norm(dim=1), torch.ones(2), atol=1e-5)


def test_embedder_and_embed_gallery_embed_the_seeded_class_balanced_sample(tiny_data_dir, siamese):
    split = load_split(tiny_data_dir, "train")
    embed = scoring.embedder(siamese, Embedding(32, 4, CPU))
    gallery = scoring.embed_gallery(split, 2, 5, embed)
    picks = choose_gallery(split.labels, 2, 5)
    assert torch.equal(gallery["features"], embed_images(siamese, split, Embedding(32, 4, CPU), picks))
    assert gallery["labels"].tolist() == split.labels[picks].tolist() == [0, 0, 1, 1]
    assert gallery["paths"] == [str(split.paths[i].resolve()) for i in picks]


def test_embed_and_score_scores_each_split_and_takes_features_as_they_are(siamese):
    features, gallery, gallery_labels = toy(8, 4, 1000, seed=6)
    labels = np.array([0, 1] * 4)
    never = lambda split, indices, desc: pytest.fail("embedded a split given as features")  # noqa: E731
    scored = scoring.embed_and_score(siamese, {"validation": (features, labels)},
                                     {"features": gallery, "labels": gallery_labels}, never, "gallery", 3, seed=1)
    assert list(scored) == ["validation"] and torch.equal(scored["validation"].features, features)
    assert np.allclose(scored["validation"].scores,
                       score_images(siamese, features, gallery, gallery_labels, "gallery").numpy())
    features[2, 5] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        scoring.embed_and_score(siamese, {"test": (features, labels)},
                                {"features": gallery, "labels": gallery_labels}, never, "gallery", 3, seed=1)


# ---------------------------------------------------------------------------------------------
# resolve_score


def test_resolve_score_defaults_per_loss():
    assert resolve_score(RunConfig(loss="bce")) == "gallery"
    assert resolve_score(RunConfig(loss="ce")) == "direct"
    assert resolve_score(RunConfig(loss="contrastive")) == "gallery"  # beat knn by 0.07 on HAM10000 (docs/results.md)
    assert resolve_score(RunConfig(loss="triplet"), "auto") == "gallery"


def test_resolve_score_keeps_an_explicit_choice_and_refuses_direct_without_a_classifier():
    assert resolve_score(RunConfig(loss="bce"), "prototype") == "prototype"
    assert resolve_score(RunConfig(loss="triplet"), "gallery") == "gallery"
    assert resolve_score(RunConfig(loss="ce"), "direct") == "direct"
    with pytest.raises(ValueError, match="--loss ce"):
        resolve_score(RunConfig(loss="bce"), "direct")


# ---------------------------------------------------------------------------------------------
# Scoring levers: head-knn, every training image in the gallery, flip TTA


@pytest.mark.parametrize("k", [1, 3, 6])
def test_head_knn_is_the_similarity_weighted_malignant_share_of_the_k_most_similar(siamese, k):
    features, gallery, labels = toy(4, 6, 1000, seed=8)
    result = score_images(siamese, features, gallery, labels, "head-knn", k)
    similarity = similarity_matrix(siamese, features, gallery)
    for row, score in zip(similarity, result):
        top = sorted(zip(row.tolist(), labels.tolist()), reverse=True)[:k]
        assert score.item() == pytest.approx(sum(s * y for s, y in top) / sum(s for s, _ in top), rel=1e-5)


def test_choose_gallery_zero_takes_every_training_image():
    labels = np.array([0] * 30 + [1] * 7)
    assert np.array_equal(choose_gallery(labels, 0, seed=0), np.arange(37))


def test_tta_embedding_is_the_mean_over_the_four_flips(tiny_data_dir, siamese):
    split = load_split(tiny_data_dir, "test")
    result = embed_images(siamese, split, Embedding(32, 4, CPU, tta=True))
    images = torch.stack([eval_transform(32)(split.read(i)) for i in range(len(split))])
    with torch.no_grad():
        views = [images, images.flip(3), images.flip(2), images.flip(2, 3)]
        expected = torch.stack([siamese.embed(v) for v in views]).mean(0)
    assert torch.allclose(result, expected, atol=1e-4)
    assert not torch.allclose(result, embed_images(siamese, split, Embedding(32, 4, CPU)), atol=1e-4)


def test_applicable_scores_follow_the_model():
    assert scoring.applicable_scores(RunConfig(loss="bce")) == ["gallery", "head-knn", "knn", "prototype", "probe"]
    assert "direct" in scoring.applicable_scores(RunConfig(loss="bce", aux_weight=1.0))
    assert scoring.applicable_scores(RunConfig(loss="triplet")) == ["gallery", "knn", "prototype", "probe"]
    assert "direct" in scoring.applicable_scores(RunConfig(loss="ce"))
