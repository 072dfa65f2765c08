"""A split drawn per class (stratified) and, when patients are known, by patient (grouped: no
patient in two splits): scikit-learn's Stratified(Group)KFold cuts the images into folds, and
whole folds are given to the splits by ratio. to_subdirectories.py draws its split with it when
the CSV has no split column of its own."""
import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from dataset import SPLITS

MAX_FOLDS = 100  # folds are the unit the splits are built from: 100 folds = 1 % steps
ASSIGNMENT_TRIES = 1000  # random fold -> split assignments tried; the best one is kept


def choose_folds(ratios):
    """The fewest folds that represent the ratios exactly (0.7/0.15/0.15 -> 20 folds: 14/3/3).
    Fewer folds = bigger folds = smaller relative imbalance between them, and a faster
    StratifiedGroupKFold (its greedy search costs folds^2 per patient)."""
    for k in range(len(ratios), MAX_FOLDS + 1):
        exact = np.asarray(ratios) * k
        if np.all(np.abs(exact - np.round(exact)) < 1e-6) and np.all(np.round(exact) >= 1):
            return k
    return MAX_FOLDS


def folds_per_split(ratios, k):
    """Split k folds by ratio (largest remainder), at least one fold per split."""
    exact = np.asarray(ratios, dtype=float) * k
    n = np.maximum(np.floor(exact + 1e-9).astype(int), 1)
    while n.sum() < k:
        n[np.argmax(exact - n)] += 1
    while n.sum() > k:
        n[np.argmax(np.where(n > 1, n - exact, -np.inf))] -= 1
    return n


def draw_split_names(labels, groups, ratios, seed):
    """The split folder of each image (a value of dataset.SPLITS); ratios are in SPLITS's order.

    Stratified per class; with groups (patient ids), no group is in two splits. The images are
    cut into k folds with scikit-learn's Stratified(Group)KFold, then whole folds are given to the
    splits by ratio. Of ASSIGNMENT_TRIES random fold -> split assignments the one closest to the
    ratios in every class is kept: with patients of many images the folds are not exactly equal,
    and a lucky assignment fixes most of that (at full ISIC scale, worst class off by ~0.1 %
    instead of up to ~1 %).
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    k = choose_folds(ratios)
    if groups is None:
        k = min(k, int(np.bincount(labels).max()))  # StratifiedKFold needs k <= the biggest class
        cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        _, groups = np.unique(np.asarray(groups), return_inverse=True)
        k = min(k, int(groups.max()) + 1)  # StratifiedGroupKFold needs k <= number of groups
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    if k < len(ratios):
        raise ValueError(f"only {k} {'patients' if groups is not None else 'images'}: "
                         f"cannot split into {len(ratios)} parts")
    fold = np.empty(len(labels), dtype=int)
    with warnings.catch_warnings():  # "least populated class has only n members": checked by the caller
        warnings.simplefilter("ignore", UserWarning)
        for i, (_, test) in enumerate(cv.split(np.zeros(len(labels)), labels, groups)):
            fold[test] = i

    # Try random assignments of folds to splits; keep the one with the smallest worst deviation
    # from the target ratio (fraction of the class) over all classes and splits.
    per_fold = np.stack([np.bincount(fold[labels == c], minlength=k) for c in classes], axis=1)  # k x C
    position_split = np.repeat(np.arange(len(ratios)), folds_per_split(ratios, k))
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(k) for _ in range(ASSIGNMENT_TRIES)])  # [try, position] = fold
    split_of_fold = np.empty_like(perms)
    np.put_along_axis(split_of_fold, perms, np.broadcast_to(position_split, perms.shape), axis=1)
    counts = np.einsum("tks,kc->tsc", np.eye(len(ratios))[split_of_fold], per_fold)  # try x split x class
    deviation = np.abs(counts / per_fold.sum(0) - np.asarray(ratios)[None, :, None]).max(axis=(1, 2))
    empty = (counts == 0).sum(axis=(1, 2))  # a split without a class is worse than any deviation
    best = split_of_fold[np.argmin(empty * 10 + deviation)]
    folders = list(SPLITS.values())
    return [folders[s] for s in best[fold]]
