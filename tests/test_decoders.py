"""Filling the cache on the GPU: which images go to the batched JPEG decoder, how they are batched, and the CPU
fallback. torchvision's CPU JPEG decoder stands in for nvJPEG (no GPU here); the CUDA call itself is untested."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.engine import decoders, pipeline
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.images import ImageFiles, plain_jpeg_pixels


class FakeNvjpeg:
    """The batched decoder's contract on the CPU: a list of encoded JPEGs in, (3, H, W) uint8 out, in order."""

    def __init__(self, *, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.fail = fail

    def __call__(self, data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        self.calls.append(len(data))
        if self.fail:
            raise RuntimeError("nvjpegDecodeBatched failed: NVJPEG_STATUS_EXECUTION_FAILED\nmore detail")
        return decoders._nvjpeg(data, device)  # on the CPU: torchvision's libjpeg path, the same call


def _smooth_jpegs(root: Path, count: int, *, size: int = 40) -> list[Path]:
    """Photo-like JPEGs (smooth colour fields), where decoders and resamplers differ by a level or two, not by noise."""
    root.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(count):
        rgb = np.stack([np.sin(3 * x + i), np.cos(2 * y - i), np.sin(2 * (x + y) + 0.5 * i)], axis=-1)
        paths.append(root / f"img_{i:03d}.jpg")
        Image.fromarray(((rgb + 1) * 127.5).round().astype(np.uint8)).save(paths[-1], quality=95)
    return paths


def _mixed_folder(root: Path) -> list[Path]:
    """Plain JPEGs, and what only the CPU decoder handles: a PNG, a CMYK and an EXIF-rotated JPEG, a broken file."""
    paths = _smooth_jpegs(root, 5)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(root / "flat.png")
    Image.new("CMYK", (24, 24), (10, 200, 30, 0)).save(root / "ink.jpg")
    turned = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 36, 3), dtype=np.uint8))
    exif = turned.getexif()
    exif[0x0112] = 6
    turned.save(root / "turned.jpg", exif=exif)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    assert len(paths) == 5
    return sorted(root.iterdir())


def _decode_all(dataset, **kwargs) -> dict[int, torch.Tensor | None]:
    out = {}
    for index, pixels in decoders.decode(dataset, range(len(dataset)), workers=0, device=torch.device("cpu"), **kwargs):
        assert index not in out  # each image once
        out[index] = pixels
    assert sorted(out) == list(range(len(dataset)))
    return out


def test_plain_jpegs_are_screened_from_what_only_the_cpu_decoder_handles(tmp_path):
    paths = _mixed_folder(tmp_path / "img")
    plain = {p.name: plain_jpeg_pixels(p.read_bytes(), max_pixels=None) for p in paths}
    assert plain == {"broken.jpg": None, "flat.png": None, "ink.jpg": None, "turned.jpg": None,
                     **{f"img_{i:03d}.jpg": 1600 for i in range(5)}}
    assert plain_jpeg_pixels(paths[-1].read_bytes(), max_pixels=1599) is None  # over the pixel limit: the CPU names it


def test_the_gpu_path_decodes_plain_jpegs_in_batches_and_the_rest_on_the_cpu(tmp_path, monkeypatch):
    paths = _mixed_folder(tmp_path / "img")
    dataset = pipeline.PixelDataset(ImageFiles(paths), max_side=16)
    monkeypatch.setattr(decoders, "GPU_BATCH_IMAGES", 2)
    fake = FakeNvjpeg()
    gpu = _decode_all(dataset, jpeg_decoder=fake)
    assert fake.calls == [2, 2, 1]  # the 5 plain JPEGs
    cpu = _decode_all(dataset)
    for index, path in enumerate(paths):
        if path.name.startswith("img_"):  # nvJPEG at full size, shrunk on the device; the CPU decodes at 1/2 scale
            assert gpu[index].shape == cpu[index].shape == (3, 16, 16)
            difference = gpu[index].float() - cpu[index].float()
            assert difference.abs().mean() < 2 and difference.mean(dim=(1, 2)).abs().max() < 1, path.name
        elif path.name == "broken.jpg":
            assert gpu[index] is None and cpu[index] is None
        else:
            assert torch.equal(gpu[index], cpu[index]), path.name
    turned = paths.index(tmp_path / "img" / "turned.jpg")
    assert gpu[turned].shape == (3, 29, 16)  # upright: EXIF applied by the CPU decoder


def test_batches_are_capped_by_full_size_pixels_and_a_larger_image_goes_alone(tmp_path, monkeypatch):
    _smooth_jpegs(tmp_path / "img", 4)  # 1600 px each
    Image.new("RGB", (100, 100), (1, 2, 3)).save(tmp_path / "img" / "img_001.jpg")  # 10,000 px
    dataset = pipeline.PixelDataset(ImageFiles(sorted((tmp_path / "img").iterdir())), max_side=None)
    monkeypatch.setattr(decoders, "GPU_BATCH_PIXELS", 3200)
    fake = FakeNvjpeg()
    _decode_all(dataset, jpeg_decoder=fake)
    assert fake.calls == [1, 1, 2]  # img_000 | img_001 (over the cap, alone) | img_002 + img_003


def test_a_failing_gpu_decode_falls_back_to_the_cpu_with_one_note(tmp_path, monkeypatch, caplog):
    paths = _mixed_folder(tmp_path / "img")
    dataset = pipeline.PixelDataset(ImageFiles(paths), max_side=16)
    monkeypatch.setattr(decoders, "GPU_BATCH_IMAGES", 2)
    fake = FakeNvjpeg(fail=True)
    with caplog.at_level("INFO", logger="simclr"):
        gpu = _decode_all(dataset, jpeg_decoder=fake)
    assert fake.calls == [2, 2, 1]
    notes = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert notes == ["decoding JPEGs on cpu failed (nvjpegDecodeBatched failed: NVJPEG_STATUS_EXECUTION_FAILED); "
                     "decoding those on the CPU"]
    cpu = _decode_all(dataset)
    for index in range(len(paths)):
        assert (gpu[index] is None and cpu[index] is None) or torch.equal(gpu[index], cpu[index])


def test_the_cache_fills_through_the_gpu_path(tmp_path, monkeypatch):
    paths = _smooth_jpegs(tmp_path / "img", 6, size=24)
    dataset = pipeline.PixelDataset(ImageFiles(paths), max_side=12)
    monkeypatch.setattr(pipeline, "SAMPLE_FOR_ESTIMATE", 2)  # decoded on the CPU for the estimate, and kept
    fake = FakeNvjpeg()
    cache = pipeline.build_cache(dataset, budget=1 << 20, workers=0, jpeg_decoder=fake)
    assert cache.complete and fake.calls == [4]
    assert all(cache.get(i).shape == (3, 12, 12) for i in range(6))


def test_shrink_matches_the_pil_path_within_a_level_or_two():
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(image).resize((45, 30), Image.BILINEAR).resize((90, 60), Image.BILINEAR))
    pixels = torch.from_numpy(smooth.copy()).permute(2, 0, 1)
    ours = decoders.shrink(pixels, 20)
    reference = pipeline.to_pixels(Image.fromarray(smooth), max_side=20)
    assert ours.shape == reference.shape == (3, 20, 30) and ours.dtype == torch.uint8
    assert (ours.float() - reference.float()).abs().mean() < 2.5
    assert decoders.shrink(pixels, None) is pixels and decoders.shrink(pixels, 60) is pixels


def test_decode_device_resolution(caplog):
    cpu = torch.device("cpu")
    assert decoders.resolve("auto", train_device=cpu) == cpu and decoders.resolve("cpu", train_device=cpu) == cpu
    with pytest.raises(ConfigError, match="data.decode_device 'gpu' is not supported; choose one of auto, cpu, cuda"):
        pipeline.DataConfig(decode_device="gpu").validate()
    if not torch.cuda.is_available():
        with caplog.at_level("INFO", logger="simclr"):
            assert decoders.resolve("cuda", train_device=cpu) == cpu
        assert "data.decode_device is cuda but PyTorch sees no CUDA GPU; decoding the images on the CPU" in caplog.text


def test_decode_device_on_the_command_line(image_folder, tmp_path):
    runner = CliRunner()
    args = ["pretrain", str(image_folder), "--arch", "resnet18", "--width", "0.25", "--image-size", "16", "--batch-size",
            "8", "--max-steps", "1", "--device", "cpu", "--workers", "0"]
    bad = runner.invoke(app, [*args, "--set", "data.decode_device=gpu", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "data.decode_device 'gpu' is not supported" in bad.output and "Traceback" not in bad.output
    if torch.cuda.is_available():
        return
    result = runner.invoke(app, [*args, "--set", "data.decode_device=cuda", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "PyTorch sees no CUDA GPU; decoding the images on the CPU" in (tmp_path / "run" / "train.log").read_text()
