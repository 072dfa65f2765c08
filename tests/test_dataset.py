"""Tests of dataset.py: finding the split folders, loading a split (broken files, the benign cap,
--extra-train folders), the design's pairs, the batch samplers, transforms and datasets."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import dataset
import synthetic
from dataset import (BalancedBatches, ImageDataset, PairDataset, ShuffledBatches, batch_pairs, eval_transform,
                     list_split, load_split, load_train_split, make_pairs, train_transform)
from helpers import BROKEN_FILES
from images import DataError, cached_side, read_rgb

TINY_COUNTS = {"train": (8, 6), "validation": (6, 4), "test": (6, 4)}
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def copy_of(data_dir, tmp_path):
    """A private copy of the session's tiny data folder, for tests that change files."""
    return Path(shutil.copytree(data_dir, tmp_path / "data"))


def anchors_of(batch):
    return [i for i, _, is_anchor in batch if is_anchor]


# ---------------------------------------------------------------------------------------------
# list_split / load_split


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_list_split_returns_sorted_paths_with_labels_per_class_folder(tiny_data_dir, split):
    paths, labels = list_split(tiny_data_dir, split)
    benign, malignant = TINY_COUNTS[split]
    assert labels == [0] * benign + [1] * malignant
    assert [p.parent.name for p in paths] == ["0"] * benign + ["1"] * malignant
    assert all(p.parent.parent.name == dataset.SPLITS[split] for p in paths)
    assert paths[:benign] == sorted(paths[:benign]) and paths[benign:] == sorted(paths[benign:])


def test_list_split_skips_hidden_files_and_folders(tiny_data_dir, tmp_path):
    data = copy_of(tiny_data_dir, tmp_path)
    (data / "train_data" / "0" / ".DS_Store").write_bytes(b"junk")
    (data / "train_data" / "1" / ".ipynb_checkpoints").mkdir()
    (data / "train_data" / ".Trashes").mkdir()
    paths, labels = list_split(data, "train")
    assert len(paths) == sum(TINY_COUNTS["train"])
    assert not any(p.name.startswith(".") or p.is_dir() for p in paths)


def _extra_class_folder(split):
    (split / "2").mkdir()
    (split / "1" / "SYN_train_1_0000.jpg").rename(split / "2" / "moved.jpg")
    return split / "2", "the classes are"


def _nested_folder(split):
    (split / "1" / "batch2").mkdir()
    for path in sorted((split / "1").glob("*.jpg"))[:3]:
        path.rename(split / "1" / "batch2" / path.name)
    return split / "1" / "batch2", "inside a class folder"


def _file_beside_the_class_folders(split):
    (split / "SYN_train_1_0000.jpg").write_bytes(b"an unlabelled image")
    return split / "SYN_train_1_0000.jpg", "unexpected file"


def _link_to_a_missing_file(split):
    (split / "0" / "IMG_17.jpg").symlink_to("../store/IMG_17.jpg")  # what a split of symlinks left
    return split / "0" / "IMG_17.jpg", "missing file"


@pytest.mark.parametrize("damage", [_extra_class_folder, _nested_folder, _file_beside_the_class_folders,
                                    _link_to_a_missing_file])
def test_unexpected_entry_in_a_split_is_a_one_line_data_error_naming_it(tiny_data_dir, tmp_path, damage):
    data = copy_of(tiny_data_dir, tmp_path)
    path, what = damage(data / "train_data")
    with pytest.raises(DataError) as error:
        load_split(data, "train")
    message = str(error.value)
    assert message.startswith(f"{path}: ") and what in message and "\n" not in message


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_load_split_counts_and_labels(tiny_data_dir, split):
    loaded = load_split(tiny_data_dir, split)
    assert len(loaded) == sum(TINY_COUNTS[split])
    assert loaded.counts() == list(TINY_COUNTS[split])
    assert loaded.labels.dtype == np.int64 and loaded.excluded == []
    assert loaded.paths == list_split(tiny_data_dir, split)[0]
    assert loaded.read(0).shape == (3, 48, 48) and loaded.read(0).dtype == torch.uint8


def test_missing_data_folder_raises_data_error_with_layout(tmp_path):
    with pytest.raises(DataError) as error:
        list_split(tmp_path / "nowhere", "train")
    assert "nowhere" in str(error.value) and "expected layout" in str(error.value)


def test_missing_split_folder_raises_data_error_naming_it(tiny_data_dir, tmp_path):
    data = copy_of(tiny_data_dir, tmp_path)
    shutil.rmtree(data / "validation_data")
    with pytest.raises(DataError) as error:
        load_split(data, "validation")
    message = str(error.value)
    assert str(data / "validation_data" / "0") in message and "expected layout" in message
    assert load_split(data, "train").counts() == list(TINY_COUNTS["train"])  # other splits still load


def test_missing_class_folder_raises_data_error_naming_it(tiny_data_dir, tmp_path):
    data = copy_of(tiny_data_dir, tmp_path)
    shutil.rmtree(data / "test_data" / "1")
    with pytest.raises(DataError) as error:
        list_split(data, "test")
    message = str(error.value)
    assert str(data / "test_data" / "1") in message and "expected layout" in message


def test_load_split_with_one_class_raises_data_error(tiny_data_dir, tmp_path):
    data = copy_of(tiny_data_dir, tmp_path)
    for file in (data / "train_data" / "1").iterdir():
        file.unlink()
    with pytest.raises(DataError) as error:
        load_split(data, "train")
    assert str(data / "train_data" / "1") in str(error.value) and "malignant" in str(error.value)


def test_load_split_raises_when_every_image_of_a_class_is_broken(tiny_data_dir, tmp_path):
    data = copy_of(tiny_data_dir, tmp_path)
    for file in (data / "validation_data" / "1").iterdir():
        file.write_bytes(b"")  # all malignant images empty: all excluded
    with pytest.raises(DataError, match="no usable malignant images"):
        load_split(data, "validation")


def test_load_split_excludes_broken_files_and_says_why(tiny_data_dir, tmp_path):
    data = copy_of(tiny_data_dir, tmp_path)
    folder = data / "train_data" / "0"
    good = sorted(folder.iterdir())[0].read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image at all")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    loaded = load_split(data, "train")
    assert loaded.counts() == list(TINY_COUNTS["train"])
    reasons = {path.name: reason for path, reason in loaded.excluded}
    assert set(reasons) == {"empty.jpg", "text.jpg", "truncated.jpg"}
    assert reasons["empty.jpg"] == "empty file" and reasons["text.jpg"] == "not an image"
    assert "truncated" in reasons["truncated.jpg"]
    assert not any(p.name in reasons for p in loaded.paths)
    assert dataset.write_excluded([loaded], tmp_path / "excluded.txt") == 3
    assert len((tmp_path / "excluded.txt").read_text().splitlines()) == 3


def test_load_split_excludes_broken_files_keeps_odd_formats_and_ignores_hidden_files(broken_data_dir):
    split = load_split(broken_data_dir, "train", workers=2)
    names = {p.name for p in split.paths}
    assert {"SYN_train_0_0000.jpg", "SYN_train_1_0000.jpg", "SYN_train_0_0001.jpg", "SYN_train_1_0001.jpg"} <= names
    assert split.counts() == list(TINY_COUNTS["train"])  # its usable images: those of tiny_data_dir
    assert {p.name for p, _ in split.excluded} == BROKEN_FILES - {"zero_val.jpg"}
    assert ".DS_Store" not in names
    for index in range(len(split)):
        image = split.read(index)
        assert image.dtype == torch.uint8 and image.shape[0] == 3


# ---------------------------------------------------------------------------------------------
# benign_limit


def benign_names(split):
    return [p.name for p, label in zip(split.paths, split.labels) if label == 0]


def test_benign_limit_keeps_a_seeded_subset_and_every_malignant_image(tiny_data_dir):
    full = load_split(tiny_data_dir, "train")
    capped = load_split(tiny_data_dir, "train", benign_limit=3, seed=0)
    assert capped.counts() == [3, TINY_COUNTS["train"][1]]
    assert set(benign_names(capped)) < set(benign_names(full))
    assert [p for p, label in zip(capped.paths, capped.labels) if label == 1] == \
        [p for p, label in zip(full.paths, full.labels) if label == 1]
    assert capped.paths == sorted(capped.paths, key=full.paths.index)  # the original order is kept
    assert [p.parent.name for p in capped.paths] == [str(label) for label in capped.labels]


def test_benign_limit_subset_is_the_same_for_a_seed_and_differs_for_another(tiny_data_dir):
    first = benign_names(load_split(tiny_data_dir, "train", benign_limit=3, seed=0))
    again = benign_names(load_split(tiny_data_dir, "train", benign_limit=3, seed=0))
    other = benign_names(load_split(tiny_data_dir, "train", benign_limit=3, seed=1))
    assert first == again
    assert first != other


def test_benign_limit_at_or_above_the_benign_count_keeps_everything(tiny_data_dir):
    for limit in (0, 8, 100):
        assert load_split(tiny_data_dir, "train", benign_limit=limit).counts() == list(TINY_COUNTS["train"])


# ---------------------------------------------------------------------------------------------
# load_train_split: --data's training split and the --extra-train folders


def extra_folder(tiny_data_dir, tmp_path):
    """Another data set (a split folder with train and validation) holding a resized, re-encoded
    copy of one of tiny_data_dir's test images among its malignant training images."""
    extra = tmp_path / "extra"
    synthetic.make_synthetic(extra, size=40, seed=3, counts={"train": (5, 4), "validation": (3, 3)})
    test_image = sorted((tiny_data_dir / "test_data" / "1").iterdir())[0]
    Image.open(test_image).resize((40, 40)).save(extra / "train_data" / "1" / "copy.jpg", quality=80)
    return extra, test_image


def test_extra_training_images_join_every_split_of_theirs_less_copies_of_test_images(tiny_data_dir, tmp_path):
    extra, test_image = extra_folder(tiny_data_dir, tmp_path)
    train = load_train_split(tiny_data_dir, [extra])
    own = load_split(tiny_data_dir, "train")
    assert train.paths[:len(own)] == own.paths  # --data's own images first, in their order
    added = train.paths[len(own):]
    assert len(added) == 5 + 4 + 3 + 3 and train.extra == {str(extra): 15}
    assert {p.parent.parent.name for p in added} == {"train_data", "validation_data"}
    assert [p.parent.name for p in train.paths] == [str(label) for label in train.labels]
    assert [(a.name, b) for a, b, _ in train.dropped] == [("copy.jpg", test_image)]
    # never an image of --data's validation or test split, nor a copy of one
    held_out = set(list_split(tiny_data_dir, "validation")[0] + list_split(tiny_data_dir, "test")[0])
    assert not held_out & set(train.paths) and extra / "train_data" / "1" / "copy.jpg" not in train.paths
    assert load_train_split(tiny_data_dir, [extra], benign_limit=4).counts() == [4, 6 + 4 + 3]  # the cap: on the whole


def test_extra_training_folder_inside_data_or_unlabelled_is_refused(tiny_data_dir, tmp_path):
    with pytest.raises(DataError, match="overlaps --data"):
        load_train_split(tiny_data_dir, [tiny_data_dir / "test_data"])
    (tmp_path / "loose").mkdir()
    with pytest.raises(DataError, match="neither a split folder nor a folder with 0/ and 1/"):
        load_train_split(tiny_data_dir, [tmp_path / "loose"])


# ---------------------------------------------------------------------------------------------
# make_pairs and batch_pairs


@pytest.fixture(scope="module")
def many_labels():
    rng = np.random.default_rng(7)
    return (rng.random(2000) < 0.1).astype(np.int64)  # about 10 % malignant, like a capped split


def test_make_pairs_targets_are_near_half_and_partners_have_the_right_class(many_labels):
    partners, targets = make_pairs(many_labels, seed=0)
    assert partners.shape == targets.shape == (2000,) and targets.dtype == np.float32
    assert set(np.unique(targets)) == {0.0, 1.0}
    assert 0.45 <= targets.mean() <= 0.55
    same = many_labels[partners] == many_labels
    assert np.array_equal(same, targets == 1)
    assert partners.min() >= 0 and partners.max() < 2000


def test_make_pairs_uses_many_different_partners_of_the_rare_class(many_labels):
    partners, targets = make_pairs(many_labels, seed=0)
    malignant_partners = partners[many_labels[partners] == 1]
    # partners are drawn from the whole class, not a few of its images
    assert len(np.unique(malignant_partners)) > 0.8 * (many_labels == 1).sum()


def test_make_pairs_is_fixed_by_the_seed(many_labels):
    p1, t1 = make_pairs(many_labels, seed=3)
    p2, t2 = make_pairs(many_labels, seed=3)
    p3, t3 = make_pairs(many_labels, seed=4)
    assert np.array_equal(p1, p2) and np.array_equal(t1, t2)
    assert not np.array_equal(p1, p3) and not np.array_equal(t1, t3)


def test_batch_pairs_partners_have_the_right_class_never_the_anchor_and_only_anchors_pair():
    rng = np.random.default_rng(0)
    for seed in range(20):
        labels = torch.as_tensor(rng.integers(0, 2, 24))
        labels[:2] = torch.tensor([0, 1])
        labels[-4:] = torch.tensor([0, 0, 1, 1])  # the partner-only images: two of each class
        is_anchor = torch.ones(24, dtype=torch.bool)
        is_anchor[-4:] = False
        anchors, partners, targets = batch_pairs(labels, is_anchor, torch.Generator().manual_seed(seed))
        assert torch.equal(anchors, torch.arange(20))
        assert targets.dtype == torch.float32 and set(targets.tolist()) <= {0.0, 1.0}
        assert torch.equal(labels[partners] == labels[anchors], targets == 1)
        assert not (partners == anchors).any()


def test_batch_pairs_draws_both_targets_and_is_fixed_by_the_generator():
    labels = torch.tensor([0, 1] * 32)
    is_anchor = torch.tensor([True, False] * 32)
    first = batch_pairs(labels, is_anchor, torch.Generator().manual_seed(1))
    again = batch_pairs(labels, is_anchor, torch.Generator().manual_seed(1))
    assert torch.equal(first[0], torch.arange(0, 64, 2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert 0 < first[2].mean() < 1


# ---------------------------------------------------------------------------------------------
# ShuffledBatches


def labels_n(n, malignant_every=4):
    return np.array([1 if i % malignant_every == 0 else 0 for i in range(n)])


def test_shuffled_batches_use_every_index_once_as_anchor_per_epoch():
    labels = labels_n(42)
    sampler = ShuffledBatches(labels, batch_size=8, seed=0, partners_per_class=2, drop_last=False)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        anchors = [i for batch in batches for i in anchors_of(batch)]
        assert sorted(anchors) == list(range(42))
        assert len(batches) == len(sampler) == 6
        assert all(e == epoch for batch in batches for _, e, _ in batch)


def test_shuffled_batches_drop_last_leaves_out_only_the_remainder():
    sampler = ShuffledBatches(labels_n(42), batch_size=8, seed=0, drop_last=True)
    anchors = [i for batch in sampler for i in anchors_of(batch)]
    assert len(anchors) == len(set(anchors)) == 40
    assert all(len(batch) == 8 for batch in sampler)


def test_shuffled_batches_smaller_than_one_batch_are_still_one_batch():
    sampler = ShuffledBatches(labels_n(5), batch_size=8, seed=0, drop_last=True)
    assert [sorted(anchors_of(b)) for b in sampler] == [[0, 1, 2, 3, 4]]


def test_shuffled_batches_top_up_each_class_to_partners_per_class():
    labels = labels_n(40)  # 10 malignant, 30 benign: most batches of 8 hold only 1-3 malignant anchors
    sampler = ShuffledBatches(labels, batch_size=8, seed=0, partners_per_class=3)
    topped_up = 0
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in sampler:
            anchors = anchors_of(batch)
            extras = [i for i, _, is_anchor in batch if not is_anchor]
            assert len(anchors) == 8
            for c in (0, 1):
                in_anchors = int((labels[anchors] == c).sum())
                assert int((labels[extras] == c).sum()) == max(0, 3 - in_anchors)  # only what is missing
            topped_up += len(extras)
            members = labels[[i for i, _, _ in batch]]
            # every anchor position finds another position of its class and one of the other class
            assert (members == 0).sum() >= 3 and (members == 1).sum() >= 3
    assert topped_up > 0


def test_shuffled_batches_without_partners_are_anchors_only():
    sampler = ShuffledBatches(labels_n(40), batch_size=8, seed=0, partners_per_class=0)
    assert all(is_anchor for batch in sampler for _, _, is_anchor in batch)


def test_shuffled_batches_order_changes_with_epoch_and_is_fixed_by_the_seed():
    labels = labels_n(40)
    a = ShuffledBatches(labels, batch_size=8, seed=0, partners_per_class=1)
    b = ShuffledBatches(labels, batch_size=8, seed=0, partners_per_class=1)
    c = ShuffledBatches(labels, batch_size=8, seed=1, partners_per_class=1)
    epoch0 = list(a)
    assert epoch0 == list(b)
    assert epoch0 != list(c)
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 == list(b)
    assert [anchors_of(x) for x in epoch1] != [anchors_of(x) for x in epoch0]


@pytest.mark.parametrize("world_size", [2, 3])
def test_shuffled_batches_split_across_ranks_disjoint_and_equal(world_size):
    labels = labels_n(42)
    whole = ShuffledBatches(labels, batch_size=4, seed=5, partners_per_class=1)
    ranks = [ShuffledBatches(labels, batch_size=4, seed=5, partners_per_class=1, rank=r, world_size=world_size)
             for r in range(world_size)]
    for epoch in (0, 3):
        for sampler in [whole] + ranks:
            sampler.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        counts = {len(batches) for batches in per_rank}
        assert counts == {10 // world_size}  # equal on every rank, or DDP would wait forever
        anchor_sets = [{i for batch in batches for i in anchors_of(batch)} for batches in per_rank]
        for r in range(world_size):
            for q in range(r + 1, world_size):
                assert not anchor_sets[r] & anchor_sets[q]
        union = set().union(*anchor_sets)
        used = world_size * (10 // world_size)
        # the ranks share one plan: together they take its first `used` batches (42 = 10 * 4 + 2)
        assert union == {i for batch in list(whole)[:used] for i in anchors_of(batch)}
        assert len(union) == 4 * used


def test_shuffled_batches_set_epoch_start_skips_the_batches_already_done():
    labels = labels_n(40)
    sampler = ShuffledBatches(labels, batch_size=4, seed=0, partners_per_class=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=3)
    resumed = list(sampler)
    assert resumed == full[3:]
    sampler.set_epoch(3)
    assert len(list(sampler)) == len(full)  # the next epoch starts from the beginning again


def test_shuffled_batches_len_after_resume_equals_the_batches_it_yields():
    sampler = ShuffledBatches(labels_n(40), batch_size=4, seed=0)
    sampler.set_epoch(2, start=3)
    assert len(sampler) == len(list(sampler)) == 7


# ---------------------------------------------------------------------------------------------
# BalancedBatches


def test_balanced_batches_have_per_class_of_each_class_and_as_many_images_as_the_split():
    labels = np.array([0] * 24 + [1] * 5)
    sampler = BalancedBatches(labels, per_class=4, seed=0)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 29 // 8  # an epoch holds as many images as the split
        benign, malignant = [], []
        for batch in batches:
            indices = [i for i, _, _ in batch]
            assert all(is_anchor for _, _, is_anchor in batch)
            assert sorted(labels[indices].tolist()) == [0] * 4 + [1] * 4
            benign += [i for i in indices if labels[i] == 0]
            malignant += [i for i in indices if labels[i] == 1]
        assert len(set(benign)) == len(benign) == 12  # benign: a fresh subset, no repeats
        counts = np.bincount(malignant, minlength=29)[24:]
        assert len(malignant) == 12 and counts.min() >= 2 and counts.max() <= 3  # reshuffled passes


def test_balanced_batches_are_seeded_and_change_with_epoch():
    labels = np.array([0] * 24 + [1] * 5)
    a, b = BalancedBatches(labels, 4, seed=0), BalancedBatches(labels, 4, seed=0)
    assert list(a) == list(b) and list(a) != list(BalancedBatches(labels, 4, seed=1))
    first = [[i for i, _, _ in batch] for batch in a]
    a.set_epoch(1)
    assert [[i for i, _, _ in batch] for batch in a] != first


# ---------------------------------------------------------------------------------------------
# Transforms


@pytest.fixture(scope="module")
def uint8_image():
    return torch.from_numpy(synthetic.synthetic_lesion(np.random.default_rng(0), True, 48)).permute(2, 0, 1).contiguous()


NORMALISED_LOW = min((0 - m) / s for m, s in zip(dataset.IMAGENET_MEAN, dataset.IMAGENET_STD))
NORMALISED_HIGH = max((1 - m) / s for m, s in zip(dataset.IMAGENET_MEAN, dataset.IMAGENET_STD))


def test_train_transform_gives_normalised_float_images_of_the_size(uint8_image):
    transform = train_transform(32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = transform(uint8_image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert NORMALISED_LOW - 1e-4 <= out.min() and out.max() <= NORMALISED_HIGH + 1e-4
    assert out.std() > 0.1


def test_train_transform_is_random(uint8_image):
    transform = train_transform(32)
    with torch.random.fork_rng(devices=[]):
        outs = []
        for seed in range(4):
            torch.manual_seed(seed)
            outs.append(transform(uint8_image))
        torch.manual_seed(0)
        repeat = transform(uint8_image)
    assert torch.equal(outs[0], repeat)
    assert all(not torch.equal(outs[0], other) for other in outs[1:])


def test_train_transform_has_the_study_parameters():
    steps = train_transform(224).transforms
    presize, affine, crop, flip = steps[0], steps[1], steps[2], steps[3]
    assert isinstance(presize, v2.Resize) and tuple(presize.size) == (256, 256)  # the Kaggle images' size
    assert isinstance(affine, v2.RandomAffine) and list(affine.degrees) == [-20.0, 20.0]
    assert tuple(affine.translate) == (0.2, 0.2)
    assert isinstance(crop, v2.RandomResizedCrop) and tuple(crop.size) == (224, 224)
    assert tuple(crop.scale) == (0.7, 1.0)
    assert isinstance(flip, v2.RandomHorizontalFlip) and flip.p == 0.5
    normalize = steps[-1]
    assert tuple(normalize.mean) == dataset.IMAGENET_MEAN and tuple(normalize.std) == dataset.IMAGENET_STD


def test_eval_transform_is_deterministic_and_is_resize_then_normalise(uint8_image):
    transform = eval_transform(32)
    first, second = transform(uint8_image), transform(uint8_image)
    assert torch.equal(first, second) and first.shape == (3, 32, 32) and first.dtype == torch.float32
    cached = v2.functional.resize(uint8_image, [cached_side(32)] * 2, antialias=True)  # as the cache stores it
    resized = v2.functional.resize(cached, [32, 32], antialias=True).float() / 255
    mean = torch.tensor(dataset.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(dataset.IMAGENET_STD)[:, None, None]
    assert torch.allclose(first, (resized - mean) / std, atol=1e-5)
    # denormalize is its inverse, for plotting
    assert np.allclose(dataset.denormalize(first), resized.permute(1, 2, 0).numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# ImageDataset and PairDataset


@pytest.fixture(scope="module")
def train_split(tiny_data_dir):
    return load_split(tiny_data_dir, "train")


def test_image_dataset_augmentation_is_fixed_per_index_and_epoch(train_split):
    data = ImageDataset(train_split, train_transform(32), seed=0, augment=True)
    image, label, is_anchor = data[(3, 1, True)]
    again = data[(3, 1, True)]
    assert torch.equal(image, again[0])
    assert (label, is_anchor) == (int(train_split.labels[3]), True)
    assert not torch.equal(image, data[(3, 2, True)][0])  # another epoch, another augmentation
    assert not torch.equal(image, ImageDataset(train_split, train_transform(32), seed=1, augment=True)[(3, 1, True)][0])
    assert data[(3, 1, False)][2] is False


def test_image_dataset_augmentation_leaves_the_global_rng_untouched(train_split):
    data = ImageDataset(train_split, train_transform(32), seed=0, augment=True)
    before = torch.get_rng_state()
    for item in [(0, 0, True), (5, 3, True), (9, 1, False)]:
        data[item]
    assert torch.equal(torch.get_rng_state(), before)


def test_image_dataset_plain_index_is_epoch_zero_anchor(train_split):
    data = ImageDataset(train_split, eval_transform(32))
    image, label, is_anchor = data[7]
    assert torch.equal(image, eval_transform(32)(read_rgb(train_split.paths[7])))
    assert (label, is_anchor) == (int(train_split.labels[7]), True)
    assert len(data) == len(train_split)
    images, labels, anchors = dataset.collate_images([data[0], data[9]])
    assert images.shape == (2, 3, 32, 32)
    assert labels.tolist() == [int(train_split.labels[0]), int(train_split.labels[9])]
    assert anchors.tolist() == [True, True]


def test_pair_dataset_items_follow_make_pairs_with_seed_plus_epoch(train_split):
    seed = 5
    data = PairDataset(train_split, eval_transform(32), seed=seed)
    reference = [eval_transform(32)(train_split.read(i)) for i in range(len(train_split))]
    for epoch in (0, 1):
        partners, targets = make_pairs(train_split.labels, seed + epoch)
        for index in range(len(train_split)):
            first, second, target = data[(index, epoch, True)]
            assert torch.equal(first, reference[index])
            assert torch.equal(second, reference[int(partners[index])])
            assert target == targets[index]
            assert (target == 1) == (train_split.labels[partners[index]] == train_split.labels[index])
    first, second, target = data[4]  # a plain index: the fixed pairs of epoch 0
    partners, targets = make_pairs(train_split.labels, seed)
    assert torch.equal(second, reference[int(partners[4])]) and target == targets[4]


def test_pair_dataset_augments_each_image_as_image_dataset_does(train_split):
    pairs = PairDataset(train_split, train_transform(32), seed=2, augment=True)
    images = ImageDataset(train_split, train_transform(32), seed=2, augment=True)
    partners, _ = make_pairs(train_split.labels, 2 + 1)
    first, second, _ = pairs[(6, 1, True)]
    assert torch.equal(first, images[(6, 1, True)][0])
    assert torch.equal(second, images[(int(partners[6]), 1, True)][0])
