"""Tests of stratified_split.py: the split drawn per class and by patient, and its fold arithmetic."""
from dataset import SPLITS
from stratified_split import choose_folds, draw_split_names, folds_per_split
from test_to_subdirectories import RATIOS


def test_draw_split_names_grouped_and_repeatable():
    labels = [int(i % 7 == 0) for i in range(700)]
    groups = [f"P{i // 4}" for i in range(700)]
    first = draw_split_names(labels, groups, RATIOS, seed=5)
    assert first == draw_split_names(labels, groups, RATIOS, seed=5)
    assert first != draw_split_names(labels, groups, RATIOS, seed=6)
    seen = {}
    for split, group in zip(first, groups):
        assert seen.setdefault(group, split) == split
    assert set(first) == set(SPLITS.values())


def test_fold_arithmetic():
    assert choose_folds((0.7, 0.15, 0.15)) == 20
    assert choose_folds((0.8, 0.1, 0.1)) == 10
    assert choose_folds((0.333, 0.333, 0.334)) == 100
    assert list(folds_per_split((0.7, 0.15, 0.15), 20)) == [14, 3, 3]
    assert list(folds_per_split((0.7, 0.15, 0.15), 5)) == [3, 1, 1]
    assert list(folds_per_split((0.9, 0.05, 0.05), 3)) == [1, 1, 1]
