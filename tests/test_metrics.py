"""Tests of metrics.py against values counted by hand and brute-force computations (never the
scikit-learn calls metrics.py itself makes): the study's pair numbers, the image-level metrics,
the bootstrap interval of the AUC, the paired difference of two AUCs and the validation
threshold."""
import math

import numpy as np
import pytest

from metrics import (auc_or_nan, bootstrap_auc, choose_threshold, image_metrics, pair_metrics,
                     paired_auc_difference, retrieval_metrics)


def toy_scores(n, seed, separation=1.0, malignant_fraction=0.3):
    """Labels and P(malignant)-like scores in (0, 1), malignant scoring higher on average."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < malignant_fraction).astype(int)
    labels[:2] = [0, 1]
    scores = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + separation * labels)))
    return labels, scores


def sensitivity_at(labels, scores, threshold):
    return ((scores >= threshold) & (labels == 1)).sum() / (labels == 1).sum()


def specificity_at(labels, scores, threshold):
    return ((scores < threshold) & (labels == 0)).sum() / (labels == 0).sum()


def pairwise_auc(labels, scores):
    """The AUC by its definition: the share of (malignant, benign) pairs in which the malignant
    image scores higher, a tie counting one half."""
    malignant, benign = scores[labels == 1], scores[labels == 0]
    wins = (malignant[:, None] > benign[None, :]).sum() + 0.5 * (malignant[:, None] == benign[None, :]).sum()
    return wins / (len(malignant) * len(benign))


def ranked_average_precision(labels, scores):
    """Mean over the malignant images of the precision among all images scoring at least as high."""
    return np.mean([labels[scores >= s].mean() for s in scores[labels == 1]])


# ---------------------------------------------------------------------------------------------
# pair_metrics


def test_pair_metrics_equal_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    similarity = rng.random(50)
    targets = rng.integers(0, 2, 50).astype(np.float32)
    result = pair_metrics(similarity, targets)
    accuracy = np.mean((similarity > 0.5) == (targets == 1))
    loss = -np.mean(targets * np.log(similarity) + (1 - targets) * np.log(1 - similarity))
    assert result["pair_accuracy"] == pytest.approx(accuracy)
    assert result["pair_loss"] == pytest.approx(loss, rel=1e-9)
    assert set(result) == {"pair_accuracy", "pair_loss"}


def test_pair_metrics_counts_one_half_as_different_and_clips_certain_answers():
    result = pair_metrics([0.5, 1.0, 0.0, 0.9], [1, 1, 0, 0])
    assert result["pair_accuracy"] == 0.5  # 0.5 is not "same"; 0.9 for a different pair is wrong
    expected = -(np.log(0.5) + np.log(1 - 1e-7) + np.log(1 - 1e-7) + np.log(0.1)) / 4
    assert math.isfinite(result["pair_loss"]) and result["pair_loss"] == pytest.approx(expected, rel=1e-6)


def test_pair_metrics_of_one_target_class_still_compute_the_loss():
    result = pair_metrics([0.8, 0.6], [1, 1])
    assert result["pair_accuracy"] == 1.0
    assert result["pair_loss"] == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)


# ---------------------------------------------------------------------------------------------
# image_metrics


def test_image_metrics_on_known_inputs_equal_values_counted_by_hand():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.35, 0.4, 0.7, 0.5, 0.3, 0.6, 0.8, 0.9])
    result = image_metrics(labels, scores, threshold=0.5, seed=0, n_bootstrap=200)
    # at >= 0.5 (the score equal to the threshold, 0.5, counts as malignant): benign 0.1 0.2 0.35
    # 0.4 below, 0.7 0.5 above; malignant 0.3 below, 0.6 0.8 0.9 above
    assert (result["tn"], result["fp"], result["fn"], result["tp"]) == (4, 2, 1, 3)
    # 19 of the 24 (malignant, benign) pairs are ordered right; precision at each malignant image
    # down the ranking is 1/1, 2/2, 3/4, 4/8
    assert result["auc"] == pytest.approx(19 / 24)
    assert result["average_precision"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 8) / 4)
    assert result["sensitivity"] == 0.75 and result["specificity"] == pytest.approx(4 / 6)
    assert result["balanced_accuracy"] == pytest.approx((0.75 + 4 / 6) / 2)
    assert result["threshold"] == 0.5 and result["n_benign"] == 6 and result["n_malignant"] == 4
    # the interval is the bootstrap's with the seed and resamples asked for
    assert (result["auc_ci_low"], result["auc_ci_high"]) == bootstrap_auc(labels, scores, n=200, seed=0)
    assert result["auc_ci_low"] < result["auc_ci_high"]  # ten images: a wide interval


@pytest.mark.parametrize("seed, decimals", [(1, None), (2, None), (3, 1)])  # 1 decimal: many tied scores
def test_image_metrics_equal_brute_force_counts_on_random_inputs(seed, decimals):
    labels, scores = toy_scores(300, seed)
    if decimals is not None:
        scores = np.round(scores, decimals)
    threshold = float(np.quantile(scores, 0.6))
    result = image_metrics(labels, scores, threshold, n_bootstrap=50)
    malignant, called = labels == 1, scores >= threshold
    tn, fp = int((~malignant & ~called).sum()), int((~malignant & called).sum())
    fn, tp = int((malignant & ~called).sum()), int((malignant & called).sum())
    assert [result[k] for k in ("tn", "fp", "fn", "tp")] == [tn, fp, fn, tp]
    assert result["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert result["specificity"] == pytest.approx(tn / (tn + fp))
    assert result["balanced_accuracy"] == pytest.approx((tp / (tp + fn) + tn / (tn + fp)) / 2)
    assert result["auc"] == pytest.approx(pairwise_auc(labels, scores))
    assert result["average_precision"] == pytest.approx(ranked_average_precision(labels, scores))
    assert (result["n_benign"], result["n_malignant"]) == (tn + fp, fn + tp)


def test_auc_or_nan_is_nan_for_one_class():
    assert math.isnan(auc_or_nan([0, 0, 0], [0.1, 0.5, 0.9]))
    assert auc_or_nan([0, 1, 1], [0.1, 0.5, 0.9]) == 1.0


# ---------------------------------------------------------------------------------------------
# bootstrap_auc


def test_bootstrap_interval_is_the_percentile_interval_of_the_resampled_aucs_and_fixed_by_the_seed():
    labels, scores = toy_scores(200, 0)
    low, high = bootstrap_auc(labels, scores, n=100, seed=4)
    # the documented procedure, with the AUC counted pair by pair: resample the images with
    # replacement from the seeded generator, keep resamples holding both classes, take the
    # 2.5th and 97.5th percentiles
    rng = np.random.default_rng(4)
    aucs = [pairwise_auc(labels[sample], scores[sample])
            for sample in (rng.integers(0, 200, 200) for _ in range(100))
            if 0 < labels[sample].sum() < 200]
    assert (low, high) == pytest.approx((np.percentile(aucs, 2.5), np.percentile(aucs, 97.5)))
    assert low < high
    assert bootstrap_auc(labels, scores, n=100, seed=4) == (low, high)
    assert bootstrap_auc(labels, scores, n=100, seed=5) != (low, high)


@pytest.mark.parametrize("block", [4_000_000, 7 * 60, 1])  # every resample at once, 7 at a time, one at a time
def test_bootstrap_counts_ties_as_one_half_whatever_the_block(block):
    labels, scores = toy_scores(60, 2)
    scores = np.round(scores, 1)  # many ties, within and across the classes
    rng = np.random.default_rng(0)
    aucs = [pairwise_auc(labels[sample], scores[sample])
            for sample in (rng.integers(0, 60, 60) for _ in range(50)) if 0 < labels[sample].sum() < 60]
    expected = (np.percentile(aucs, 2.5), np.percentile(aucs, 97.5))
    assert bootstrap_auc(labels, scores, n=50, seed=0, block=block) == pytest.approx(expected, abs=1e-12)


# paired_auc_difference


def correlated_scores(n, seed, models=1):
    """Labels and `models` pairs of scores that share most of their noise (two models that find
    the same images hard), the first of each pair a little better."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    labels[:2] = [0, 1]
    shared = rng.normal(0, 1, n)
    better = np.stack([shared + 0.2 * rng.normal(0, 1, n) + 1.2 * labels for _ in range(models)])
    worse = np.stack([shared + 0.2 * rng.normal(0, 1, n) + 1.0 * labels for _ in range(models)])
    return labels, better, worse


def test_paired_difference_is_the_difference_counted_pair_by_pair_with_the_same_resamples():
    labels, better, worse = correlated_scores(80, 0)
    difference, low, high = paired_auc_difference(labels, better[0], worse[0], n=60, seed=3)
    assert difference == pytest.approx(pairwise_auc(labels, better[0]) - pairwise_auc(labels, worse[0]))
    # by hand: each resample of the images scores both models
    rng = np.random.default_rng(3)
    differences = [pairwise_auc(labels[s], better[0][s]) - pairwise_auc(labels[s], worse[0][s])
                   for s in (rng.integers(0, 80, 80) for _ in range(60)) if 0 < labels[s].sum() < 80]
    assert (low, high) == pytest.approx((np.percentile(differences, 2.5), np.percentile(differences, 97.5)))
    assert low < difference < high


def test_paired_interval_is_narrower_than_the_unpaired_ones_for_correlated_scores():
    labels, better, worse = correlated_scores(400, 1)
    _, low, high = paired_auc_difference(labels, better[0], worse[0], n=300, seed=0)
    for scores in (better[0], worse[0]):
        unpaired_low, unpaired_high = bootstrap_auc(labels, scores, n=300, seed=0)
        assert high - low < 0.5 * (unpaired_high - unpaired_low)
    assert low > 0  # the better model is found better, which two overlapping intervals cannot say


def test_paired_difference_over_seeds_is_the_mean_of_the_per_seed_differences():
    labels, better, worse = correlated_scores(120, 2, models=3)
    difference, low, high = paired_auc_difference(labels, better, worse, n=100, seed=0)
    per_seed = [pairwise_auc(labels, a) - pairwise_auc(labels, b) for a, b in zip(better, worse)]
    assert difference == pytest.approx(np.mean(per_seed))
    one_seed = paired_auc_difference(labels, better[0], worse[0], n=100, seed=0)
    assert high - low < one_seed[2] - one_seed[1]  # seed noise averages out
    assert paired_auc_difference(labels, worse, worse, n=100, seed=0) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        paired_auc_difference(labels, better, worse[:2])


def test_bootstrap_interval_of_a_perfect_and_a_reversed_ranking_is_a_point():
    labels = np.array([0] * 12 + [1] * 8)
    scores = np.linspace(0, 1, 20)  # every malignant image above every benign one
    assert bootstrap_auc(labels, scores, n=50, seed=0) == pytest.approx((1.0, 1.0))
    assert bootstrap_auc(labels, 1 - scores, n=50, seed=0) == pytest.approx((0.0, 0.0))


def test_bootstrap_interval_is_narrower_for_more_data():
    small = bootstrap_auc(*toy_scores(60, 0), n=100, seed=0)
    large = bootstrap_auc(*toy_scores(2000, 0), n=100, seed=0)
    assert large[1] - large[0] < 0.5 * (small[1] - small[0])


def test_bootstrap_interval_widens_with_the_level():
    labels, scores = toy_scores(200, 3)
    narrow = bootstrap_auc(labels, scores, n=100, seed=0, level=0.5)
    wide = bootstrap_auc(labels, scores, n=100, seed=0, level=0.95)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_bootstrap_skips_resamples_with_one_class():
    labels = np.array([0] * 19 + [1])  # most resamples miss the one malignant image
    scores = np.linspace(0, 1, 20)
    low, high = bootstrap_auc(labels, scores, n=200, seed=0)
    assert low == high == 1.0  # the malignant image scores highest in every usable resample
    assert np.isnan(bootstrap_auc(labels, scores, n=0)).all()  # no resample: no interval


# ---------------------------------------------------------------------------------------------
# choose_threshold


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_youden_threshold_maximises_sensitivity_plus_specificity(seed):
    labels, scores = toy_scores(150, seed)
    threshold = choose_threshold(labels, scores)
    best = max(sensitivity_at(labels, scores, t) + specificity_at(labels, scores, t) for t in np.unique(scores))
    chosen = sensitivity_at(labels, scores, threshold) + specificity_at(labels, scores, threshold)
    assert chosen == pytest.approx(best)
    assert threshold in scores  # a real score, not the +inf sentinel


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_target_sensitivity_threshold_reaches_the_target(seed, target):
    labels, scores = toy_scores(150, seed)
    threshold = choose_threshold(labels, scores, target_sensitivity=target)
    assert sensitivity_at(labels, scores, threshold) >= target


def highest_threshold_reaching(labels, scores, target):
    return max(t for t in np.unique(scores) if sensitivity_at(labels, scores, t) >= target)


@pytest.mark.parametrize("target", [0.25, 0.75, 1.0])
def test_target_sensitivity_threshold_is_the_highest_such_threshold_where_benign_separate_malignant(target):
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 0, 0, 0])
    scores = np.array([0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.4, 0.3])
    assert choose_threshold(labels, scores, target) == highest_threshold_reaching(labels, scores, target)


@pytest.mark.parametrize("seed", [0, 1])
def test_target_sensitivity_threshold_is_the_highest_such_threshold(seed):
    labels, scores = toy_scores(150, seed)
    for target in (0.5, 0.8, 0.9, 0.95):
        assert choose_threshold(labels, scores, target) == highest_threshold_reaching(labels, scores, target)


def test_target_sensitivity_threshold_inside_a_run_of_malignant_scores():
    labels = np.array([1, 1, 1, 0, 1, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    assert choose_threshold(labels, scores, 0.5) == 0.8  # 2 of 4 malignant at >= 0.8


# retrieval_metrics


def test_retrieval_precision_and_map_are_counted_from_each_querys_ranking():
    gallery_labels = np.array([0, 0, 1, 1])
    labels = np.array([0, 1])
    similarity = np.array([[0.9, 0.1, 0.8, 0.2],    # benign query: ranking b, m, m, b
                           [0.3, 0.2, 0.1, 0.95]])  # malignant query: ranking m, b, b, m
    found = retrieval_metrics(similarity, labels, gallery_labels, k=2)
    assert found["precision_at_2_benign"] == 0.5 and found["precision_at_2_malignant"] == 0.5
    # average precision: benign query hits at ranks 1 and 4 (1 + 2/4) / 2; malignant at 1 and 4 likewise
    assert found["mean_average_precision"] == pytest.approx(0.75)
    perfect = retrieval_metrics(np.array([[1, 1, 0, 0], [0, 0, 1, 1]]), labels, gallery_labels, k=2)
    assert perfect == {"precision_at_2_benign": 1.0, "precision_at_2_malignant": 1.0, "mean_average_precision": 1.0}
