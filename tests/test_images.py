"""Image reading and preprocessing rules (pid_cli/inputs/images.py docstring), each pinned exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pid_cli.inputs.images import (
    ImageReadError,
    choose_bucket,
    fit_to_target,
    preprocess,
    read_image,
    resize_array,
    resize_lanczos,
    to_tensor,
    to_uint8,
)

RNG = np.random.default_rng(0)
BUCKETS_4K = ["4096x4096", "4096x3072", "3072x4096", "3584x3584", "4096x2176", "2176x4096", "2048x2048"]


def rgb8(h: int = 21, w: int = 34) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(("suffix", "kwargs"), [(".png", {}), (".tiff", {}), (".webp", {"lossless": True}),
                                                (".bmp", {})])
def test_lossless_8bit_formats_read_exactly(tmp_path, suffix, kwargs):
    img = rgb8()
    Image.fromarray(img).save(tmp_path / f"a{suffix}", **kwargs)
    arr, info = read_image(tmp_path / f"a{suffix}")
    assert arr.dtype == np.uint8 and np.array_equal(arr, img)
    assert (info.width, info.height, info.bit_depth, info.had_alpha) == (34, 21, 8, False)


def test_jpeg_reads_as_rgb(tmp_path):
    img = np.full((16, 24, 3), (200, 40, 90), np.uint8)
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    arr, info = read_image(tmp_path / "a.jpg")
    assert arr.shape == (16, 24, 3) and info.bit_depth == 8
    assert np.abs(arr.astype(int) - img).max() <= 3


def test_grey_is_replicated(tmp_path):
    grey = RNG.integers(0, 256, (9, 11), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    arr, _ = read_image(tmp_path / "g.png")
    assert np.array_equal(arr, np.repeat(grey[:, :, None], 3, axis=2))
    Image.fromarray(grey > 128).save(tmp_path / "bw.png")  # 1-bit
    arr, _ = read_image(tmp_path / "bw.png")
    assert set(np.unique(arr)) <= {0, 255} and np.array_equal(arr[:, :, 0], np.where(grey > 128, 255, 0))


def test_rgba_is_composited_over_white(tmp_path):
    px = np.array([[[200, 10, 0, 0], [200, 10, 0, 255], [0, 0, 0, 128], [100, 50, 250, 64]]], np.uint8)
    Image.fromarray(px, "RGBA").save(tmp_path / "a.png")
    arr, info = read_image(tmp_path / "a.png")
    expected = [[255, 255, 255], [200, 10, 0], [127, 127, 127], [216, 204, 254]]
    # (c·a + 255·(255 − a) + 127) // 255, e.g. (100·64 + 255·191 + 127) // 255 = 216
    assert arr.tolist() == [expected] and info.had_alpha
    Image.fromarray(px[:, :, [0, 3]].copy(), "LA").save(tmp_path / "la.png")
    arr, _ = read_image(tmp_path / "la.png")
    assert arr[0, :, 0].tolist() == [255, 200, 127, 216] and (arr == arr[:, :, :1]).all()


def test_palette_transparency_is_composited(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    im.putdata([0, 1])
    im.save(tmp_path / "p.png", transparency=1)
    arr, info = read_image(tmp_path / "p.png")
    assert arr.tolist() == [[[10, 20, 30], [255, 255, 255]]] and info.had_alpha


def test_16bit_grey_png_keeps_precision(tmp_path):
    grey = RNG.integers(0, 65536, (7, 5), dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    arr, info = read_image(tmp_path / "g16.png")
    assert arr.dtype == np.uint16 and info.bit_depth == 16
    assert np.array_equal(arr, np.repeat(grey[:, :, None], 3, axis=2))


def test_16bit_colour_png_and_tiff_keep_precision(tmp_path):
    cv2 = pytest.importorskip("cv2")
    img = RNG.integers(0, 65536, (6, 9, 3), dtype=np.uint16)
    for name in ("c16.png", "c16.tif"):  # OpenCV writes TIFF LZW-compressed
        assert cv2.imwrite(str(tmp_path / name), img[:, :, ::-1])
        arr, info = read_image(tmp_path / name)
        assert arr.dtype == np.uint16 and info.bit_depth == 16 and np.array_equal(arr, img), name
    rgba = np.concatenate([img, np.array([0, 65535, 32768], np.uint16)[None, :3, None].repeat(6, 0).repeat(3, 1)
                           .reshape(6, 9, 1)], axis=2)
    assert cv2.imwrite(str(tmp_path / "a16.png"), rgba[:, :, [2, 1, 0, 3]])
    arr, info = read_image(tmp_path / "a16.png")
    c, a = img.astype(np.uint64), rgba[:, :, 3:].astype(np.uint64)
    assert info.had_alpha and np.array_equal(arr, (c * a + 65535 * (65535 - a) + 32767) // 65535)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, orientation):
    img = Image.fromarray(rgb8(5, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(tmp_path / "o.png", exif=exif)
    arr, info = read_image(tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert info.orientation == orientation and np.array_equal(arr, expected)


def test_unreadable_files_name_the_file(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageReadError, match=r"junk\.png: cannot read image"):
        read_image(tmp_path / "junk.png")
    Image.fromarray(rgb8(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(ImageReadError, match=r"absent\.png: no such file"):
        read_image(tmp_path / "absent.png")
    Image.fromarray(np.zeros((2, 2), np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(ImageReadError, match=r"f\.tif: floating-point"):
        read_image(tmp_path / "f.tif")


def test_value_mapping():
    x = to_tensor(np.array([[[0, 255, 128]]], np.uint8))
    assert x.shape == (1, 3, 1, 1) and x.dtype == torch.float32
    assert x.flatten().tolist() == [-1.0, 1.0, pytest.approx(128 / 127.5 - 1, abs=1e-6)]
    y = to_tensor(np.array([[[0, 65535, 32768]]], np.uint16))
    assert y.flatten().tolist() == [-1.0, 1.0, pytest.approx(32768 / 32767.5 - 1, abs=1e-6)]
    # 8- and 16-bit encodings of the same colour agree (257·v maps to the same value).
    v = rgb8(2, 2)
    torch.testing.assert_close(to_tensor(v.astype(np.uint16) * 257), to_tensor(v), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        to_tensor(np.zeros((2, 2, 3), np.float32))


def test_output_rule_truncates():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, -0.2]).view(1, 5, 1).expand(3, 5, 1).permute(0, 2, 1)  # [3, 1, 5]
    assert to_uint8(x)[0, :, 0].tolist() == [0, 127, 255, 255, 102]  # floor(0.8·127.5) = 102


def test_center_crop_to_multiple_of_16():
    img = np.arange(50 * 60 * 3, dtype=np.int64).reshape(50, 60, 3).astype(np.uint16)
    out = preprocess(img[:, :37])
    assert out.shape == (48, 32, 3)
    assert np.array_equal(out, img[1:49, 2:34])  # top = (50−48)//2, left = (37−32)//2
    assert np.array_equal(preprocess(img[:32, :32]), img[:32, :32])  # already a multiple: unchanged
    assert np.array_equal(preprocess(img[:33, :47]), img[0:32, 7:39])  # odd leftovers: floor of the half
    with pytest.raises(ValueError, match="smaller than"):
        preprocess(img[:15])


def test_choose_bucket():
    assert choose_bucket(1000, 750, BUCKETS_4K) == (4096, 3072)
    assert choose_bucket(1920, 1080, BUCKETS_4K) == (4096, 2176)
    assert choose_bucket(500, 500, BUCKETS_4K) == (4096, 4096)  # ties go to the largest
    assert choose_bucket(700, 1000, BUCKETS_4K) == (3072, 4096)
    assert choose_bucket(600, 1000, BUCKETS_4K) == (2176, 4096)


def test_fit_to_target():
    photo = rgb8(750, 1000)
    out = fit_to_target(photo, "4096x3072", 4)
    assert out.shape == (768, 1024, 3) and out.dtype == np.uint8
    flat = np.full((1000, 1000, 3), (10, 200, 30), np.uint8)  # 1:1 into 4:3: scale 1.024, crop rows
    assert np.array_equal(fit_to_target(flat, (4096, 3072), 4), np.full((768, 1024, 3), (10, 200, 30), np.uint8))
    right = rgb8(768, 1024)
    assert fit_to_target(right, (4096, 3072), 4) is right
    deep = (np.linspace(0, 65535, 300 * 400 * 3).reshape(300, 400, 3)).astype(np.uint16)
    out16 = fit_to_target(deep, "2048x1536", 4)
    assert out16.dtype == np.uint16 and out16.shape == (384, 512, 3) and (out16 % 257 != 0).any()
    with pytest.raises(ValueError, match="multiple"):
        fit_to_target(photo, (4097, 3072), 4)


def test_resize_helpers_keep_constants():
    assert np.array_equal(resize_array(np.full((5, 7, 3), 77, np.uint8), (14, 10)), np.full((10, 14, 3), 77, np.uint8))
    x = torch.full((1, 3, 4, 6), 0.25)
    y = resize_lanczos(x, (16, 24))
    assert y.shape == (1, 3, 16, 24) and torch.allclose(y, torch.full_like(y, 0.25), atol=1e-6)
    assert resize_lanczos(x[0], (8, 12)).shape == (3, 8, 12)
