"""near_duplicates.py on tiny synthetic lesions: a resized, re-encoded copy is found, a different
lesion is not, an unreadable file matches nothing, and the pairs are those a pair-by-pair count
of differing bits gives."""
import numpy as np
from PIL import Image

from synthetic import make_synthetic
from near_duplicates import NEAR_BITS, image_hashes, near_copies, near_pairs


def lesions(folder, n=6, size=96):
    make_synthetic(folder, size=size, seed=1, counts={"test": (n // 2, n - n // 2)})
    return sorted(folder.glob("test_data/*/*.jpg"))


def test_a_resized_reencoded_copy_is_found_and_other_lesions_are_not(tmp_path):
    originals = lesions(tmp_path / "data")
    copy = tmp_path / "copy.jpg"
    Image.open(originals[2]).resize((80, 60)).save(copy, quality=70)  # another size, aspect ratio and quality
    found = near_copies([copy], originals)
    assert [(a, b) for a, b, _ in found] == [(copy, originals[2])]
    assert found[0][2] <= NEAR_BITS
    assert near_copies(originals[:3], originals[3:]) == []  # different lesions


def test_near_pairs_are_those_a_count_of_differing_bits_gives(tmp_path):
    paths = lesions(tmp_path / "data", n=8)
    hashes, readable = image_hashes(paths)
    assert hashes.shape == (8, 4) and readable.all()
    bits = [[bin(int(x) ^ int(y)).count("1") for x, y in zip(a.tolist(), b.tolist())] for a in hashes for b in hashes]
    distance = np.array([sum(row) for row in bits]).reshape(8, 8)
    threshold = int(np.sort(distance[distance > 0])[3])  # a threshold that some pairs pass and others not
    expected = [(i, j, int(distance[i, j])) for i in range(8) for j in range(8) if distance[i, j] <= threshold]
    assert sorted(near_pairs(hashes, readable, hashes, readable, threshold, block=3)) == expected
    assert all((i, i, 0) in expected for i in range(8))


def test_an_unreadable_file_matches_nothing_not_even_itself(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    good = lesions(tmp_path / "data", n=2)
    hashes, readable = image_hashes([broken, *good])
    assert readable.tolist() == [False, True, True]
    assert near_copies([broken], [broken, *good]) == []
