"""Image files for the Siamese melanoma study: checked once, read one way, cached as uint8.

check_image says why a file cannot be used (from its header and a 1/8-scale decode, fast enough
for every file at start-up); read_rgb is the one function that decodes an image (torchvision's
libjpeg-turbo, PIL for what it cannot read), in training, evaluation and on the page alike;
attach_cache gives a split a memory-mapped uint8 copy of its images, decoded and resized once
for every later epoch and run.
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

from files import remove_stale_temporaries, write_atomic, write_text_atomic

READER = 2  # read_rgb's version, part of the cache key: a cache holds images as read_rgb reads them
MAX_PIXELS = 64_000_000  # larger files are excluded: decoding them would stall a worker for seconds


class DataError(ValueError):
    """A problem with the user's data; the message names the file or folder and the fix. A
    ValueError: a command reports it as it reports a bad flag (cli.one_line_errors)."""


# ---------------------------------------------------------------------------------------------
# Checking and reading an image file


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
