"""Tests for image discovery, decoding, datasets, the two-view dataset and the epoch sampler (CPU, generated images)."""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_cli.engine.cifar import CIFAR_BINARY
from simclr_cli.engine.datasets import NAMED_DATASETS, LabelledImages, digits, digits_split_indices, labelled_folder, named_dataset, pretrain_dataset

from simclr_cli.engine.images import IMAGE_EXTENSIONS, ImageFiles, decode_image, find_images, printable_path, scan_folder

from simclr_cli.engine.sampler import EpochSampler
from simclr_cli.engine.errors import DataError




def write_image(path: Path, *, size: tuple[int, int] = (12, 10), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# --- find_images ---------------------------------------------------------------------------------


def test_find_images_every_extension_any_case_recursive_sorted(tmp_path):
    names = ["b.JPG", "a.jpeg", "sub/c.Png", "sub/deeper/d.bmp", "e.GIF", "sub/f.tif", "g.TIFF", "sub/deeper/h.webp"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")  # discovery looks at names only
    for other in ["notes.txt", "sub/labels.csv", "sub/deeper/model.safetensors", ".hidden.jpg", ".git/x.png", "jpg"]:
        (tmp_path / other).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / other).write_bytes(b"")

    found = find_images(tmp_path)
    # Top-down walk, names sorted within each folder, the folder's files before its subfolders.
    expected = ["a.jpeg", "b.JPG", "e.GIF", "g.TIFF", "sub/c.Png", "sub/f.tif", "sub/deeper/d.bmp", "sub/deeper/h.webp"]
    assert found == [tmp_path / name for name in expected]
    assert {p.suffix.lower() for p in found} == IMAGE_EXTENSIONS
    assert find_images(tmp_path) == found


def test_find_images_accepts_str(tmp_path):
    write_image(tmp_path / "x.png")
    assert find_images(str(tmp_path)) == [tmp_path / "x.png"]


def test_find_images_follows_symlinked_folders(tmp_path):
    write_image(tmp_path / "elsewhere" / "y.png")
    write_image(tmp_path / "data" / "x.png")
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    scan = scan_folder(tmp_path / "data")
    assert scan.images == [tmp_path / "data" / "x.png", tmp_path / "data" / "linked" / "y.png"]
    assert scan.skipped_folders == []


def test_a_symlink_loop_ends_and_is_reported(tmp_path, caplog):
    write_image(tmp_path / "data" / "sub" / "x.png")
    (tmp_path / "data" / "sub" / "up").symlink_to(tmp_path / "data", target_is_directory=True)  # sub/up/sub/up/...
    with caplog.at_level("WARNING", logger="simclr"):
        scan = scan_folder(tmp_path / "data")
    assert scan.images == [tmp_path / "data" / "sub" / "x.png"]
    assert scan.skipped_folders == [(tmp_path / "data" / "sub" / "up", f"symlink loop back to {tmp_path / 'data'}")]
    assert f"skipping folder {tmp_path / 'data' / 'sub' / 'up'}: symlink loop" in caplog.text


def test_a_second_link_to_a_folder_is_walked_once(tmp_path, caplog):
    write_image(tmp_path / "data" / "a" / "x.png")
    (tmp_path / "data" / "b").symlink_to(tmp_path / "data" / "a", target_is_directory=True)
    with caplog.at_level("WARNING", logger="simclr"):
        scan = scan_folder(tmp_path / "data")
    assert scan.images == [tmp_path / "data" / "a" / "x.png"]
    assert [(folder.name, reason) for folder, reason in scan.skipped_folders] == [
        ("b", f"the same folder as {tmp_path / 'data' / 'a'}, walked there")]
    assert "skipping folder" in caplog.text and str(tmp_path / "data" / "b") in caplog.text


def test_an_unreadable_folder_is_reported_not_silently_skipped(tmp_path, monkeypatch, caplog):
    write_image(tmp_path / "data" / "ok" / "x.png")
    write_image(tmp_path / "data" / "locked" / "y.png")
    locked = {str(tmp_path / "data" / "locked")}
    real_scandir = os.scandir

    def scandir(path="."):  # what os.walk sees for a folder without read permission (tests run as root)
        if os.fspath(path) in locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level("WARNING", logger="simclr"):
        scan = scan_folder(tmp_path / "data")
    assert scan.images == [tmp_path / "data" / "ok" / "x.png"]
    assert scan.skipped_folders == [(tmp_path / "data" / "locked", "cannot read the folder (Permission denied)")]
    assert f"skipping folder {tmp_path / 'data' / 'locked'}: cannot read the folder (Permission denied)" in caplog.text
    locked.add(str(tmp_path / "data"))  # the root itself
    with pytest.raises(DataError, match=r"data: cannot read the folder \(Permission denied\); check its permissions"):
        scan_folder(tmp_path / "data")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads every folder whatever its mode")
def test_an_unreadable_folder_by_its_mode(tmp_path):
    write_image(tmp_path / "data" / "ok" / "x.png")
    write_image(tmp_path / "data" / "locked" / "y.png")
    (tmp_path / "data" / "locked").chmod(0)
    try:
        scan = scan_folder(tmp_path / "data")
    finally:
        (tmp_path / "data" / "locked").chmod(0o755)
    assert scan.images == [tmp_path / "data" / "ok" / "x.png"]
    assert [folder.name for folder, _ in scan.skipped_folders] == ["locked"]


@pytest.mark.skipif(sys.getfilesystemencoding().lower() != "utf-8", reason="needs a POSIX bytes file system")
def test_a_non_utf8_file_name_is_found_and_logged_safely(tmp_path):
    raw = os.fsencode(tmp_path) + b"/\xff\xfe.jpg"
    try:
        write_image(Path(os.fsdecode(raw)))
    except OSError:
        pytest.skip("this file system refuses such names")
    (found,) = find_images(tmp_path)
    assert os.fsencode(found) == raw and decode_image(found).size == (12, 10)
    shown = printable_path(found)
    assert shown.endswith("/\\xff\\xfe.jpg") and shown.encode("ascii")  # plain text, no surrogates
    assert printable_path("two\nlines\t.png") == "two\\nlines\\t.png"  # one line in a log
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # strict: a surrogate would raise here
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("simclr.test_non_utf8")
    logger.addHandler(handler)
    try:
        logger.warning("skipping %s: %s", shown, "test")
        stream.flush()
    finally:
        logger.removeHandler(handler)
    assert b"\\xff\\xfe.jpg" in stream.buffer.getvalue()


def serial_reference(root: Path) -> list[Path]:
    """The walk's contract, naively: os.walk top-down, sorted, hidden folders and files left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return found


def write_nested_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(60):
        depth = int(rng.integers(0, 4))
        folder = root.joinpath(*[f"{'.' if rng.random() < 0.1 else ''}d{int(rng.integers(0, 4))}" for _ in range(depth)])
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{'.' if rng.random() < 0.1 else ''}f{i}{rng.choice(['.jpg', '.PNG', '.txt'])}"
        (folder / name).write_bytes(b"x")


@pytest.mark.parametrize("threads", [1, 2, 16])
def test_the_parallel_walk_returns_the_sorted_serial_result(tmp_path, monkeypatch, threads):
    import random
    import time

    from simclr_cli.engine import images

    root = tmp_path / "tree"
    write_nested_tree(root)
    listed = images._list_folder

    def slow_and_out_of_order(folder):  # listings finish in a random order
        time.sleep(random.random() / 200)
        return listed(folder)

    monkeypatch.setattr(images, "_list_folder", slow_and_out_of_order)
    expected = serial_reference(root)
    assert len(expected) > 20 and any(".PNG" in p.name for p in expected)
    assert images.walk_images(root, threads=threads).images == expected


def test_a_long_walk_logs_its_progress(tmp_path, monkeypatch, caplog):
    from simclr_cli.engine import images

    write_nested_tree(tmp_path / "tree")
    monkeypatch.setattr(images, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="simclr"):
        found = images.walk_images(tmp_path / "tree").images
    lines = [r.getMessage() for r in caplog.records if "so far" in r.getMessage()]
    assert lines and re.match(r"looking for images under .*tree: \d+ found in \d+ folders so far", lines[0])
    assert f"found {len(found)} images in" in caplog.text


def test_find_images_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist; point DATA at a folder of images"):
        find_images(tmp_path / "nope")


def test_find_images_file_instead_of_folder(tmp_path):
    path = write_image(tmp_path / "x.png")
    with pytest.raises(DataError, match="is not a folder"):
        find_images(path)


def test_find_images_no_images(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(DataError) as info:
        find_images(tmp_path)
    message = str(info.value)
    assert "has no images" in message and ".jpg" in message and ".png" in message and "point DATA at" in message


# --- decode_image --------------------------------------------------------------------------------


# One test per decoding rule is in test_decode.py.


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "RGB", "LA", "I;16"])
def test_decode_image_returns_rgb(tmp_path, mode):
    img = Image.new("RGB", (9, 7), (10, 120, 250)).convert(mode)
    path = tmp_path / "x.png"
    img.save(path)
    decoded = decode_image(path)
    assert decoded.mode == "RGB" and decoded.size == (9, 7)


def test_image_files_dataset(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    dataset = ImageFiles(paths)
    assert len(dataset) == 3 and dataset.paths == paths
    assert dataset[1].mode == "RGB" and dataset[1].size == (12, 10)


# --- labelled data -------------------------------------------------------------------------------


def test_labelled_folder_sorted_classes(tmp_path):
    write_image(tmp_path / "zebra" / "a.png")
    write_image(tmp_path / "ant" / "x" / "b.jpg")
    write_image(tmp_path / "ant" / "c.png")
    dataset = labelled_folder(tmp_path)
    assert dataset.classes == ["ant", "zebra"]
    assert dataset.targets == [0, 0, 1]
    image, label = dataset[2]
    assert image.mode == "RGB" and label == 1


def test_labelled_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        labelled_folder(tmp_path / "nope")
    write_image(tmp_path / "flat.png")
    with pytest.raises(DataError, match="no class subfolders"):
        labelled_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty has no images"):
        labelled_folder(tmp_path)


def test_labelled_images_in_memory():
    dataset = LabelledImages([(Image.new("L", (4, 4), 7), 1), (Image.new("RGB", (4, 4)), 0)], ["a", "b"])
    image, label = dataset[0]
    assert image.mode == "RGB" and label == 1 and dataset.targets == [1, 0] and len(dataset) == 2


def test_digits_splits():
    train, val, everything = digits("train"), digits("val"), digits("all")
    assert len(everything) == 1797
    assert len(train) + len(val) == 1797
    assert train.classes == val.classes == [str(d) for d in range(10)]
    train_idx, val_idx = digits_split_indices("train"), digits_split_indices("val")
    assert set(train_idx).isdisjoint(val_idx) and len(set(train_idx) | set(val_idx)) == 1797
    # Stratified: each class contributes round(20%) of its images to val.
    all_counts = np.bincount(everything.targets, minlength=10)
    val_counts = np.bincount(val.targets, minlength=10)
    assert val_counts.tolist() == [round(0.2 * n) for n in all_counts]
    # Stable: the same split on every call.
    assert np.array_equal(digits_split_indices("val"), val_idx)
    assert digits("val").targets == val.targets


def test_digits_images_are_rgb_uint8():
    from sklearn.datasets import load_digits

    reference = load_digits()
    dataset = digits("all")
    for i in (0, 1, 500, 1796):
        image, label = dataset[i]
        assert image.mode == "RGB" and image.size == (8, 8) and label == reference.target[i]
        array = np.asarray(image)
        assert array.dtype == np.uint8
        for c in range(3):  # 0..16 scaled to 0..255, grey copied to the three channels
            assert np.array_equal(array[..., c], np.rint(reference.images[i] * 255 / 16).astype(np.uint8))


def test_digits_unknown_split():
    with pytest.raises(DataError, match="train, val, all"):
        digits("holdout")


# --- named datasets ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10", "imagenet"])
def test_named_dataset_missing_files(tmp_path, name):
    with pytest.raises(DataError) as info:
        named_dataset(name, root=tmp_path, split="train", download=False)
    message = str(info.value)
    assert name in message and "--data-root" in message and "\n" not in message


def test_named_dataset_missing_root(tmp_path):
    with pytest.raises(DataError, match="--data-root.*--download"):
        named_dataset("cifar10", root=tmp_path / "nope", split="train", download=False)


def test_named_dataset_errors_for_unknown_name_and_split(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        named_dataset("mnist", root=tmp_path, split="train", download=False)
    with pytest.raises(DataError, match="train, test"):
        named_dataset("cifar10", root=tmp_path, split="unlabeled", download=False)


def test_named_digits_accepts_test_as_val():
    assert named_dataset("digits", root=None, split="test", download=False).targets == digits("val").targets


def test_imagenet_folder_layout(tmp_path):
    write_image(tmp_path / "val" / "n01440764" / "a.JPEG")
    write_image(tmp_path / "val" / "n01443537" / "b.JPEG")
    dataset = named_dataset("imagenet", root=tmp_path, split="val", download=False)
    assert dataset.classes == ["n01440764", "n01443537"] and len(dataset) == 2
    image, label = dataset[1]
    assert image.mode == "RGB" and label == 1


# --- CIFAR binary versions ----------------------------------------------------------------------

CIFAR_RECORDS_PER_FILE = 3


def cifar_image(label: int, index: int) -> np.ndarray:
    """A distinct, known (32, 32, 3) image: R, G and B each vary differently with row and column."""
    rows, cols = np.mgrid[0:32, 0:32]
    red = (rows * 7 + cols + index) % 256
    green = (rows + cols * 5 + 3 * label) % 256
    blue = (rows * cols + index + label) % 256
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)  # (H, W, C)


def write_cifar(root: Path, name: str) -> tuple[Path, dict[str, list[tuple[int, np.ndarray]]]]:
    """Tiny fake binary CIFAR under root/<folder>/, written byte by byte from the documented record layout."""
    layout = CIFAR_BINARY[name]
    folder = root / layout.folder
    folder.mkdir(parents=True)
    names = [f"class_{i}" for i in range(layout.num_classes)]
    (folder / layout.classes_file).write_text("\n".join(names) + "\n\n\n")  # the real files end in blank lines
    written = {}
    for split, files in (("train", layout.train_files), ("test", layout.test_files)):
        written[split] = []
        for f, filename in enumerate(files):
            record_bytes = bytearray()
            for r in range(CIFAR_RECORDS_PER_FILE):
                index = len(written[split])
                label = (7 * index + 3 * f + (split == "test")) % layout.num_classes
                image = cifar_image(label, index)
                if name == "cifar100":
                    record_bytes.append((label + 1) % 20)  # coarse label first: must be ignored
                record_bytes.append(label)
                for c in range(3):  # 1024 R, then 1024 G, then 1024 B, each row by row
                    for row in range(32):
                        for col in range(32):
                            record_bytes.append(int(image[row, col, c]))
                written[split].append((label, image))
            (folder / filename).write_bytes(bytes(record_bytes))
    return folder, written


@pytest.fixture(scope="module", params=["cifar10", "cifar100"])
def fake_cifar(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    folder, written = write_cifar(root, name)
    return name, root, folder, written


def test_cifar_binary_reads_records(fake_cifar):
    name, root, _, written = fake_cifar
    layout = CIFAR_BINARY[name]
    for split in ("train", "test"):
        dataset = named_dataset(name, root=root, split=split, download=False)
        files = layout.train_files if split == "train" else layout.test_files
        assert len(dataset) == len(files) * CIFAR_RECORDS_PER_FILE  # every train batch, in order
        assert dataset.classes == [f"class_{i}" for i in range(layout.num_classes)]
        assert dataset.targets == [label for label, _ in written[split]]
        assert isinstance(dataset.targets[0], int)
        for i, (label, expected) in enumerate(written[split]):
            image, target = dataset[i]
            assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
            assert type(target) is int and target == label
            assert np.array_equal(np.asarray(image), expected)


def test_cifar_binary_channel_and_row_major_order(tmp_path):
    name = "cifar10"
    folder, _ = write_cifar(tmp_path, name)
    record = np.concatenate([[4], np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    record[1 + 1] = 200  # R plane, row 0, col 1
    record[1 + 1024 + 32] = 201  # G plane, row 1, col 0
    record[1 + 2048 + 32 * 31 + 30] = 202  # B plane, row 31, col 30
    (folder / "test_batch.bin").write_bytes(record.tobytes())
    image, label = named_dataset(name, root=tmp_path, split="test", download=False)[0]
    array = np.asarray(image)  # (H, W, C)
    assert label == 4
    assert tuple(array[5, 5]) == (10, 20, 30)
    assert tuple(array[0, 1]) == (200, 20, 30) and tuple(array[1, 0]) == (10, 201, 30)
    assert tuple(array[31, 30]) == (10, 20, 202)


def test_cifar_binary_root_may_be_the_extracted_folder(fake_cifar):
    name, root, folder, written = fake_cifar
    from_parent = named_dataset(name, root=root, split="test", download=False)
    from_folder = named_dataset(name, root=folder, split="test", download=False)
    assert from_folder.targets == from_parent.targets == [label for label, _ in written["test"]]
    assert np.array_equal(np.asarray(from_folder[1][0]), written["test"][1][1])
    # Accepted through pretrain_dataset too, labels dropped.
    images = pretrain_dataset(name, root=folder, download=False)
    assert len(images) == len(written["train"]) and np.array_equal(np.asarray(images[2]), written["train"][2][1])


def test_cifar_binary_never_unpickles(fake_cifar, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used to read CIFAR")

    for attr in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, attr, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    name, root, _, written = fake_cifar
    for split in ("train", "test"):
        dataset = named_dataset(name, root=root, split=split, download=False)
        assert len(dataset) == len(written[split]) and dataset[0][1] == written[split][0][0]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_binary_truncated_file(tmp_path, name):
    folder, _ = write_cifar(tmp_path, name)
    layout = CIFAR_BINARY[name]
    truncated = folder / layout.train_files[-1]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(DataError) as info:
        named_dataset(name, root=tmp_path, split="train", download=False)
    message = str(info.value)
    assert str(truncated) in message and str(layout.record_bytes) in message and "\n" not in message
    named_dataset(name, root=tmp_path, split="test", download=False)  # the other split is untouched
    truncated.write_bytes(b"")
    with pytest.raises(DataError, match=layout.train_files[-1]):
        named_dataset(name, root=tmp_path, split="train", download=False)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_binary_missing_folder(tmp_path, name):
    folder = CIFAR_BINARY[name].folder
    (tmp_path / "cifar-10-batches-py").mkdir()  # the pickle version is not a substitute
    with pytest.raises(DataError) as info:
        named_dataset(name, root=tmp_path, split="train", download=False)
    message = str(info.value)
    assert str(tmp_path / folder) in message and "python-pickle version" in message
    assert f"--data-root DIR holding the extracted binary version ({folder}/)" in message
    assert "--download" in message and "\n" not in message


def test_cifar_binary_missing_batch_and_bad_class_file(tmp_path):
    folder, _ = write_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match="data_batch_3.bin is missing"):
        named_dataset("cifar10", root=tmp_path, split="train", download=False)
    (folder / "batches.meta.txt").write_text("cat\ndog\n")
    with pytest.raises(DataError, match="batches.meta.txt names 2 classes, not 10"):
        named_dataset("cifar10", root=tmp_path, split="test", download=False)


def test_cifar_binary_label_out_of_range(tmp_path):
    folder, _ = write_cifar(tmp_path, "cifar10")
    data = bytearray((folder / "test_batch.bin").read_bytes())
    data[CIFAR_BINARY["cifar10"].record_bytes] = 10  # second record's label
    (folder / "test_batch.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match="test_batch.bin has label 10"):
        named_dataset("cifar10", root=tmp_path, split="test", download=False)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_binary_download_only_when_missing(tmp_path, monkeypatch, name):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download(url, download_root, md5=None, **kwargs):
        calls.append((url, Path(download_root), md5))
        write_cifar(Path(download_root), name)

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    root = tmp_path / "new"
    layout = CIFAR_BINARY[name]
    dataset = named_dataset(name, root=root, split="test", download=True)
    assert calls == [(layout.url, root, layout.md5)] and len(dataset) == CIFAR_RECORDS_PER_FILE
    assert layout.url == {
        "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    }[name]
    named_dataset(name, root=root, split="train", download=True)
    named_dataset(name, root=root / layout.folder, split="train", download=True)
    assert len(calls) == 1  # already extracted: no second download


def test_cifar_binary_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def failing_download(url, download_root, md5=None, **kwargs):
        raise RuntimeError("File not found or corrupted.\nmd5 mismatch")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", failing_download)
    with pytest.raises(DataError) as info:
        named_dataset("cifar100", root=tmp_path, split="train", download=True)
    message = str(info.value)
    assert "md5 mismatch" in message and "cifar-100-binary/" in message and "\n" not in message


# --- pretrain_dataset ----------------------------------------------------------------------------


@pytest.mark.parametrize("data", [None, "digits"])
def test_pretrain_dataset_digits(data):
    dataset = pretrain_dataset(data, root=None, download=False)
    assert len(dataset) == 1797
    image = dataset[5]
    assert isinstance(image, Image.Image) and image.mode == "RGB"


def test_pretrain_dataset_folder(tmp_path):
    paths = [write_image(tmp_path / "imgs" / f"{i}.png", seed=i) for i in range(4)]
    for data in (str(tmp_path / "imgs"), tmp_path / "imgs"):
        dataset = pretrain_dataset(data, root=None, download=False)
        assert isinstance(dataset, ImageFiles) and dataset.paths == paths
        assert dataset[0].mode == "RGB"


def test_pretrain_dataset_nonsense():
    with pytest.raises(DataError) as info:
        pretrain_dataset("no-such-dataset-or-folder", root=None, download=False)
    message = str(info.value)
    assert "no-such-dataset-or-folder" in message and "folder" in message
    assert all(name in message for name in NAMED_DATASETS)


def test_pretrain_dataset_named_missing_files(tmp_path):
    with pytest.raises(DataError, match="--data-root"):
        pretrain_dataset("stl10", root=tmp_path, download=False)


# --- EpochSampler --------------------------------------------------------------------------------


def epoch_order(sampler: EpochSampler, epoch: int, start_batch: int = 0) -> list[int]:
    sampler.set_epoch(epoch, start_batch)
    return list(sampler)


def test_sampler_permutation_per_epoch():
    sampler = EpochSampler(100, global_batch_size=10, seed=0)
    e0, e1 = epoch_order(sampler, 0), epoch_order(sampler, 1)
    assert sorted(e0) == sorted(e1) == list(range(100))
    assert e0 != e1
    assert epoch_order(EpochSampler(100, global_batch_size=10, seed=0), 1) == e1
    assert epoch_order(EpochSampler(100, global_batch_size=10, seed=1), 1) != e1
    assert len(sampler) == 100 and sampler.batches_per_epoch == 10


def test_sampler_drops_last_partial_batch():
    sampler = EpochSampler(23, global_batch_size=5, seed=0)
    order = epoch_order(sampler, 0)
    assert len(order) == len(sampler) == 20 and len(set(order)) == 20 and sampler.batches_per_epoch == 4


def test_sampler_ranks_split_each_global_batch():
    num_samples, global_batch, world = 50, 8, 2
    single = epoch_order(EpochSampler(num_samples, global_batch_size=global_batch, seed=5), 2)
    shards = [
        epoch_order(EpochSampler(num_samples, global_batch_size=global_batch, seed=5, rank=r, world_size=world), 2)
        for r in range(world)
    ]
    assert set(shards[0]).isdisjoint(shards[1])
    local = global_batch // world
    batches = num_samples // global_batch
    for b in range(batches):
        joined = shards[0][b * local : (b + 1) * local] + shards[1][b * local : (b + 1) * local]
        assert joined == single[b * global_batch : (b + 1) * global_batch]
    assert sorted(shards[0] + shards[1]) == sorted(single) and len(single) == batches * global_batch
    ranked = EpochSampler(num_samples, global_batch_size=global_batch, seed=5, rank=1, world_size=world)
    assert len(ranked) == batches * local


def test_sampler_start_batch_skips_exactly():
    sampler = EpochSampler(40, global_batch_size=8, seed=0)
    full = epoch_order(sampler, 4)
    assert epoch_order(sampler, 4, start_batch=3) == full[3 * 8 :]
    assert len(sampler) == 2 * 8
    assert epoch_order(sampler, 4, start_batch=5) == [] and len(sampler) == 0
    sampler.set_epoch(5)
    assert sampler.start_batch == 0 and len(sampler) == 40
    ranked = EpochSampler(40, global_batch_size=8, seed=0, rank=1, world_size=4)
    assert epoch_order(ranked, 4, start_batch=3) == [i for b in (3, 4) for i in full[b * 8 + 2 : b * 8 + 4]]


def test_sampler_errors():
    with pytest.raises(ValueError, match="multiple"):
        EpochSampler(100, global_batch_size=10, seed=0, rank=0, world_size=3)
    with pytest.raises(ValueError, match="larger than the dataset"):
        EpochSampler(5, global_batch_size=8, seed=0)
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(100, global_batch_size=10, seed=0, rank=2, world_size=2)
    sampler = EpochSampler(100, global_batch_size=10, seed=0)
    with pytest.raises(ValueError, match="start_batch"):
        sampler.set_epoch(0, start_batch=11)


def _class_tree(root, classes=("cat", "dog"), per_class=2):
    from conftest import write_images

    for name in classes:
        write_images(root / name, per_class, size=8, seed=len(name))
    return root


def test_labelled_splits_from_a_folder_with_train_and_val_or_test(tmp_path):
    from simclr_cli.engine.datasets import labelled_splits

    _class_tree(tmp_path / "d" / "train")
    _class_tree(tmp_path / "d" / "test", per_class=1)
    splits = labelled_splits(str(tmp_path / "d"))
    assert splits.classes == ["cat", "dog"]
    assert (len(splits.train), len(splits.val)) == (4, 2)
    assert [label for _, label in splits.val] == [0, 1]


def test_labelled_splits_from_train_and_val_flags_and_named(tmp_path):
    from simclr_cli.engine.datasets import labelled_splits

    splits = labelled_splits(None, train=_class_tree(tmp_path / "a"), val=_class_tree(tmp_path / "b", per_class=1))
    assert (len(splits.train), len(splits.val)) == (4, 2)
    digits_splits = labelled_splits("digits")
    assert (len(digits_splits.train), len(digits_splits.val), len(digits_splits.classes)) == (1438, 359, 10)


@pytest.mark.parametrize(
    ("layout", "kwargs", "message"),
    [
        ("none", {"data": None}, "no labelled data given"),
        ("train-only", {"data": "FOLDER"}, "needs train/ and val/ (or test/)"),
        ("mismatch", {"data": "FOLDER"}, "train and val have different classes (bird)"),
        ("none", {"data": "/no/such"}, "neither a dataset name"),
    ],
)
def test_labelled_splits_errors(tmp_path, layout, kwargs, message):
    from simclr_cli.engine.datasets import labelled_splits

    folder = tmp_path / "d"
    if layout in ("train-only", "mismatch"):
        _class_tree(folder / "train")
    if layout == "mismatch":
        _class_tree(folder / "val", classes=("cat", "dog", "bird"))
    data = str(folder) if kwargs["data"] == "FOLDER" else kwargs["data"]
    with pytest.raises(DataError, match=re.escape(message)):
        labelled_splits(data)
    with pytest.raises(DataError, match="pass both --train DIR and --val DIR"):
        labelled_splits(None, train=folder)


def test_a_bad_labelled_image_is_an_error_naming_the_file(tmp_path):
    write_image(tmp_path / "cats" / "a.png", size=(8, 8), seed=0)
    (tmp_path / "cats" / "broken.png").write_bytes(b"")
    dataset = labelled_folder(tmp_path)
    with pytest.raises(DataError, match=r"cannot decode .*broken\.png \(empty file \(0 bytes\)\); fix or remove it"):
        dataset[1]
