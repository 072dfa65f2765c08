"""Data for the Siamese melanoma study.

Reads the split layout that to_subdirectories.py writes,

    DATA/{train_data,validation_data,test_data}/{0,1}/*.jpg     (0 benign, 1 malignant)

checks the image files once, decodes them with torchvision (libjpeg-turbo) or reads them from a
uint8 cache, applies the study's transforms, and serves them either as the design's pairs (two
images and a same-class target) or as single images in batches from which pairs are drawn
(embed-once training and the metric-learning losses).

    python dataset.py --synthetic data/demo      # writes the synthetic demo data set
"""
import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from cli import ArgumentParser
from files import overlaps, remove_stale_temporaries, write_atomic, write_text_atomic
from near_duplicates import near_copies

SPLITS = {"train": "train_data", "validation": "validation_data", "test": "test_data"}
CLASSES = ("0", "1")  # folder names: 0 benign, 1 malignant
CLASS_NAMES = ("benign", "malignant")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
READER = 2  # read_rgb's version, part of the cache key: a cache holds images as read_rgb reads them
MAX_PIXELS = 64_000_000  # larger files are excluded: decoding them would stall a worker for seconds
EXPECTED_TREE = """expected layout:
  DATA/train_data/0/*.jpg        benign
  DATA/train_data/1/*.jpg        malignant
  DATA/validation_data/{0,1}/*.jpg
  DATA/test_data/{0,1}/*.jpg
make it from the ISIC download with:
  python to_subdirectories.py --csv train-metadata.csv --images train-image/image --out DATA"""


class DataError(Exception):
    """A problem with the user's data; the message names the file or folder and the fix."""


# ---------------------------------------------------------------------------------------------
# Finding and checking the images


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


def check_image(path):
    """Why the file cannot be used, or None. Header-level: fast enough for 33k files at start-up."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as image:
            width, height = image.size
            image_format = image.format
            if width * height > MAX_PIXELS:
                return f"too large ({width}x{height}); resize it below {MAX_PIXELS:,} pixels"
            # Decoding at 1/8 scale (JPEG DCT scaling) reads all the compressed data for a
            # fraction of a full decode, so damaged data is found now and not hours into a run.
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"unreadable ({error.__class__.__name__}: {error})"
    if image_format == "JPEG":
        # A truncated download lacks the end-of-image marker; decoding it would fail mid-epoch.
        with open(path, "rb") as file:
            file.seek(max(0, path.stat().st_size - 64))
            if b"\xff\xd9" not in file.read():
                return "truncated JPEG (no end-of-image marker)"
    return None


def check_images(paths, workers=8):
    """[(path, reason)] for the files that cannot be used, checked in parallel threads."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = list(pool.map(check_image, paths))
    return [(path, reason) for path, reason in zip(paths, reasons) if reason]


def read_rgb(path):
    """A uint8 RGB tensor (3, H, W) from any image file: JPEG, PNG, grayscale, CMYK, RGBA; of an
    animated image (GIF, WebP, also under a .jpg name) its first frame. Turned upright by its EXIF
    orientation (a phone photo is stored sideways with a tag saying so), in training, evaluation
    and on the page alike: this is the one function that reads an image."""
    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        image = image[0] if image.ndim == 4 else image  # (frames, 3, H, W): the first frame
        return image if image.dtype == torch.uint8 else v2.functional.to_dtype(image, torch.uint8, scale=True)
    except (RuntimeError, ValueError):
        pass  # torchvision does not decode every variant (CMYK JPEG, some PNG); PIL does
    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
            return torch.from_numpy(np.array(upright.convert("RGB"))).permute(2, 0, 1).contiguous()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot decode the image ({error}); delete or replace the file") from None


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
# The uint8 cache: images decoded and resized once, memory-mapped by every later epoch and run


def cached_side(image_size):
    """Images are cached a little above the training size so the random crop still has room."""
    return int(math.ceil(image_size * 8 / 7))


class _ResizedImages(Dataset):
    def __init__(self, split, size):
        self.split, self.size = split, size

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        image = read_rgb(self.split.paths[index])
        return v2.functional.resize(image, [self.size, self.size], antialias=True)


def attach_cache(split, cache_dir, image_size, workers=0):
    """Attach a memory-mapped uint8 copy of the split, building it when it is missing or stale."""
    size = cached_side(image_size)
    # The key changes when any file, its size or its time, the cache size, or how images are read
    # (READER: 2 since EXIF orientation and first frames) changes.
    digest = hashlib.sha1(f"{size} reader {READER}".encode())
    for path in split.paths:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    key = f"{split.name}-{size}px-{digest.hexdigest()[:16]}"
    cache_dir = Path(cache_dir)
    array_path, meta_path = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
    shape = (len(split), 3, size, size)
    split.cache = read_cache(array_path, meta_path, shape)
    if split.cache is None:  # missing, or damaged (a killed copy, a full disk): built again
        cache_dir.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temporaries(cache_dir)  # half-built caches of killed runs (gigabytes at full size)
        if stale:
            print(f"removed {len(stale)} half-built cache file(s) a killed run left in {cache_dir}")

        def build(tmp):
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            # its own generator: a run that builds the cache must draw the same random stream
            # (initialisation, dropout) as one that finds it built
            loader = DataLoader(_ResizedImages(split, size), batch_size=64, num_workers=workers,
                                generator=torch.Generator())
            start = 0
            for batch in loader:
                array[start:start + len(batch)] = batch.numpy()
                start += len(batch)
            array.flush()
        write_atomic(array_path, build)  # only a complete cache ever has the final name
        write_text_atomic(meta_path, json.dumps({"split": split.name, "images": len(split), "size": size}))
        split.cache = np.load(array_path, mmap_mode="r")
    return array_path


def read_cache(array_path, meta_path, shape):
    """The memory-mapped cache, or None when it is missing, unreadable or of another shape than
    its split and its metadata say."""
    try:
        meta = json.loads(meta_path.read_text())
        array = np.load(array_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    fits = (isinstance(meta, dict) and meta.get("images") == shape[0] and meta.get("size") == shape[2])
    return array if fits and array.shape == shape and array.dtype == np.uint8 else None


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


# ---------------------------------------------------------------------------------------------
# Synthetic demo data: benign = round, symmetric, one even colour; malignant = irregular border,
# asymmetric, several colours (the ABCD rule of dermoscopy, exaggerated so a CPU can learn it).

SYNTHETIC_COUNTS = {"train": (160, 80), "validation": (40, 20), "test": (60, 30)}  # benign, malignant


def synthetic_lesion(rng, malignant, size):
    """One (size, size, 3) uint8 image of a lesion on skin."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    skin = np.array([0.93, 0.76, 0.65]) + rng.normal(0, 0.03, 3)
    image = skin + rng.normal(0, 0.02, (size, size, 3))
    cx, cy = 0.5 + rng.normal(0, 0.04, 2)
    radius = rng.uniform(0.2, 0.3)
    angle = np.arctan2(yy - cy, xx - cx)
    distance = np.hypot(xx - cx, yy - cy)
    if malignant:
        # Irregular border: a few random harmonics on the radius, and an off-centre bulge.
        harmonics = sum(rng.uniform(0.06, 0.16) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
                        for k in rng.choice(np.arange(2, 9), 3, replace=False))
        border = radius * (1 + harmonics + 0.25 * np.cos(angle - rng.uniform(0, 2 * np.pi)))
    else:
        border = radius * (1 + 0.03 * np.cos(2 * angle + rng.uniform(0, np.pi)))
    inside = distance < border
    brown = np.array([0.55, 0.35, 0.22]) + rng.normal(0, 0.03, 3)
    image[inside] = brown + rng.normal(0, 0.015, (inside.sum(), 3))
    if malignant:
        # Several colours: dark brown, black and blue-grey blotches inside the lesion.
        for colour in ([0.3, 0.18, 0.1], [0.08, 0.06, 0.06], [0.45, 0.5, 0.6], [0.7, 0.3, 0.3]):
            bx, by = cx + rng.normal(0, radius / 2, 2)
            blotch = inside & (np.hypot(xx - bx, yy - by) < rng.uniform(0.3, 0.6) * radius)
            image[blotch] = np.array(colour) + rng.normal(0, 0.03, (blotch.sum(), 3))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_synthetic(out, size=96, seed=0, counts=None):
    """Writes the synthetic data set in the split layout; returns the number of images."""
    out, rng, total = Path(out), np.random.default_rng(seed), 0
    for split, per_class in (counts or SYNTHETIC_COUNTS).items():
        for label, count in enumerate(per_class):
            folder = out / SPLITS[split] / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(synthetic_lesion(rng, label == 1, size)).save(
                    folder / f"SYN_{split}_{label}_{i:04d}.jpg", quality=92)
                total += 1
    return total


if __name__ == "__main__":
    parser = ArgumentParser("dataset.py", description="Write the synthetic demo data set in the split layout.")
    parser.add_argument("--synthetic", required=True, metavar="DIR", help="output folder (the --data of train.py)")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()
    if Path(args.synthetic).exists() and any(Path(args.synthetic).iterdir()):
        raise SystemExit(f"dataset.py: error: --synthetic {args.synthetic} is not empty; choose a new folder")
    n = make_synthetic(args.synthetic, args.size, args.seed)
    print(f"wrote {n} synthetic images to {args.synthetic}")
