"""Tests of images.py: the start-up check of image files (each broken file excluded with its reason,
a huge one without decoding it, every decodable variant passed), reading them (every format, the
first frame of an animated image, EXIF orientation) and the uint8 cache."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from dataset import ImageDataset, collate_images, load_split, train_transform
from helpers import jpeg_bytes
from images import DataError, attach_cache, cached_side, check_image, check_images, read_rgb
from test_dataset import TINY_COUNTS, copy_of

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ---------------------------------------------------------------------------------------------
# Checking a file at start-up: broken, odd and huge files


def corrupt_jpeg():
    """Valid JPEG markers, a start of frame and an end-of-image marker, but a damaged Huffman
    table (bit rot, a bad sector): the header alone looks fine, decoding fails."""
    data = bytearray(jpeg_bytes())
    table = data.find(b"\xff\xc4")
    data[table + 5:table + 21] = b"\xff" * 16
    return bytes(data)


@pytest.mark.parametrize("name, content, reason", [  # reason: a regular expression of the whole reason
    ("zero_bytes.jpg", lambda: b"", r"empty file"),
    ("truncated.jpg", lambda: jpeg_bytes()[: len(jpeg_bytes()) // 2], r"unreadable \(OSError: .*truncated.*\)"),
    ("truncated_in_header.jpg", lambda: jpeg_bytes()[:400], r"unreadable \(OSError: .*(?i:truncated).*\)"),
    ("random_bytes.jpg", lambda: np.random.default_rng(2).bytes(2000), r"not an image"),
    ("notes.txt", lambda: b"not an image at all\n", r"not an image"),
    ("header_only.jpg", lambda: b"\xff\xd8\xff\xd9", r"not an image"),
    # the 1/8-scale decode at start-up reads the damaged entropy-coded data: excluded, not a crash mid-epoch
    ("corrupt_huffman_table.jpg", corrupt_jpeg, r"unreadable \(OSError: .+\)"),
])
def test_broken_file_is_excluded_at_start_up_with_a_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content())
    found = check_image(path)
    assert found is not None and re.fullmatch(reason, found), found


def test_huge_images_are_excluded_without_decoding_them(tmp_path, monkeypatch):
    big = tmp_path / "big.jpg"
    Image.new("1", (10_000, 7_000)).save(big, format="PNG")  # above MAX_PIXELS
    bomb = tmp_path / "bomb.jpg"
    Image.new("1", (15_000, 13_000)).save(bomb, format="PNG")  # above PIL's decompression-bomb limit
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real_load(self))
    from PIL import ImageFile
    real_file_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_file_load(self))
    reasons = dict((p.name, r) for p, r in check_images([big, bomb, big], workers=2))
    assert decoded == []  # judged from the header alone
    assert "too large" in reasons["big.jpg"] and "10000x7000" in reasons["big.jpg"]
    assert reasons["bomb.jpg"].startswith("unreadable (DecompressionBombError: ")  # PIL refuses to open it


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads a chmod 000 file anyway")
def test_unreadable_file_is_excluded(tmp_path):
    path = tmp_path / "locked.jpg"
    path.write_bytes(jpeg_bytes())
    path.chmod(0)
    try:
        reason = check_image(path)
        assert reason and "unreadable" in reason
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("name, mode, fmt", [
    ("gray.jpg", "L", "JPEG"),
    ("cmyk.jpg", "CMYK", "JPEG"),
    ("rgba_png.jpg", "RGBA", "PNG"),
    ("rgb_png.jpg", "RGB", "PNG"),
    ("palette_png.jpg", "P", "PNG"),
    ("gray_alpha_png.jpg", "LA", "PNG"),
    ("bmp.jpg", "RGB", "BMP"),
    ("webp.jpg", "RGB", "WEBP"),
    pytest.param("gray16.png", "I;16", "PNG"),
])
def test_decodable_variants_pass_the_check_and_read_as_rgb_uint8(tmp_path, name, mode, fmt):
    path = tmp_path / name
    rgb = (np.random.default_rng(0).random((36, 40, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(rgb).convert(mode) if mode != "I;16" else \
        Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))
    image.save(path, format=fmt)
    assert check_image(path) is None
    tensor = read_rgb(path)
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, 36, 40)
    if fmt in ("PNG", "BMP") and mode in ("RGB", "RGBA"):  # lossless: exactly the RGB pixels
        assert torch.equal(tensor, torch.from_numpy(rgb).permute(2, 0, 1))


# ---------------------------------------------------------------------------------------------
# read_rgb


def colour_image(h=20, w=24):
    array = np.zeros((h, w, 3), np.uint8)
    array[..., 0], array[..., 1], array[..., 2] = 200, 60, 30
    array[: h // 2, :, 2] = 150
    return array


def test_read_rgb_grayscale_png_gives_three_equal_channels(tmp_path):
    gray = (np.arange(20 * 24).reshape(20, 24) % 256).astype(np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    image = read_rgb(tmp_path / "gray.png")
    assert image.shape == (3, 20, 24) and image.dtype == torch.uint8
    assert all(torch.equal(image[c], torch.from_numpy(gray)) for c in range(3))


def test_read_rgb_rgba_png_under_a_jpg_name_drops_alpha(tmp_path):
    rgba = np.concatenate([colour_image(), np.full((20, 24, 1), 100, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "really_png.jpg", format="PNG")
    image = read_rgb(tmp_path / "really_png.jpg")
    assert image.shape == (3, 20, 24) and image.dtype == torch.uint8
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(colour_image()))


def test_read_rgb_cmyk_jpeg_gives_the_rgb_colours(tmp_path):
    Image.fromarray(colour_image()).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    image = read_rgb(tmp_path / "cmyk.jpg")
    assert image.shape == (3, 20, 24) and image.dtype == torch.uint8
    difference = (image.permute(1, 2, 0).int() - torch.from_numpy(colour_image()).int()).abs()
    assert difference.float().mean() < 8  # JPEG is lossy; inverted or swapped channels would be ~100


def test_read_rgb_of_a_file_that_is_no_image_raises_data_error_naming_it(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("hello")
    with pytest.raises(DataError, match="bad.jpg"):
        read_rgb(bad)


def test_read_rgb_reads_real_isic_jpegs_like_pil(isic_sample_dir):
    for path in sorted((isic_sample_dir / "train-image" / "image").glob("*.jpg"))[:3]:
        assert check_image(path) is None
        image = read_rgb(path)
        assert image.shape == (3, 256, 256) and image.dtype == torch.uint8
        with Image.open(path) as pil:
            reference = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)
        assert (image.int() - reference.int()).abs().float().mean() < 2


# ---------------------------------------------------------------------------------------------
# Animated images: their first frame, wherever they are read


def animated(path, frames=3, size=40):
    images = [Image.fromarray((np.random.default_rng(i).random((size, size, 3)) * 255).astype(np.uint8))
              for i in range(frames)]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:])
    return path


@pytest.mark.parametrize("name", ["anim.gif", "anim.jpg"])  # also under a .jpg name
def test_an_animated_image_is_read_as_its_first_frame_and_trains(name, tiny_data_dir, tmp_path):
    data = copy_of(tiny_data_dir, tmp_path)
    path = animated(data / "train_data" / "1" / name)
    with Image.open(path) as image:
        first = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(read_rgb(path), first)
    train = load_split(data, "train")
    assert path in train.paths and train.excluded == []  # the start-up check passes what training reads
    batch = collate_images([ImageDataset(train, train_transform(32))[i] for i in range(len(train))])
    assert batch[0].shape == (len(train), 3, 32, 32)  # the stack that failed on a (frames, 3, H, W) image


@pytest.mark.parametrize("mode", ["RGB", "CMYK"])  # torchvision's decoder, and PIL's for what it cannot read
def test_an_image_is_read_upright_by_its_exif_orientation(mode, tmp_path):
    pixels = (np.random.default_rng(0).random((24, 40, 3)) * 255).astype(np.uint8)  # 40 wide, 24 high
    image = Image.fromarray(pixels).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored picture is to be turned 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif, quality=95)
    read = read_rgb(path)
    assert read.shape == (3, 40, 24)  # turned upright: 24 wide, 40 high
    with Image.open(path) as stored:
        upright = np.array(stored.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    assert np.abs(read.permute(1, 2, 0).numpy().astype(int) - upright.astype(int)).mean() < 2


# ---------------------------------------------------------------------------------------------
# The uint8 cache


def test_use_cache_builds_once_and_reuses_the_file(tiny_data_dir, tmp_path):
    cache = tmp_path / "cache"
    split = load_split(tiny_data_dir, "validation")
    path = attach_cache(split, cache, 32)
    size = cached_side(32)
    assert size == 37 and path.exists() and path.name.startswith(f"validation-{size}px-")
    assert split.cache.shape == (len(split), 3, size, size) and split.cache.dtype == np.uint8
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta == {"split": "validation", "images": len(split), "size": size}
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, path.with_suffix(".json").name])
    stamp = path.stat().st_mtime_ns
    again = load_split(tiny_data_dir, "validation")
    assert attach_cache(again, cache, 32) == path
    assert path.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert attach_cache(load_split(tiny_data_dir, "validation"), cache, 64) != path  # another size, another key


def test_cache_reads_equal_the_resized_jpeg(tiny_data_dir, tmp_path):
    split = load_split(tiny_data_dir, "test")
    attach_cache(split, tmp_path / "cache", 32)
    size = cached_side(32)
    for index in range(len(split)):
        cached = split.read(index)
        assert cached.dtype == torch.uint8
        expected = v2.functional.resize(read_rgb(split.paths[index]), [size, size], antialias=True)
        assert torch.equal(cached, expected)


def test_cache_key_changes_when_a_file_is_touched_or_added(tiny_data_dir, tmp_path):
    data = copy_of(tiny_data_dir, tmp_path)
    cache = tmp_path / "cache"
    first = attach_cache(load_split(data, "train"), cache, 32)
    target = load_split(data, "train").paths[2]
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    touched = attach_cache(load_split(data, "train"), cache, 32)
    assert touched != first and touched.exists()
    shutil.copy(target, target.with_name("added.jpg"))
    split = load_split(data, "train")
    added = attach_cache(split, cache, 32)
    assert added not in (first, touched) and split.cache.shape[0] == sum(TINY_COUNTS["train"]) + 1


def test_building_the_cache_leaves_the_global_random_stream_alone(tiny_data_dir, tmp_path):
    """A run that builds the cache must initialise and train as one that finds it built."""
    torch.manual_seed(0)
    attach_cache(load_split(tiny_data_dir, "test"), tmp_path / "cache", 32)
    after_building = torch.rand(4)
    torch.manual_seed(0)
    attach_cache(load_split(tiny_data_dir, "test"), tmp_path / "cache", 32)  # found built
    after_reading = torch.rand(4)
    torch.manual_seed(0)
    untouched = torch.rand(4)
    assert torch.equal(after_building, untouched) and torch.equal(after_reading, untouched)


def test_a_half_built_cache_of_a_killed_run_is_removed_when_the_cache_is_built(tiny_data_dir, tmp_path):
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / f".test-37px-0123456789abcdef.tmp-{killed.pid}.u8"
    stale.write_bytes(b"\x93NUMPY half an array")
    path = attach_cache(load_split(tiny_data_dir, "test"), cache, 32)
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, path.with_suffix(".json").name])


@pytest.mark.parametrize("damage", ["truncated", "other count in its metadata", "metadata not json"])
def test_a_damaged_cache_is_built_again(damage, tiny_data_dir, tmp_path):
    path = attach_cache(load_split(tiny_data_dir, "test"), tmp_path / "cache", 32)
    meta = path.with_suffix(".json")
    if damage == "truncated":  # a copy killed half-way, or a full disk
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "other count in its metadata":
        meta.write_text(json.dumps({"split": "test", "images": 3, "size": cached_side(32)}))
    else:
        meta.write_text("{not json")
    split = load_split(tiny_data_dir, "test")
    assert attach_cache(split, tmp_path / "cache", 32) == path
    assert json.loads(meta.read_text())["images"] == len(split)
    size = cached_side(32)
    for index in range(len(split)):
        expected = v2.functional.resize(read_rgb(split.paths[index]), [size, size], antialias=True)
        assert torch.equal(split.read(index), expected)
