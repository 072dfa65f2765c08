"""The paired-image data of the Siamese melanoma study.

Reads the split layout that to_subdirectories.py writes,

    DATA/{train_data,validation_data,test_data}/{0,1}/*.jpg     (0 benign, 1 malignant)

keeps the usable images of a split (images.py checks and reads them, and caches them as uint8),
applies the study's transforms, and serves them either as the design's pairs (two images and a
same-class target) or as single images in batches from which pairs are drawn (embed-once
training and the metric-learning losses). synthetic.py writes a synthetic data set in this layout.
"""
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from files import overlaps, write_text_atomic
from images import DataError, cached_side, check_images, read_rgb
from near_duplicates import near_copies

SPLITS = {"train": "train_data", "validation": "validation_data", "test": "test_data"}
CLASSES = ("0", "1")  # folder names: 0 benign, 1 malignant
CLASS_NAMES = ("benign", "malignant")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXPECTED_TREE = """expected layout:
  DATA/train_data/0/*.jpg        benign
  DATA/train_data/1/*.jpg        malignant
  DATA/validation_data/{0,1}/*.jpg
  DATA/test_data/{0,1}/*.jpg
make it from the ISIC download with:
  python to_subdirectories.py --csv train-metadata.csv --images train-image/image --out DATA"""


# ---------------------------------------------------------------------------------------------
# Finding the split folders


def split_folder(data_dir, split):
    """The folder of a split; split None: data_dir itself holds 0/ and 1/ (a plain labelled folder)."""
    return Path(data_dir) / SPLITS[split] if split else Path(data_dir)


def has_split(data_dir, split):
    return split_folder(data_dir, split).is_dir()


def is_labelled_folder(data_dir):
    """DATA/0 and DATA/1 directly, instead of the split layout."""
    return all((Path(data_dir) / name).is_dir() for name in CLASSES) and not has_split(data_dir, "train")


def list_split(data_dir, split):
    """All files of one split as (paths, labels), sorted so the order never depends on the disk."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: no such folder\n{EXPECTED_TREE}")
    paths, labels = [], []
    for label, name in enumerate(CLASSES):
        folder = split_folder(data_dir, split) / name
        if not folder.is_dir():
            raise DataError(f"{folder}: missing folder\n{EXPECTED_TREE}")
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        paths += files
        labels += [label] * len(files)
    check_unexpected(split_folder(data_dir, split), data_dir)
    return paths, labels


def check_unexpected(folder, data_dir):
    """Entries whose images would be left out without a word stop the run instead: another class
    folder (train_data/2/), a folder inside a class folder (train_data/1/batch2/), a file beside
    the class folders, a link to a missing file. Hidden entries (.DS_Store) are ignored."""
    unexpected = [p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in CLASSES]
    for name in CLASSES:
        unexpected += [p for p in (folder / name).iterdir() if not p.name.startswith(".") and not p.is_file()]
    if not unexpected:
        return
    path = sorted(unexpected)[0]
    more = f" ({len(unexpected) - 1} more such entries)" if len(unexpected) > 1 else ""
    if path.parent == folder:
        what = (f"unexpected {'folder' if path.is_dir() else 'file'}{more}; the classes are {folder}/0 "
                f"(benign) and {folder}/1 (malignant): move its images into one of them, or move it out "
                f"of {data_dir}")
    elif path.is_dir():
        what = (f"a folder inside a class folder{more}; images must sit directly in {path.parent}: "
                f"move them up, or the folder out of {data_dir}")
    else:
        what = (f"a link to a missing file, or not a regular file{more}; delete it or re-create the split "
                f"with to_subdirectories.py")
    raise DataError(f"{path}: {what}")


# ---------------------------------------------------------------------------------------------
# The usable images of a split


class ImageSplit:
    """The usable images of one split: paths, labels, and a reader (the JPEG or the uint8 cache)."""

    def __init__(self, name, paths, labels, excluded):
        self.name, self.paths, self.labels, self.excluded = name, paths, np.asarray(labels), excluded
        self.cache = None  # a (N, 3, S, S) uint8 memmap once attach_cache() ran
        self.extra, self.dropped = {}, []  # load_train_split: images per --extra-train folder, near copies left out

    def __len__(self):
        return len(self.paths)

    def counts(self):
        return [int((self.labels == c).sum()) for c in range(len(CLASSES))]

    def read(self, index):
        if self.cache is not None:
            return torch.from_numpy(np.array(self.cache[index]))
        return read_rgb(self.paths[index])


def load_split(data_dir, split, benign_limit=0, seed=0, workers=8):
    """One split: list it, exclude broken files, cap the benign images (the study's dataset_size)."""
    paths, labels = list_split(data_dir, split)
    excluded = check_images(paths, workers)
    bad = {path for path, _ in excluded}
    labels = [label for path, label in zip(paths, labels) if path not in bad]
    paths = [path for path in paths if path not in bad]
    paths, labels = cap_benign(paths, np.asarray(labels, dtype=np.int64), benign_limit, seed)
    folder = split_folder(data_dir, split)
    for label, name in enumerate(CLASSES):
        if not (labels == label).any():
            broken = [f"{path.name} ({reason})" for path, reason in excluded if path.parent.name == name]
            detail = f" ({len(broken)} excluded as unusable, e.g. {broken[0]})" if broken else ""
            raise DataError(f"{folder / name}: no usable {CLASS_NAMES[label]} images{detail}; every split "
                            f"needs both classes (re-run to_subdirectories.py or add images)")
    return ImageSplit(split or Path(data_dir).name, paths, labels, excluded)


def cap_benign(paths, labels, benign_limit, seed):
    """A seeded random subset of benign_limit benign images (0: all) and every malignant one, the
    same in every run with this seed."""
    if not benign_limit or (labels == 0).sum() <= benign_limit:
        return paths, labels
    rng = np.random.default_rng(seed)
    benign = np.flatnonzero(labels == 0)
    keep = np.sort(np.concatenate([rng.choice(benign, benign_limit, replace=False), np.flatnonzero(labels == 1)]))
    return [paths[i] for i in keep], labels[keep]


def load_labelled_folder(folder, flag, workers=8):
    """Every usable image of a labelled folder a user names (--extra-train, --gallery): each split
    of a split folder, pooled, or FOLDER/0 and FOLDER/1."""
    if not Path(folder).is_dir():
        raise DataError(f"{flag} {folder}: no such folder")
    folder_splits = [name for name in SPLITS if has_split(folder, name)] or [None]
    if folder_splits == [None] and not is_labelled_folder(folder):
        raise DataError(f"{flag} {folder}: neither a split folder nor a folder with 0/ and 1/; make it with "
                        f"to_subdirectories.py, or put benign images in {folder}/0 and melanomas in {folder}/1")
    parts = [load_split(folder, name, 0, 0, workers) for name in folder_splits]
    return ImageSplit(Path(folder).name, [path for part in parts for path in part.paths],
                      np.concatenate([part.labels for part in parts]), [item for part in parts for item in part.excluded])


def load_train_split(data_dir, extra_train=(), benign_limit=0, seed=0, workers=8):
    """The training split: --data's, plus every image of each --extra-train folder
    (load_labelled_folder) that is not a near copy of an image of --data's validation or test
    split, so that no evaluated lesion is trained on. The benign cap applies to the whole.
    `extra` says how many images each folder gave, `dropped` which were left out as near copies."""
    if not extra_train:
        return load_split(data_dir, "train", benign_limit, seed, workers)
    held_out = [path for split in ("validation", "test") if has_split(data_dir, split)
                for path in list_split(data_dir, split)[0]]
    parts, extra, dropped = [load_split(data_dir, "train", 0, seed, workers)], {}, []
    for folder in extra_train:
        if overlaps(folder, data_dir):
            raise DataError(f"--extra-train {folder}: overlaps --data {data_dir}; extra training images "
                            f"come from another folder (its own splits are used whole)")
        part = load_labelled_folder(folder, "--extra-train", workers)
        copies = near_copies(part.paths, held_out, workers=workers)
        copied = {path for path, _, _ in copies}
        keep = [i for i, path in enumerate(part.paths) if path not in copied]
        parts.append(ImageSplit(part.name, [part.paths[i] for i in keep], part.labels[keep], part.excluded))
        extra[str(folder)], dropped = len(keep), dropped + copies
    paths = [path for part in parts for path in part.paths]
    paths, labels = cap_benign(paths, np.concatenate([part.labels for part in parts]), benign_limit, seed)
    train = ImageSplit("train", paths, labels, [item for part in parts for item in part.excluded])
    train.extra, train.dropped = extra, dropped
    return train


def write_excluded(splits, path):
    """The excluded files and why, one per line; returns how many."""
    rows = [f"{file}\t{reason}" for split in splits for file, reason in split.excluded]
    if rows:
        write_text_atomic(path, "\n".join(rows) + "\n")
    return len(rows)


# ---------------------------------------------------------------------------------------------
# Transforms


AUGMENTATIONS = ("study", "dermoscopy")


def train_transform(image_size, augment="study"):
    """Training augmentation on uint8 tensors. Images are first brought to cached_side (256 px for
    224: a no-op on the 256 px Kaggle images), so the JPEG and cached paths give identical inputs
    and the affine warp never runs on more pixels than the crop can use.
    study: the study's affine warp, crop and horizontal flip.
    dermoscopy: a lesion has no up, down or preferred orientation and dermatoscopes differ in
    colour, so add vertical flips, 90-degree rotations and colour jitter to the study's."""
    presize = cached_side(image_size)
    steps = [
        v2.Resize((presize, presize), antialias=True),
        v2.RandomAffine(degrees=20, translate=(0.2, 0.2), shear=0.2),
        v2.RandomResizedCrop(image_size, scale=(0.7, 1.0), antialias=True),
        v2.RandomHorizontalFlip(0.5),
    ]
    if augment == "dermoscopy":
        steps += [
            v2.RandomVerticalFlip(0.5),
            v2.RandomChoice([v2.RandomRotation((angle, angle)) for angle in (0, 90, 180, 270)]),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
        ]
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(image_size):
    """Deterministic, so a validation or test score does not change from run to run."""
    presize = cached_side(image_size)
    return v2.Compose([
        v2.Resize((presize, presize), antialias=True),  # as the cache stores it: same numbers with or without
        v2.Resize((image_size, image_size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def denormalize(image):
    """A normalised (3, H, W) tensor back to an (H, W, 3) array in [0, 1] for plotting."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (image.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------
# Pairs and datasets


def sample_seed(seed, epoch, index):
    """One seed per (run, epoch, image): augmentation that does not depend on worker or order."""
    return (seed * 1_000_003 + epoch * 100_003 + index) % (2 ** 63)


def make_pairs(labels, seed):
    """The design's pairs: each image gets target 1 (same class) or 0 (other class) with
    probability 1/2 and a random partner of that class. Returns (partners, targets)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, len(labels))
    partner_class = np.where(targets == 1, labels, 1 - labels)
    draws = rng.random(len(labels))
    partners = np.empty(len(labels), dtype=np.int64)
    for c in range(len(CLASSES)):
        pool, need = np.flatnonzero(labels == c), partner_class == c
        same = need & (labels == c)  # a same-class partner is another image, never the image itself
        if len(pool) < 2:
            same[:] = False
        size = np.where(same, len(pool) - 1, len(pool))[need]
        pick = (draws[need] * size).astype(np.int64)
        own = np.searchsorted(pool, np.flatnonzero(need))  # the image's own position in its class
        pick += same[need] & (pick >= own)
        partners[need] = pool[pick]
    return partners, targets.astype(np.float32)


def batch_pairs(labels, is_anchor, generator):
    """The design's pairs drawn inside a batch (embed-once): for every anchor, target 1 or 0 with
    probability 1/2 and a random other member of the batch of that class.
    Returns (anchor positions, partner positions, targets)."""
    anchors = torch.nonzero(is_anchor).squeeze(1)
    targets = torch.randint(0, 2, (len(anchors),), generator=generator)
    wanted = torch.where(targets == 1, labels[anchors], 1 - labels[anchors])
    # Candidates: batch members of the wanted class, never the anchor itself; random scores pick one.
    candidate = labels[None, :] == wanted[:, None]
    candidate[torch.arange(len(anchors)), anchors] = False
    scores = torch.rand(candidate.shape, generator=generator).masked_fill(~candidate, -1)
    partners = scores.argmax(1)
    return anchors, partners, targets.float()


class ImageDataset(Dataset):
    """Single images. Items are indices, or (index, epoch, is_anchor) from the batch samplers, so
    the epoch reaches persistent workers and the augmentation can be seeded per image."""

    def __init__(self, split, transform, seed=0, augment=False):
        self.split, self.transform, self.seed, self.augment = split, transform, seed, augment

    def __len__(self):
        return len(self.split)

    def image(self, index, epoch):
        image = self.split.read(index)
        if not self.augment:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream untouched
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image)

    def __getitem__(self, item):
        index, epoch, is_anchor = item if isinstance(item, tuple) else (item, 0, True)
        return self.image(index, epoch), int(self.split.labels[index]), is_anchor


class PairDataset(ImageDataset):
    """The design's pair dataset: (image, partner image, target). Training pairs are redrawn
    every epoch; validation and test pairs are fixed by the seed (epoch is always 0)."""

    def __init__(self, split, transform, seed=0, augment=False):
        super().__init__(split, transform, seed, augment)
        self._pairs_epoch, self._pairs = None, None

    def pairs(self, epoch):
        if self._pairs_epoch != epoch:
            self._pairs_epoch, self._pairs = epoch, make_pairs(self.split.labels, self.seed + epoch)
        return self._pairs

    def __getitem__(self, item):
        index, epoch, _ = item if isinstance(item, tuple) else (item, 0, True)
        partners, targets = self.pairs(epoch)
        partner = int(partners[index])
        return self.image(index, epoch), self.image(partner, epoch), targets[index]


# ---------------------------------------------------------------------------------------------
# Batch samplers. Each yields lists of (index, epoch, is_anchor). The full epoch is planned from
# (seed, epoch) alone, identically on every rank, and each rank takes every world_size-th batch:
# that is the distributed sampler, and it lets a resumed run skip the batches already done.


class _EpochBatches:
    def __init__(self, labels, seed, rank=0, world_size=1):
        self.labels = np.asarray(labels)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        """start: batches of this epoch already done (resuming mid-epoch)."""
        self.epoch, self.start = epoch, start

    def plan(self, rng):
        raise NotImplementedError

    def batches(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        plan = self.plan(rng)
        per_rank = len(plan) // self.world_size  # equal on every rank, or DDP would wait forever
        return plan[self.rank::self.world_size][:per_rank]

    def __len__(self):
        return max(0, len(self.batches()) - self.start)

    def __iter__(self):
        for batch in self.batches()[self.start:]:
            yield [(int(i), self.epoch, bool(a)) for i, a in batch]


class ShuffledBatches(_EpochBatches):
    """Every image once per epoch as an anchor, in random order, batch_size at a time. A class
    with fewer than partners_per_class anchors in a batch is topped up with random images of
    that class that serve only as pair partners, so every anchor finds a partner of either class
    inside the batch (embed-once). On ISIC 2020 (1.8 % malignant) that adds ~6 images to 128."""

    def __init__(self, labels, batch_size, seed, partners_per_class=0, drop_last=True, **kw):
        super().__init__(labels, seed, **kw)
        self.batch_size, self.partners_per_class, self.drop_last = batch_size, partners_per_class, drop_last

    def plan(self, rng):
        order = rng.permutation(len(self.labels))
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        stop = stop or len(order)  # a split smaller than one batch is still one batch
        by_class = [np.flatnonzero(self.labels == c) for c in range(len(CLASSES))]
        plan = []
        for begin in range(0, stop, self.batch_size):
            anchors = order[begin:begin + self.batch_size]
            batch = [(i, True) for i in anchors]
            for c, pool in enumerate(by_class):
                missing = self.partners_per_class - int((self.labels[anchors] == c).sum())
                if missing > 0:  # partners from outside the batch, so no image is paired with itself
                    outside = np.setdiff1d(pool, anchors)
                    outside = outside if len(outside) >= missing else pool
                    batch += [(i, False) for i in rng.choice(outside, missing, replace=len(outside) < missing)]
            plan.append(batch)
        return plan


class BalancedBatches(_EpochBatches):
    """per_class images of each class in every batch, so malignant images are not starved
    (metric learning also needs positives and negatives in each batch). An epoch holds as many
    images as the split, like a shuffled epoch; each class is drawn from reshuffled passes over
    it, so benign images are a fresh subset every epoch and malignant images repeat."""

    def __init__(self, labels, per_class, seed, **kw):
        super().__init__(labels, seed, **kw)
        self.per_class = per_class

    def plan(self, rng):
        n_batches = max(1, len(self.labels) // (2 * self.per_class))
        drawn = []
        for c in range(len(CLASSES)):
            pool = np.flatnonzero(self.labels == c)
            passes = math.ceil(n_batches * self.per_class / len(pool))
            drawn.append(np.concatenate([rng.permutation(pool) for _ in range(passes)]))
        plan = []
        for b in range(n_batches):
            window = slice(b * self.per_class, (b + 1) * self.per_class)
            plan.append([(i, True) for i in np.concatenate([drawn[0][window], drawn[1][window]])])
        return plan


def collate_images(batch):
    images, labels, is_anchor = zip(*batch)
    return torch.stack(images), torch.tensor(labels), torch.tensor(is_anchor)
