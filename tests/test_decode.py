"""decode_image, one rule per test: colour modes, bit depths, orientation, animation, the pixel limit, and every way a
file can be bad (each a BadImage with a short reason). Images are generated with PIL in tmp_path."""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from simclr_cli.engine.images import ACCEPTED_FORMATS, BACKGROUND, DEFAULT_MAX_PIXELS, decode_image
from simclr_cli.engine.errors import BadImage, DataError


def pixels(path: Path, **kwargs) -> np.ndarray:
    image = decode_image(path, **kwargs)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)  # (H, W, 3)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature and IHDR claiming width x height 8-bit grey, with an empty image stream: a few bytes
    on disk that decode to width * height pixels (or fail) only if someone tries."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b""))
                     + png_chunk(b"IEND", b""))
    return path


# --- colour modes and bit depths ------------------------------------------------------------------


def test_cmyk_jpeg_becomes_the_rgb_of_the_ink_formula(tmp_path):
    cmyk = (100, 50, 0, 30)
    Image.new("CMYK", (16, 16), cmyk).save(tmp_path / "ink.jpg", quality=100)
    c, m, y, k = cmyk
    expected = [255 * (1 - v / 255) * (1 - k / 255) for v in (c, m, y)]  # (137.3, 181.7, 225.0)
    assert np.abs(pixels(tmp_path / "ink.jpg")[8, 8] - expected).max() <= 3


@pytest.mark.parametrize(("name", "dtype"), [("ramp.png", np.uint16), ("ramp.tif", np.uint16), ("ramp32.tif", np.int32)])
def test_16_bit_grey_keeps_its_levels(tmp_path, name, dtype):
    ramp = np.arange(65536, dtype=np.int64).reshape(256, 256)  # every 16-bit value once
    Image.fromarray(ramp.astype(dtype)).save(tmp_path / name)
    out = pixels(tmp_path / name)
    assert np.array_equal(out[..., 0], out[..., 2]) and np.array_equal(out[..., 0], out[..., 1])
    assert np.array_equal(out[..., 0], np.rint(ramp / 257))  # v -> round(v / 257), never clipped at 255
    assert len(np.unique(out)) == 256


def test_float_grey_in_0_1_is_scaled_and_other_ranges_are_stretched(tmp_path):
    unit = np.linspace(0.0, 1.0, 256, dtype=np.float32).reshape(16, 16)
    Image.fromarray(unit).save(tmp_path / "unit.tif")
    assert np.array_equal(pixels(tmp_path / "unit.tif")[..., 0], np.rint(unit * 255))
    depth = np.linspace(-3.0, 5.0, 256, dtype=np.float32).reshape(16, 16)
    depth[0, 1] = np.nan
    Image.fromarray(depth).save(tmp_path / "depth.tif")
    out = pixels(tmp_path / "depth.tif")[..., 0]
    assert out[0, 0] == 0 and out[-1, -1] == 255 and out[0, 1] == 0  # min..max -> 0..255; NaN -> 0
    assert np.all(np.diff(out.ravel()[2:]) >= 0)


def test_rgba_is_composited_on_white(tmp_path):
    assert BACKGROUND == (255, 255, 255)
    Image.new("RGBA", (4, 4), (255, 0, 0, 128)).save(tmp_path / "half.png")  # half-transparent red
    assert np.abs(pixels(tmp_path / "half.png")[0, 0] - (255, 128, 128)).max() <= 1


def test_grey_with_alpha_is_composited_on_white(tmp_path):
    Image.new("LA", (4, 4), (100, 128)).save(tmp_path / "la.png")
    expected = 100 * 128 / 255 + 255 * (1 - 128 / 255)  # 177.2
    assert np.abs(pixels(tmp_path / "la.png")[0, 0] - expected).max() <= 1


def test_palette_with_a_transparent_colour(tmp_path):
    img = Image.new("P", (6, 6), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((5, 5), 1)  # palette entry 1 (green) is the transparent one
    img.save(tmp_path / "t.png", transparency=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when a palette with transparency goes straight to RGB
        out = pixels(tmp_path / "t.png")
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[5, 5]) == BACKGROUND


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_one_bit_images_are_black_and_white(tmp_path, suffix):
    board = (np.indices((8, 8)).sum(axis=0) % 2).astype(bool)
    Image.fromarray(board).convert("1").save(tmp_path / f"bits{suffix}")
    out = pixels(tmp_path / f"bits{suffix}")
    assert np.array_equal(out[..., 0], board * 255) and set(np.unique(out)) == {0, 255}


def test_a_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "dot.png")
    assert pixels(tmp_path / "dot.png").tolist() == [[[1, 2, 3]]]


# --- orientation and animation --------------------------------------------------------------------


def test_exif_orientation_6_turns_the_image_clockwise(tmp_path):
    stored = np.zeros((16, 32, 3), dtype=np.uint8)  # 32 wide x 16 high, red
    stored[...] = (255, 0, 0)
    stored[:8, :8] = (0, 255, 0)  # a green top-left corner
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    img.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    out = pixels(tmp_path / "turned.jpg")
    assert out.shape == (32, 16, 3)  # now 16 wide x 32 high
    top_right, bottom_left = out[3, 12], out[28, 3]
    assert top_right[1] > 200 and top_right[0] < 60  # the stored top-left corner is now the top-right one
    assert bottom_left[0] > 200 and bottom_left[1] < 60


@pytest.mark.parametrize("suffix", [".gif", ".png", ".webp"])
def test_animations_use_frame_0(tmp_path, suffix):
    frames = [Image.new("RGB", (8, 8), rgb) for rgb in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / f"anim{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, **({"lossless": True} if suffix == ".webp" else {}))
    with Image.open(path) as img:
        assert getattr(img, "n_frames", 1) == 3  # really animated
    assert tuple(pixels(path)[4, 4]) == (255, 0, 0)


def test_the_format_comes_from_the_bytes_not_the_name(tmp_path):
    Image.new("RGB", (5, 5), (9, 8, 7)).save(tmp_path / "really_a_png.jpg", format="PNG")
    assert tuple(pixels(tmp_path / "really_a_png.jpg")[0, 0]) == (9, 8, 7)


# --- the pixel limit -------------------------------------------------------------------------------


def test_a_bomb_is_refused_from_its_header_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    path = png_header_only(tmp_path / "bomb.png", 20000, 20000)
    assert path.stat().st_size < 100

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(BadImage) as info:
        decode_image(path)
    assert str(info.value) == "20000x20000 = 400.0 Mpx exceeds the 179.0 Mpx limit; raise --max-image-pixels"
    assert info.value.path == path and isinstance(info.value, DataError)
    with pytest.raises(BadImage, match=r"^12x10 = 120 px exceeds the 100 px limit"):
        Image.new("RGB", (12, 10)).save(tmp_path / "small.png")
        decode_image(tmp_path / "small.png", max_pixels=100)


def test_the_default_limit_is_where_pil_itself_refuses():
    assert DEFAULT_MAX_PIXELS == 178_956_970 == 2 * 89_478_485


def test_pils_own_bomb_check_neither_fires_nor_leaks(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL's check would warn at 50 px and refuse above 100
    Image.new("RGB", (20, 20), (1, 1, 1)).save(tmp_path / "x.png")  # 400 px
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(tmp_path / "x.png").size == (20, 20)  # our limit decides, not PIL's
        assert decode_image(tmp_path / "x.png", max_pixels=None).size == (20, 20)
    assert Image.MAX_IMAGE_PIXELS == 50  # PIL's global is back as it was
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_max_pixels_must_be_positive_or_none(tmp_path):
    with pytest.raises(ValueError, match="max_pixels 0"):
        decode_image(tmp_path / "x.png", max_pixels=0)


# --- bad files: one BadImage each, with a short reason ---------------------------------------------


def good_jpeg_and_png(tmp_path: Path) -> tuple[bytes, bytes]:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "good.jpg", quality=90)
    Image.fromarray(noise).save(tmp_path / "good.png")
    return (tmp_path / "good.jpg").read_bytes(), (tmp_path / "good.png").read_bytes()


def reason(path: Path) -> str:
    with pytest.raises(BadImage) as info:
        decode_image(path)
    assert isinstance(info.value, DataError) and "\n" not in str(info.value)
    return str(info.value)


def test_an_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert reason(tmp_path / "empty.jpg") == "empty file (0 bytes)"


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_jpeg_and_png_are_errors_not_grey(tmp_path, fraction):
    jpeg, png = good_jpeg_and_png(tmp_path)
    (tmp_path / "cut.jpg").write_bytes(jpeg[: int(len(jpeg) * fraction)])
    (tmp_path / "cut.png").write_bytes(png[: int(len(png) * fraction)])
    assert reason(tmp_path / "cut.jpg") == "truncated file"
    assert reason(tmp_path / "cut.png") == "truncated file"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_a_broken_header(tmp_path):
    _, png = good_jpeg_and_png(tmp_path)
    (tmp_path / "stub.png").write_bytes(png[:20])
    assert reason(tmp_path / "stub.png") == "truncated file"
    (tmp_path / "zeros.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # the signature, then garbage
    assert reason(tmp_path / "zeros.png") == "truncated or corrupt PNG header"


def test_text_named_jpg_is_not_an_image(tmp_path):
    (tmp_path / "x.jpg").write_text("<html><body>404 Not Found</body></html>\n")
    assert reason(tmp_path / "x.jpg") == "not an image"


@pytest.mark.parametrize(("format_", "expected"), [("EPS", "format EPS is not accepted"), ("ICO", "format ICO is not accepted"),
                                                   ("PPM", "format PPM is not accepted"), ("PDF", "not an image")])
def test_formats_we_do_not_read_are_refused_whatever_the_name(tmp_path, format_, expected):
    assert format_ not in ACCEPTED_FORMATS
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "disguised.png", format=format_)
    assert reason(tmp_path / "disguised.png") == expected


def test_a_fifo_named_jpg_is_refused_without_blocking(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(tmp_path / "pipe.jpg")
    assert reason(tmp_path / "pipe.jpg") == "not a regular file"


def test_a_missing_file(tmp_path):
    assert reason(tmp_path / "gone.jpg").startswith("cannot read the file (No such file")


def test_bad_images_are_what_datasets_treat_as_undecodable(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(BadImage) as info:
        decode_image(tmp_path / "x.png")
    assert info.value.reason == "not an image" and info.value.path == tmp_path / "x.png"


# --- reduced-size JPEG decoding ---------------------------------------------------------------------


def large_photo(path: Path, *, size: tuple[int, int] = (1600, 1200), seed: int = 0, **save) -> Path:
    """A photo-like JPEG: smooth shapes (a small random image upscaled) plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize(size, Image.BICUBIC))
    noisy = smooth.astype(np.int16) + rng.integers(-20, 21, smooth.shape)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90, **save)
    return path


@pytest.mark.parametrize("min_side", [100, 224, 448, 600])
def test_a_reduced_decode_covers_min_side_and_keeps_the_statistics(tmp_path, min_side):
    from simclr_cli.engine.pipeline import to_pixels

    path = large_photo(tmp_path / "photo.jpg")
    reduced = decode_image(path, min_side=min_side)
    assert min(reduced.size) >= min_side and reduced.size[0] * reduced.size[1] <= 1600 * 1200 / 4  # really reduced
    full, fast = (to_pixels(img, max_side=min_side).float() for img in (decode_image(path), reduced))
    assert fast.shape == full.shape
    assert (fast - full).abs().mean() < 3.0  # levels of 255: resampling differences, not a changed image
    assert abs(fast.mean() - full.mean()) < 0.5 and abs(fast.std() - full.std()) < 1.0


def test_the_eval_transform_of_a_reduced_decode_matches_the_full_one(tmp_path):
    from simclr_cli.engine.augment import eval_resize_side, eval_transform

    path = large_photo(tmp_path / "photo.jpg")
    transform = eval_transform(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    full, fast = (transform(decode_image(path, min_side=side)) for side in (None, eval_resize_side(224)))
    assert fast.shape == full.shape == (3, 224, 224)
    assert (fast - full).abs().mean() * 0.25 * 255 < 3.0  # in levels of 255


def test_a_reduced_decode_covers_min_side_after_exif_turns_the_photo(tmp_path):
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # stored 1600 x 800, viewed 800 x 1600
    path = large_photo(tmp_path / "turned.jpg", size=(1600, 800), exif=exif)
    assert decode_image(path, min_side=300).size == (400, 800)  # 1/2 scale: 1/4 would leave a 200 px short side


def test_min_side_leaves_other_formats_and_small_jpegs_at_full_size(tmp_path):
    Image.new("RGB", (640, 480), (1, 2, 3)).save(tmp_path / "x.png")
    large_photo(tmp_path / "small.jpg", size=(500, 375))
    assert decode_image(tmp_path / "x.png", min_side=100).size == (640, 480)
    assert decode_image(tmp_path / "small.jpg", min_side=448).size == (500, 375)


def test_the_pixel_limit_reads_the_header_not_the_reduced_size(tmp_path):
    path = large_photo(tmp_path / "photo.jpg")
    with pytest.raises(BadImage, match=r"^1600x1200 = 1.9 Mpx exceeds the 1.0 Mpx limit"):
        decode_image(path, max_pixels=1_000_000, min_side=100)  # decoded, it would be 200 x 150


def test_pretraining_and_evaluation_decode_reduced_but_the_dataset_keeps_full_size(tmp_path):
    from simclr_cli.engine.datasets import labelled_folder
    from simclr_cli.engine.images import ImageFiles, decoded_at_least
    from simclr_cli.engine.pipeline import PixelDataset

    (tmp_path / "cls").mkdir()
    path = large_photo(tmp_path / "cls" / "photo.jpg")
    files = ImageFiles([path])
    assert PixelDataset(files, max_side=100).images[0].size == (200, 150)
    assert files[0].size == (1600, 1200)  # the caller's dataset (the benchmark's PIL baseline) is untouched
    labelled = labelled_folder(tmp_path)
    assert decoded_at_least(labelled, 300)[0][0].size == (400, 300) and labelled[0][0].size == (1600, 1200)
