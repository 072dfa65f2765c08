"""Near copies of an image across data sets and splits: the same lesion photo resized, re-encoded
or lightly cropped, which a comparison of bytes or file names misses (ISIC 2017 holds exact
copies across its official splits; ISIC 2020 the same image under two patients).

Each image is reduced to a 256-bit perceptual hash (imagehash.phash: the signs of the lowest
16x16 frequencies of a 64x64 grey thumbnail's cosine transform), and two images are near copies
when their hashes differ in at most NEAR_BITS bits. On ISIC 2017 a copy resized to another
aspect ratio and re-encoded lies within 8 bits, while no HAM10000 image comes within 32 bits of
any ISIC 2017 image (docs/results.md, "Near copies"). A crop is not found: the hash sees the
whole picture."""
from concurrent.futures import ThreadPoolExecutor

import imagehash
import numpy as np
from PIL import Image

HASH_SIZE = 16  # a 16x16-bit hash
NEAR_BITS = 16  # at most this many of the 256 bits differ: a near copy


def image_hash(path):
    """The perceptual hash, packed into four 64-bit words, of one image file, or None when it cannot be read."""
    try:
        with Image.open(path) as image:
            image.draft("L", (4 * HASH_SIZE, 4 * HASH_SIZE))  # a JPEG decoded at reduced scale, for speed
            return np.packbits(imagehash.phash(image, hash_size=HASH_SIZE).hash.ravel()).view(np.uint64)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def image_hashes(paths, workers=4):
    """(hashes, readable): the (N, 4) uint64 hashes of the files, and which files could be read
    (an unreadable one's row is zeros and matches nothing)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        hashes = list(pool.map(image_hash, paths))
    readable = np.array([h is not None for h in hashes], dtype=bool)
    rows = [h if h is not None else np.zeros(HASH_SIZE * HASH_SIZE // 64, np.uint64) for h in hashes]
    return (np.stack(rows) if rows else np.zeros((0, HASH_SIZE * HASH_SIZE // 64), np.uint64)), readable


def near_pairs(hashes_a, readable_a, hashes_b, readable_b, max_bits=NEAR_BITS, block=512):
    """[(i, j, bits)]: every image i of set a within max_bits of image j of set b."""
    pairs = []
    for start in range(0, len(hashes_a), block):
        bits = np.bitwise_count(hashes_a[start:start + block, None, :] ^ hashes_b[None, :, :]).sum(-1, dtype=np.int32)
        bits[~readable_a[start:start + block]] = max_bits + 1
        bits[:, ~readable_b] = max_bits + 1
        for i, j in zip(*np.nonzero(bits <= max_bits)):
            pairs.append((start + int(i), int(j), int(bits[i, j])))
    return pairs


def near_copies(paths_a, paths_b, max_bits=NEAR_BITS, workers=4):
    """[(path in a, path in b, bits)] for every near copy of an image of paths_b among paths_a."""
    hashes_a, readable_a = image_hashes(paths_a, workers)
    hashes_b, readable_b = image_hashes(paths_b, workers)
    return [(paths_a[i], paths_b[j], bits)
            for i, j, bits in near_pairs(hashes_a, readable_a, hashes_b, readable_b, max_bits)]


def leaks(splits, workers=4):
    """[(what, path, path, bits)] of the near copies that make an evaluation optimistic: an image
    of one split near a copy in another ("train/test"), and an image near a copy of the other class
    in its own split ("both classes in train"). `splits`: {name: (paths, labels)}."""
    hashed = {name: (image_hashes(paths, workers), np.asarray(labels)) for name, (paths, labels) in splits.items()}
    names, found = list(splits), []
    for i, first in enumerate(names):
        (hashes, readable), labels = hashed[first]
        benign, malignant = labels == 0, labels == 1
        for a, b, bits in near_pairs(hashes[benign], readable[benign], hashes[malignant], readable[malignant]):
            found.append((f"both classes in {first}", splits[first][0][np.flatnonzero(benign)[a]],
                          splits[first][0][np.flatnonzero(malignant)[b]], bits))
        for second in names[i + 1:]:
            (other, other_readable), _ = hashed[second]
            found += [(f"{first}/{second}", splits[first][0][a], splits[second][0][b], bits)
                      for a, b, bits in near_pairs(hashes, readable, other, other_readable)]
    return found
