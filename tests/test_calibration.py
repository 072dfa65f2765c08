"""calibration.py on synthetic scores of known miscalibration: the fitted map lowers the expected
calibration error and leaves the AUC as it was; the ECE, the stored map's check and the printed
digits against values counted by hand."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from calibration import (calibrated, calibration_metrics, calibration_problem, digits_to_agree,
                         expected_calibration_error, fit_calibration)


def miscalibrated(n, seed):
    """Scores in a narrow band around 0.5 (as a gallery's similarity average) whose true P(malignant)
    is a steep logistic function of the score at 15 % prevalence: read as probabilities, they are
    far off."""
    rng = np.random.default_rng(seed)
    scores = 0.5 + 0.05 * rng.normal(0, 1, n)
    truth = 1 / (1 + np.exp(-(60 * (scores - 0.5) - 2.2)))
    return scores, (rng.random(n) < truth).astype(int)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_the_fitted_map_lowers_the_ece_on_new_images(method):
    val_scores, val_labels = miscalibrated(3000, 0)
    test_scores, test_labels = miscalibrated(3000, 1)
    calibration = fit_calibration(val_scores, val_labels, method)
    probabilities = calibrated(calibration, test_scores)
    raw = calibration_metrics(test_labels, test_scores)
    fitted = calibration_metrics(test_labels, probabilities)
    assert raw["ece"] > 0.25 and fitted["ece"] < 0.03
    assert fitted["brier"] < raw["brier"] and fitted["log_loss"] < raw["log_loss"]
    assert calibration["prevalence"] == pytest.approx(val_labels.mean())
    assert calibration_problem(calibration) is None


def test_platt_scaling_is_monotone_so_the_auc_and_the_ranking_do_not_move():
    scores, labels = miscalibrated(500, 2)
    probabilities = calibrated(fit_calibration(scores, labels), scores)
    assert roc_auc_score(labels, probabilities) == roc_auc_score(labels, scores)
    assert (np.argsort(probabilities, kind="stable") == np.argsort(scores, kind="stable")).all()


def test_a_score_ranking_the_classes_backwards_gets_the_prevalence():
    scores, labels = miscalibrated(500, 3)
    calibration = fit_calibration(-scores, labels)
    assert calibrated(calibration, [-1.0, 0.0, 1.0]) == pytest.approx([labels.mean()] * 3)


def test_a_separable_tiny_validation_split_does_not_give_certainties():
    calibration = fit_calibration([0.49, 0.495, 0.5, 0.51, 0.52], [0, 0, 0, 1, 1])
    assert 0.02 < calibrated(calibration, [0.49])[0] < calibrated(calibration, [0.52])[0] < 0.98


def test_ece_is_the_count_weighted_gap_per_bin_of_equal_counts():
    probabilities = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.9])
    labels = np.array([0, 0, 1, 0, 1, 1])
    # 3 bins of two: |0.15 - 0| , |0.35 - 0.5|, |0.75 - 1|, each weighing 2 of 6
    assert expected_calibration_error(labels, probabilities, bins=3) == pytest.approx((0.15 + 0.15 + 0.25) / 3)


@pytest.mark.parametrize("calibration", [None, {"method": "cubic"}, {"method": "platt", "coef": 1.0},
                                         {"method": "platt", "coef": float("nan"), "intercept": 0.0, "prevalence": 0.2},
                                         {"method": "platt", "coef": 1.0, "intercept": 0.0, "prevalence": 1.5},
                                         {"method": "isotonic", "x": "abc", "y": [0.1], "prevalence": 0.2}])
def test_a_damaged_stored_map_is_named(calibration):
    assert calibration_problem(calibration)


@pytest.mark.parametrize("probability, threshold, digits", [
    (0.4988, 0.4991, 4),   # at 2 and 3 decimals both print 0.50 / 0.499: benign would look wrong
    (0.23, 0.31, 2), (0.31, 0.31, 2), (0.3104, 0.31, 2), (0.309551, 0.30958, 5)])
def test_printed_probability_stands_on_its_verdicts_side_of_the_threshold(probability, threshold, digits):
    assert digits_to_agree(probability, threshold) == digits
    shown_p, shown_t = round(probability, digits), round(threshold, digits)
    assert (shown_p >= shown_t) == (probability >= threshold)
