"""The pretraining input pipeline: decoding to uint8, the in-memory cache, padded batches, bad-image replacement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from conftest import write_images
from simclr_cli.engine import memory, pipeline
from simclr_cli.engine.badfiles import BadFiles
from simclr_cli.engine.datasets import pretrain_dataset
from simclr_cli.engine.images import ImageFiles
from simclr_cli.engine.sampler import EpochSampler
from simclr_cli.engine.errors import DataError


def test_to_pixels_keeps_small_images_and_shrinks_large_ones_by_the_short_side():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 300, 3), dtype=np.uint8))
    kept = pipeline.to_pixels(image, max_side=100)
    assert kept.dtype == torch.uint8 and kept.shape == (3, 100, 300)
    assert torch.equal(kept, torch.from_numpy(np.array(image)).permute(2, 0, 1))
    assert pipeline.to_pixels(image, max_side=50).shape == (3, 50, 150)  # aspect ratio kept
    assert pipeline.to_pixels(image, max_side=None).shape == (3, 100, 300)


def test_decode_side_defaults_to_twice_the_view():
    assert pipeline.decode_side(224) == 448 and pipeline.decode_side(32) == 64


def test_collate_pads_mixed_sizes_into_the_top_left_corner():
    a = torch.full((3, 4, 6), 7, dtype=torch.uint8)
    b = torch.full((3, 5, 2), 9, dtype=torch.uint8)
    batch = pipeline.collate([(a, 10, ()), (b, 11, ())])
    assert batch.pixels.shape == (2, 3, 5, 6)
    assert batch.sizes.tolist() == [[4, 6], [5, 2]] and batch.indices.tolist() == [10, 11]
    assert (batch.pixels[0, :, :4, :6] == 7).all() and (batch.pixels[0, :, 4:] == 0).all()
    assert (batch.pixels[1, :, :5, :2] == 9).all() and (batch.pixels[1, :, :, 2:] == 0).all()
    same = pipeline.collate([(a, 0, ()), (a, 1, ())])
    assert same.pixels.shape == (2, 3, 4, 6)


class Arrays(Dataset):
    """An in-memory dataset like CifarImages: `images` is the (N, H, W, 3) uint8 array."""

    def __init__(self, n: int):
        self.images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        raise AssertionError("an array-backed dataset must not be decoded image by image")


def test_array_datasets_are_read_without_decoding_or_caching():
    dataset = pipeline.PixelDataset(Arrays(5), max_side=16)
    pixels, index, skipped = dataset[3]
    assert index == 3 and skipped == ()
    assert torch.equal(pixels, torch.from_numpy(dataset.arrays[3]).permute(2, 0, 1))
    assert pipeline.build_cache(dataset, budget=1 << 30, workers=0) is None  # already in memory


def test_cache_holds_the_same_pixels_as_decoding(tmp_path):
    paths = write_images(tmp_path / "img", 6, size=12)
    Image.new("RGB", (30, 10), (1, 2, 3)).save(tmp_path / "img" / "wide.png")
    images = ImageFiles(sorted((tmp_path / "img").iterdir()))
    dataset = pipeline.PixelDataset(images, max_side=None)
    cache = pipeline.build_cache(dataset, budget=1 << 20, workers=0)
    assert cache is not None and cache.count == 7 and bool((cache.offsets >= 0).all())
    assert cache.nbytes == 6 * 3 * 12 * 12 + 3 * 30 * 10
    for i in range(7):
        assert torch.equal(cache.get(i), pipeline.to_pixels(images[i], max_side=None))
    dataset.cache = cache
    for path in paths:
        path.unlink()  # from now on only the cache can answer
    assert torch.equal(dataset[2][0], cache.get(2))


def test_cache_is_skipped_when_the_estimate_exceeds_the_budget(tmp_path, caplog):
    write_images(tmp_path / "img", 4, size=12)
    dataset = pipeline.PixelDataset(ImageFiles(sorted((tmp_path / "img").iterdir())), max_side=None)
    with caplog.at_level("INFO", logger="simclr"):
        assert pipeline.build_cache(dataset, budget=1000, workers=0) is None
    assert "not caching" in caplog.text
    assert pipeline.build_cache(dataset, budget=0, workers=0) is None  # --cache-gb 0


def test_cache_stops_at_the_budget_and_the_rest_is_decoded(tmp_path, monkeypatch):
    write_images(tmp_path / "img", 1, size=8)  # img_000: the only image the estimate looks at
    write_images(tmp_path / "img", 4, size=12, suffix=".bmp")[0].unlink()  # img_001..img_003.bmp, larger
    dataset = pipeline.PixelDataset(ImageFiles(sorted((tmp_path / "img").iterdir())), max_side=None)
    assert len(dataset) == 4
    monkeypatch.setattr(pipeline, "SAMPLE_FOR_ESTIMATE", 1)  # estimate 4 x 192 bytes: too low
    cache = pipeline.build_cache(dataset, budget=800, workers=0)  # 192 + 432 fit, a third image would not
    assert (cache.offsets >= 0).tolist() == [True, True, False, False]
    assert torch.equal(dataset[3][0], pipeline.to_pixels(dataset.images[3], max_side=None))


def test_a_bad_image_is_replaced_by_the_next_decodable_one_and_reported(tmp_path):
    paths = write_images(tmp_path / "img", 3, size=8)
    paths[1].write_bytes(b"not an image")
    dataset = pipeline.PixelDataset(ImageFiles(paths), max_side=None)
    pixels, index, skipped = dataset[1]
    assert index == 1  # the sample keeps its place (and its random draws) in the batch
    assert torch.equal(pixels, dataset.pixels(2))
    assert [(s.index, Path(s.path).name) for s in skipped] == [(1, "img_001.png")] and skipped[0].reason
    strict = pipeline.PixelDataset(ImageFiles(paths), max_side=None, on_bad_image="error")
    with pytest.raises(DataError, match=r"cannot decode .*img_001\.png .*--on-bad-image skip"):
        strict[1]


def test_a_folder_with_no_decodable_image_is_an_error(tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in paths:
        path.write_bytes(b"")
    with pytest.raises(DataError, match=r"none of the 2 images can be decoded now \(first: .*a\.png: empty file"):
        pipeline.PixelDataset(ImageFiles(paths), max_side=None)[0]


def test_require_decodable_reports_the_bad_files_before_the_first_good_one(tmp_path):
    bad_paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in bad_paths:
        path.write_text("not an image")
    good = write_images(tmp_path / "z", 2)
    bad = BadFiles(report=tmp_path / "bad_files.jsonl")
    pipeline.require_decodable(pipeline.PixelDataset(ImageFiles(bad_paths + good), max_side=None), bad)
    assert [path for path, _ in bad.files] == [str(p) for p in bad_paths]
    assert len((tmp_path / "bad_files.jsonl").read_text().splitlines()) == 2


def test_require_decodable_names_the_first_files_and_lists_all_when_none_decodes(tmp_path):
    paths = [tmp_path / f"{name}.jpg" for name in "abcde"]
    for path in paths:
        path.write_text("hello")
    report = tmp_path / "bad_files.jsonl"
    with pytest.raises(DataError) as err:
        pipeline.require_decodable(pipeline.PixelDataset(ImageFiles(paths), max_side=None), BadFiles(report=report))
    shown = "; ".join(f"{p} (not an image)" for p in paths[:3])
    assert str(err.value) == f"none of the 5 images can be decoded: {shown} and 2 more, all listed in {report}; check DATA"
    assert [json.loads(line)["path"] for line in report.read_text().splitlines()] == [str(p) for p in paths]
    with pytest.raises(DataError, match=rf"^cannot decode {paths[0]} \(not an image\)"):  # the error policy: the first one
        pipeline.require_decodable(pipeline.PixelDataset(ImageFiles(paths), max_side=None), BadFiles(on_bad_image="error"))


@pytest.mark.parametrize("cached", [False, True])
def test_loader_batches_do_not_depend_on_workers_or_cache(tmp_path, cached):
    write_images(tmp_path / "img", 12, size=10)
    images = ImageFiles(sorted((tmp_path / "img").iterdir()))

    def batches(workers: int) -> list[pipeline.PixelBatch]:
        dataset = pipeline.PixelDataset(images, max_side=None)
        if cached:
            dataset.cache = pipeline.build_cache(dataset, budget=1 << 20, workers=0)
        sampler = EpochSampler(12, global_batch_size=4, seed=3)
        sampler.set_epoch(2)
        return list(pipeline.loader(dataset, sampler, local_batch_size=4, workers=workers, pin_memory=False))

    zero, two = batches(0), batches(2)
    assert len(zero) == 3
    for a, b in zip(zero, two):
        assert torch.equal(a.pixels, b.pixels) and torch.equal(a.indices, b.indices) and torch.equal(a.sizes, b.sizes)


def test_digits_are_cached_once_in_memory():
    dataset = pipeline.PixelDataset(pretrain_dataset(None, root=None, download=False), max_side=16)
    cache = pipeline.build_cache(dataset, budget=1 << 30, workers=0)
    assert cache.count == 1797 and cache.nbytes == 1797 * 3 * 8 * 8


def test_default_cache_budget_is_half_the_free_memory_for_the_machine(monkeypatch):
    monkeypatch.setattr(memory, "available", lambda: 16 * pipeline.BYTES_PER_GB)
    assert pipeline.cache_budget(None) == 8 * pipeline.BYTES_PER_GB
    assert pipeline.cache_budget(1.5) == int(1.5 * pipeline.BYTES_PER_GB)


def test_processes_caching_their_own_copies_split_the_machines_budget(tmp_path, monkeypatch, caplog):
    write_images(tmp_path / "img", 4, size=12)  # 432 bytes each decoded
    dataset = pipeline.PixelDataset(ImageFiles(sorted((tmp_path / "img").iterdir())), max_side=None)
    assert pipeline.build_cache(dataset, budget=4 * 432, workers=0) is not None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine, each with its own copy
    with caplog.at_level("INFO", logger="simclr"):
        assert pipeline.build_cache(dataset, budget=4 * 432, workers=0) is None
    assert "exceed the 0.0 GB budget" in caplog.text
