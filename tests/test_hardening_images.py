"""Image inputs that used to decode wrongly or too expensively: planar 16-bit TIFFs, huge images, memory peaks.

Each test here failed before its fix: a 16-bit TIFF with separate colour planes came out with wrong colours
(OpenCV reads the first plane as interleaved RGB, Pillow keeps 8 bits or garbles it); nothing bounded an image's
pixels below Pillow's 179 MP bomb limit; a 16-bit PNG was decoded twice (Pillow's getexif() loads the image);
an RGBA composite peaked at ~50 bytes a pixel.
"""

from __future__ import annotations

import io
import itertools
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

import pid_cli.inputs.images as images
from pid_cli.inputs.images import MAX_IMAGE_PIXELS, ImageReadError, image_pixels, read_image, to_tensor

RNG = np.random.default_rng(7)


def planar_tiff(planes: np.ndarray, *, order: str = "<", rows: int | None = None, tile: int | None = None,
                deflate: bool = False, predictor: int = 1, tags: dict[int, tuple[int, list[int]]] | None = None
                ) -> bytes:
    """`planes` [C, H, W] (uint8 or uint16; C = 3 RGB, or 4 with unassociated alpha) as an RGB TIFF with separate
    colour planes, the way libtiff-based tools write one (neither Pillow nor OpenCV can write PlanarConfiguration 2).

    TIFF 6.0 specification: Section 2 (file structure: 8-byte header, then one IFD whose 12-byte entries are sorted
    by tag, values over 4 bytes stored elsewhere and pointed to), Section 6 (RGB full-colour images), Section 8
    (PlanarConfiguration = 2: "the components are stored in separate component planes"; StripOffsets and
    StripByteCounts list the strips of the first plane, then those of the second, …), Section 14 (Predictor 2,
    horizontal differencing), Section 15 (tiles). Default: uncompressed, one strip per plane.
    """
    c, h, w = planes.shape
    dt = planes.dtype.newbyteorder(order)
    step = tile or rows or h
    chunks = []
    for plane in planes:
        if tile:  # tiles cover the plane in rows of tiles, the last ones padded (Section 15)
            padded = np.pad(plane, ((0, -h % tile), (0, -w % tile)))
            pieces = [padded[y : y + tile, x : x + tile] for y in range(0, h, tile) for x in range(0, w, tile)]
        else:
            pieces = [plane[y : y + step] for y in range(0, h, step)]
        for piece in pieces:
            if predictor == 2:  # each sample minus its left neighbour, modulo 2^bits
                piece = np.concatenate([piece[:, :1], np.diff(piece, axis=1)], axis=1)
            raw = np.ascontiguousarray(piece, dtype=dt).tobytes()
            chunks.append(zlib.compress(raw) if deflate else raw)
    short, long = 3, 4
    entries = {256: (long, [w]), 257: (long, [h]), 258: (short, [8 * planes.itemsize] * c),
               259: (short, [8 if deflate else 1]), 262: (short, [2]), 277: (short, [c]), 284: (short, [2]),
               **({317: (short, [predictor])} if predictor != 1 else {}),
               **({338: (short, [2])} if c == 4 else {}), **(tags or {})}
    entries |= {322: (long, [tile]), 323: (long, [tile])} if tile else {278: (long, [step])}
    offsets_tag, counts_tag = (324, 325) if tile else (273, 279)
    entries |= {offsets_tag: (long, [0] * len(chunks)), counts_tag: (long, [len(b) for b in chunks])}
    ifd_end = 8 + 2 + 12 * len(entries) + 4
    fmt, size = {short: "H", long: "I"}, {short: 2, long: 4}
    outside = sum(n for n in (len(v) * size[t] for t, v in entries.values()) if n > 4)  # values after the IFD
    entries[offsets_tag] = (long, list(itertools.accumulate(map(len, chunks[:-1]), initial=ifd_end + outside)))
    head, values = b"", b""
    for tag, (typ, vals) in sorted(entries.items()):
        packed = struct.pack(f"{order}{len(vals)}{fmt[typ]}", *vals)
        if len(packed) > 4:
            packed, values = struct.pack(order + "I", ifd_end + len(values)), values + packed
        head += struct.pack(order + "HHI", tag, typ, len(vals)) + packed.ljust(4, b"\0")
    start = (b"II" if order == "<" else b"MM") + struct.pack(order + "HIH", 42, 8, len(entries))
    return start + head + bytes(4) + values + b"".join(chunks)


def planes16(c: int = 3, h: int = 37, w: int = 23) -> np.ndarray:
    return RNG.integers(0, 65536, (c, h, w), dtype=np.uint16)


@pytest.mark.parametrize("layout", [{}, {"order": ">"}, {"rows": 5}, {"deflate": True},
                                    {"deflate": True, "predictor": 2, "rows": 8, "order": ">"}, {"tile": 16},
                                    {"tile": 16, "deflate": True}], ids=str)
def test_16bit_planar_tiff_reads_its_planes_as_rgb(tmp_path, layout):
    """Before: OpenCV decoded the R plane as if it were interleaved RGB (wrong colours, run reported success)."""
    planes = planes16()
    (tmp_path / "p.tif").write_bytes(planar_tiff(planes, **layout))
    arr, info = read_image(tmp_path / "p.tif")
    assert arr.dtype == np.uint16 and info.bit_depth == 16 and (info.width, info.height) == (23, 37)
    assert np.array_equal(arr, planes.transpose(1, 2, 0))  # exactly: 16-bit inputs keep all 16 bits
    # … and map onto [−1, 1] as every 16-bit input does: v/32767.5 − 1.
    expected = planes.astype(np.float32)[None] / 32767.5 - 1
    assert np.allclose(to_tensor(arr).numpy(), expected, rtol=0, atol=1e-6)


def test_16bit_planar_tiff_alpha_and_orientation(tmp_path):
    planes = planes16(4, 6, 9)
    (tmp_path / "a.tif").write_bytes(planar_tiff(planes, rows=2, tags={274: (3, [6])}))  # Orientation 6: 90° CW
    arr, info = read_image(tmp_path / "a.tif")
    c, a = planes[:3].transpose(1, 2, 0).astype(np.uint64), planes[3][:, :, None].astype(np.uint64)
    over_white = ((c * a + 65535 * (65535 - a) + 32767) // 65535).astype(np.uint16)
    assert info.had_alpha and info.orientation == 6 and np.array_equal(arr, np.rot90(over_white, -1))


@pytest.mark.parametrize("layout", [{}, {"rows": 3}, {"deflate": True, "predictor": 2}], ids=str)
def test_8bit_planar_tiff_reads_exactly(tmp_path, layout):
    """8-bit planar TIFFs go through Pillow, which reads them right (pinned here, as they take another path)."""
    planes = RNG.integers(0, 256, (3, 11, 13), dtype=np.uint8)
    (tmp_path / "p8.tif").write_bytes(planar_tiff(planes, **layout))
    arr, info = read_image(tmp_path / "p8.tif")
    assert arr.dtype == np.uint8 and info.bit_depth == 8 and np.array_equal(arr, planes.transpose(1, 2, 0))


def test_corrupt_planar_tiff_is_refused_naming_the_file(tmp_path):
    data = planar_tiff(planes16(h=8, w=8))
    counts = struct.pack("<3I", 128, 128, 128)  # StripByteCounts: one 8·8·2-byte strip per plane
    assert data.count(counts) == 1
    (tmp_path / "big.tif").write_bytes(data.replace(counts, struct.pack("<3I", 128, 128, 1 << 30)))
    with pytest.raises(ImageReadError, match=r"big\.tif: corrupt planar TIFF \(3 strips or tiles of 1073742080 bytes"):
        read_image(tmp_path / "big.tif")
    (tmp_path / "cut.tif").write_bytes(data[:-100])  # the B plane cut short
    with pytest.raises(ImageReadError, match=r"cut\.tif"):
        read_image(tmp_path / "cut.tif")


# --- pixels per image: MAX_IMAGE_PIXELS, checked from the header before anything is decoded ----------------------


def _png(width: int, height: int, depth: int = 8, colour: int = 2, idat: bytes | None = None,
         exif: bytes | None = None, exif_after_pixels: bool = False) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    meta = chunk(b"eXIf", exif) if exif is not None else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
            + (b"" if exif_after_pixels else meta) + chunk(b"IDAT", zlib.compress(b"") if idat is None else idat)
            + (meta if exif_after_pixels else b"") + chunk(b"IEND", b""))


@pytest.fixture
def no_decoding(monkeypatch):
    """Any pixel decoding (Pillow's, or OpenCV's for 16-bit colour) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    cv2 = pytest.importorskip("cv2")
    monkeypatch.setattr(cv2, "imread", refuse)


def test_cap_is_what_the_docs_say():
    assert MAX_IMAGE_PIXELS == 120_000_000 and MAX_IMAGE_PIXELS > 11_656 * 8_742  # a 102 MP medium-format photo


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("depth", [8, 16])
def test_small_file_claiming_over_the_cap_is_refused_before_decoding(tmp_path, no_decoding, depth):
    """A 100-byte PNG claiming 11,000 × 11,000 (121 MP: under Pillow's 179 MP limit, over ours)."""
    (tmp_path / "claim.png").write_bytes(_png(11_000, 11_000, depth))
    for read in (read_image, image_pixels):
        with pytest.raises(ImageReadError, match=r"claim\.png: the image is 11000x11000 = 121,000,000 pixels, "
                                                 r"over the cap of 120,000,000 pixels"):
            read(tmp_path / "claim.png")


def test_header_over_pillows_bomb_limit_names_size_and_cap(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png(70_000, 70_000))
    with pytest.raises(ImageReadError, match=r"bomb\.png: the image has 4,900,000,000 pixels, over the cap of "
                                             r"120,000,000"):
        read_image(tmp_path / "bomb.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_real_file_just_over_the_cap_is_refused_before_decoding(tmp_path, no_decoding):
    """A valid 10,960 × 10,960 white PNG (120,121,600 pixels; 1.5 MB, made in ~0.5 s): Pillow would decode it."""
    side = 10_960
    deflate = zlib.compressobj(1)
    row = b"\0" + b"\xff" * (3 * side)  # filter byte 0, then white pixels
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    (tmp_path / "white.png").write_bytes(_png(side, side, idat=idat))
    with pytest.raises(ImageReadError, match=r"white\.png: the image is 10960x10960 = 120,121,600 pixels, over "
                                             r"the cap of 120,000,000 pixels per input image"):
        read_image(tmp_path / "white.png")


@pytest.mark.parametrize("kind", ["png8", "png16", "planar16"])
def test_cap_boundary_on_small_images(tmp_path, monkeypatch, kind):
    """The cap lowered to 110 pixels: 11×10 reads, 11×11 is refused before any decoder runs (OpenCV included)."""
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 110)
    cv2 = pytest.importorskip("cv2")
    for h in (10, 11):
        path = tmp_path / f"{kind}-{h}{'.tif' if kind == 'planar16' else '.png'}"
        if kind == "png8":
            Image.fromarray(RNG.integers(0, 256, (h, 11, 3), dtype=np.uint8)).save(path)
        elif kind == "png16":
            assert cv2.imwrite(str(path), RNG.integers(0, 65536, (h, 11, 3), dtype=np.uint16))
        else:
            path.write_bytes(planar_tiff(planes16(3, h, 11)))
        if h == 10:
            assert image_pixels(path) == 110 and read_image(path)[0].shape == (10, 11, 3)
            continue
        monkeypatch.setattr(cv2, "imread", lambda *a, **k: pytest.fail("OpenCV decoded an image over the cap"))
        monkeypatch.setattr(ImageFile.ImageFile, "load", lambda *a, **k: pytest.fail("Pillow decoded it"))
        for read in (read_image, image_pixels):
            with pytest.raises(ImageReadError, match=rf"{path.name}: the image is 11x11 = 121 pixels, over the cap "
                                                     r"of 110 pixels"):
                read(path)


def test_image_pixels_reads_the_header_only(tmp_path, no_decoding):
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "a.jpg")
    (tmp_path / "p.tif").write_bytes(planar_tiff(planes16(3, 9, 7)))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30)).save(tmp_path / "r.png", exif=exif)  # turned upright: 30x40, same count
    assert [image_pixels(tmp_path / n) for n in ("a.jpg", "p.tif", "r.png")] == [1200, 63, 1200]
    (tmp_path / "junk.png").write_bytes(b"\x89PNG junk")
    with pytest.raises(ImageReadError, match=r"junk\.png: cannot read image"):
        image_pixels(tmp_path / "junk.png")
    with pytest.raises(ImageReadError, match=r"absent\.png: no such file"):
        image_pixels(tmp_path / "absent.png")


def test_image_pixels_matches_what_read_image_decodes(tmp_path):
    for name, img in [("g.png", Image.new("L", (13, 7))), ("p.gif", Image.new("P", (5, 9))),
                      ("b.bmp", Image.new("RGB", (3, 17))), ("w.webp", Image.new("RGBA", (21, 4)))]:
        img.save(tmp_path / name)
        arr, _ = read_image(tmp_path / name)
        assert image_pixels(tmp_path / name) == arr.shape[0] * arr.shape[1], name


# --- memory and work while reading --------------------------------------------------------------------------------


def test_16bit_png_is_decoded_once_with_its_orientation(tmp_path, monkeypatch):
    """Pillow's PNG getexif() decoded the whole image (to 8 bits) before OpenCV decoded it again; the EXIF
    orientation is now found by walking the chunks, before or after the pixel data."""
    cv2 = pytest.importorskip("cv2")
    img = RNG.integers(0, 65536, (5, 8, 3), dtype=np.uint16)
    ok, enc = cv2.imencode(".png", img[:, :, ::-1])
    assert ok
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = enc.tobytes()
    idat = raw.index(b"IDAT") - 4
    body, iend = raw[idat:-12], raw[-12:]
    tiff = exif.tobytes().removeprefix(b"Exif\0\0")
    exif_chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda *a, **k: pytest.fail("Pillow decoded a 16-bit PNG"))
    for name, data in [("before.png", raw[:idat] + exif_chunk + body + iend),
                       ("after.png", raw[:idat] + body + exif_chunk + iend), ("none.png", raw)]:
        (tmp_path / name).write_bytes(data)
        arr, info = read_image(tmp_path / name)
        upright = img if name == "none.png" else np.rot90(img, -1)
        assert info.bit_depth == 16 and np.array_equal(arr, upright), name


def test_rgba_composite_memory_peak(tmp_path):
    """Compositing 8-bit RGBA over white in uint32, all at once, peaked at ~48 bytes a pixel of Python/numpy
    memory (6 GB at the cap); now ~12 (Pillow's own buffer, untraced here, adds 4)."""
    Image.fromarray(RNG.integers(0, 256, (1024, 1024, 4), dtype=np.uint8), "RGBA").save(tmp_path / "a.png")
    tracemalloc.start()
    try:
        arr, info = read_image(tmp_path / "a.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.had_alpha and arr.shape == (1024, 1024, 3)
    assert peak / arr[:, :, 0].size < 20, f"{peak / arr[:, :, 0].size:.1f} bytes a pixel"


def test_planar_tiff_writer_is_valid_for_pillow():
    """The writer above against Pillow's reading of 8-bit planar files, which is right."""
    planes = RNG.integers(0, 256, (3, 5, 6), dtype=np.uint8)
    for layout in ({}, {"order": ">", "rows": 2}, {"tile": 16, "deflate": True}):
        with Image.open(io.BytesIO(planar_tiff(planes, **layout))) as im:
            assert im.tag_v2[284] == 2 and np.array_equal(np.asarray(im), planes.transpose(1, 2, 0)), layout
