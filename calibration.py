"""From an image-level score to a probability of melanoma. A gallery score is a similarity
average and a classifier's output is trained on balanced batches: neither is the chance that a
lesion is a melanoma. A monotone map fitted on the validation split by log loss turns either into
one, at the validation split's prevalence (Platt scaling: a one-feature logistic regression;
isotonic regression as the option). The map is monotone, so the AUC and the verdict at the
threshold do not change; the probability does, and a clinic whose prevalence differs refits it
on its own images (predict.py --gallery)."""
import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, log_loss

CALIBRATIONS = ("platt", "isotonic")
ECE_BINS = 10


def fit_calibration(scores, labels, method="platt"):
    """The map fitted on (scores, labels) of the validation split, as plain values that save with
    weights_only=True: {"method", "prevalence", and "coef" and "intercept" (platt) or "x" and "y"
    (isotonic)}. A score that ranks the classes the wrong way round gets a flat map: the prevalence."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    calibration = {"method": method, "prevalence": float(labels.mean())}
    if method == "isotonic":
        isotonic = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(scores, labels)
        return {**calibration, "x": isotonic.X_thresholds_.tolist(), "y": isotonic.y_thresholds_.tolist()}
    # on the standardised score, with scikit-learn's mild default penalty: a gallery score spans a
    # few hundredths, and a validation split that the score separates perfectly (tiny data) would
    # otherwise drive the slope to infinity and every probability to 0 or 1
    mean, scale = scores.mean(), scores.std() or 1.0
    platt = LogisticRegression().fit(((scores - mean) / scale)[:, None], labels)
    coef = float(platt.coef_[0, 0] / scale)
    intercept = float(platt.intercept_[0] - coef * mean)
    if coef <= 0:
        coef, intercept = 0.0, float(np.log(calibration["prevalence"] / (1 - calibration["prevalence"])))
    return {**calibration, "coef": coef, "intercept": intercept}


def calibrated(calibration, scores):
    """P(malignant) of each score by the fitted map."""
    scores = np.asarray(scores, dtype=np.float64)
    if calibration["method"] == "isotonic":
        return np.interp(scores, calibration["x"], calibration["y"])
    return 1 / (1 + np.exp(-(calibration["coef"] * scores + calibration["intercept"])))


def calibration_problem(calibration):
    """What makes a stored map unusable, or None (gallery.pt is loaded from disk)."""
    if not isinstance(calibration, dict) or calibration.get("method") not in CALIBRATIONS:
        return "its calibration is missing or not a map this repository writes"
    keys = ("coef", "intercept") if calibration["method"] == "platt" else ("x", "y")
    values = [calibration.get(key) for key in (*keys, "prevalence")]
    numbers = [np.asarray(v, dtype=np.float64) if isinstance(v, (int, float, list)) and not isinstance(v, bool)
               else None for v in values]
    if any(n is None or not np.isfinite(n).all() for n in numbers) or not 0 < numbers[-1] < 1:
        return "its calibration holds values that are not finite numbers"
    return None


def expected_calibration_error(labels, probabilities, bins=ECE_BINS):
    """ECE over `bins` bins of equal counts (quantiles of the probabilities): the count-weighted mean
    gap between each bin's mean probability and its share of melanomas."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=np.float64)
    order = np.argsort(probabilities, kind="stable")
    return float(sum(len(b) * abs(probabilities[b].mean() - labels[b].mean())
                     for b in np.array_split(order, bins) if len(b)) / len(labels))


def calibration_metrics(labels, probabilities):
    """{ece, brier, log_loss} of probabilities in [0, 1] (clipped there first: a raw score may leave it)."""
    probabilities = np.clip(np.asarray(probabilities, dtype=np.float64), 0, 1)
    return {"ece": expected_calibration_error(labels, probabilities),
            "brier": float(brier_score_loss(labels, probabilities)),
            "log_loss": float(log_loss(labels, np.clip(probabilities, 1e-7, 1 - 1e-7), labels=[0, 1]))}


def digits_to_agree(probability, threshold, least=2, most=6):
    """The fewest decimals (at least `least`) at which the printed probability sits on the same
    side of the printed threshold as the values themselves, so that "0.50 benign (threshold 0.50)"
    never appears."""
    if probability >= threshold:  # rounding is monotone: the printed values agree at any precision
        return least
    return next((d for d in range(least, most) if round(probability, d) < round(threshold, d)), most)
