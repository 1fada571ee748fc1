"""`plots`: valid PNGs from metrics, vectors and confusion counts; the math helpers against plain references;
a clear error, not an ImportError, when matplotlib is missing."""

from __future__ import annotations

import builtins
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_images
from PIL import Image

from simclr_cli.engine import plots
from simclr_cli.engine.errors import ConfigError, DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert 200 <= width <= 4000 and 200 <= height <= 4000
    assert not list(path.parent.glob(f".{path.name}.*.tmp"))  # the atomic write left no temp file


def write_metrics(run_dir: Path, *, knn: bool, torn: bool = False) -> Path:
    """A metrics.jsonl as pretraining writes it: 3 epochs of 4 steps, logged every 2 steps."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(2, 13, 2):
        epoch = (step - 1) // 4 + 1  # counted from 1
        lines.append({"step": step, "epoch": epoch, "loss": 5.0 - 0.3 * step, "lr": 0.1 * min(step, 4) / 4,
                      "time": 0.5 * step, "images_per_s": 100.0})
        if knn and step % 4 == 0:
            lines.append({"step": step, "epoch": epoch, "knn_top1": 0.1 + 0.1 * epoch, "knn_top5": 0.5 + 0.1 * epoch,
                          "knn_k": 20, "time": 0.5 * step})
    text = "".join(json.dumps(record) + "\n" for record in lines)
    if torn:
        text += '{"step": 14, "epoch": 3, "lo'
    path = run_dir / "metrics.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


# ---- helpers (no matplotlib needed) ----

def test_read_metrics_skips_the_torn_last_line_and_splits_knn(tmp_path):
    path = write_metrics(tmp_path, knn=True, torn=True)
    steps, knn = plots.read_metrics(path)
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]
    assert [r["epoch"] for r in knn] == [1, 2, 3]


def test_read_metrics_refuses_a_damaged_middle_line(tmp_path):
    path = write_metrics(tmp_path, knn=False)
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 3"):
        plots.read_metrics(path)


def test_pca_matches_svd_of_centred_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1]) + 7.0  # (N, D), off-centre
    xy, explained = plots.pca_2d(x)

    centred = x - x.mean(axis=0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    reference = centred @ vt[:2].T  # (N, 2)
    for i in range(2):  # an axis's sign is a convention: compare up to sign
        sign = np.sign(reference[:, i] @ xy[:, i])
        np.testing.assert_allclose(xy[:, i], sign * reference[:, i], atol=1e-9)
        np.testing.assert_allclose(xy[:, i], sign * u[:, i] * s[i], atol=1e-9)
    np.testing.assert_allclose(explained, s[:2] ** 2 / (s**2).sum())


def test_pca_of_points_on_a_line_is_the_signed_distance_along_it():
    direction = np.array([3.0, 4.0]) / 5.0
    t = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    x = t[:, None] * direction + np.array([10.0, -3.0])  # (5, 2), centred at (10, -3)
    xy, explained = plots.pca_2d(x)
    np.testing.assert_allclose(xy[:, 0], t, atol=1e-12)  # largest loading (0.8) made positive: +t, not -t
    np.testing.assert_allclose(xy[:, 1], 0.0, atol=1e-12)
    np.testing.assert_allclose(explained, [1.0, 0.0], atol=1e-12)


def test_pca_of_one_dimensional_vectors_pads_the_second_axis():
    xy, _ = plots.pca_2d(np.array([[1.0], [2.0], [4.0]]))
    assert xy.shape == (3, 2)
    np.testing.assert_allclose(np.abs(xy[:, 0]), np.abs([1.0, 2.0, 4.0] - np.mean([1.0, 2.0, 4.0])))
    np.testing.assert_allclose(xy[:, 1], 0.0)


def test_sample_rows_is_deterministic_bounded_and_sorted():
    assert np.array_equal(plots.sample_rows(7, limit=10), np.arange(7))
    a, b = plots.sample_rows(100_000, limit=5_000), plots.sample_rows(100_000, limit=5_000)
    assert np.array_equal(a, b)
    assert len(a) == 5_000 and len(np.unique(a)) == 5_000 and np.all(np.diff(a) > 0) and a[-1] < 100_000


def test_normalize_rows_sums_to_one_and_keeps_zero_rows_zero():
    matrix = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    rates = plots.normalize_rows(matrix)
    expected = np.zeros((3, 3))
    for i in range(3):
        total = sum(matrix[i])
        for j in range(3):
            expected[i, j] = matrix[i][j] / total if total else 0.0
    np.testing.assert_allclose(rates, expected)
    np.testing.assert_allclose(rates.sum(axis=1), [1.0, 0.0, 1.0])


# ---- without matplotlib ----

@pytest.fixture
def no_matplotlib(monkeypatch):
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)


def test_module_imports_without_matplotlib(no_matplotlib):
    assert importlib.reload(plots).available() is False


def test_missing_matplotlib_is_a_config_error_with_the_install_hint(no_matplotlib, tmp_path):
    assert plots.available() is False
    write_metrics(tmp_path, knn=False)
    hint = r"pip install matplotlib \(or the project's \[plots\] extra\)"
    with pytest.raises(ConfigError, match=hint):
        plots.plot_run(tmp_path)
    with pytest.raises(ConfigError, match=hint):
        plots.plot_embedding(np.zeros((4, 3)), out=tmp_path / "map.png")
    with pytest.raises(ConfigError, match=hint):
        plots.plot_confusion(np.eye(2), ["a", "b"], out=tmp_path / "cm.png")
    assert not list(tmp_path.glob("*.png"))


# ---- drawing (skipped without matplotlib) ----

@pytest.fixture
def matplotlib():
    return pytest.importorskip("matplotlib")


def test_available_with_matplotlib(matplotlib):
    assert plots.available() is True


@pytest.mark.parametrize("knn", [False, True])
@pytest.mark.parametrize("torn", [False, True])
def test_plot_run_writes_loss_and_knn_pngs(matplotlib, tmp_path, knn, torn):
    write_metrics(tmp_path, knn=knn, torn=torn)
    written = plots.plot_run(tmp_path)
    expected = [tmp_path / "loss.png"] + ([tmp_path / "knn.png"] if knn else [])
    assert written == expected
    for path in written:
        assert_png(path)
    if not knn:
        assert not (tmp_path / "knn.png").exists()


def test_plots_count_epochs_as_metrics_jsonl_does(matplotlib, tmp_path):
    """metrics.jsonl counts epochs from 1; the plots show that number as it is (the kNN check after epoch 1 at 1)."""
    from matplotlib.figure import Figure

    steps, knn = plots.read_metrics(write_metrics(tmp_path, knn=True))
    assert "(epoch 3)" in plots._loss_figure(Figure, steps).axes[0].get_title()
    assert list(plots._knn_figure(Figure, knn).axes[0].lines[0].get_xdata()) == [1, 2, 3]


def test_plot_run_again_replaces_the_files(matplotlib, tmp_path):
    write_metrics(tmp_path, knn=True)
    plots.plot_run(tmp_path)
    assert plots.plot_run(tmp_path) == [tmp_path / "loss.png", tmp_path / "knn.png"]
    assert_png(tmp_path / "loss.png")


def test_plot_run_before_any_step_writes_nothing(matplotlib, tmp_path):
    assert plots.plot_run(tmp_path) == []  # no metrics.jsonl yet
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "ep')  # only a torn line
    assert plots.plot_run(tmp_path) == []


def test_plot_run_of_a_missing_folder_is_a_data_error(matplotlib, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        plots.plot_run(tmp_path / "nope")


def test_plot_embedding_with_labels(matplotlib, tmp_path):
    rng = np.random.default_rng(0)
    vectors = np.concatenate([rng.normal(size=(30, 8)), rng.normal(loc=4.0, size=(30, 8))]).astype(np.float32)
    labels = ["cat"] * 30 + ["dog"] * 30
    out = plots.plot_embedding(vectors, out=tmp_path / "map.png", labels=labels)
    assert out == tmp_path / "map.png"
    assert_png(out)


def test_plot_embedding_with_thumbnails(matplotlib, tmp_path):
    paths = write_images(tmp_path / "images", 12, size=40)
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")  # loses its thumbnail, not the map
    paths.append(tmp_path / "images" / "broken.png")
    vectors = np.random.default_rng(1).normal(size=(len(paths), 5))
    out = plots.plot_embedding(vectors, out=tmp_path / "thumbs.png", thumbnails=paths)
    assert_png(out)


def test_plot_embedding_samples_large_inputs(matplotlib, tmp_path):
    vectors = np.random.default_rng(2).normal(size=(6_000, 4)).astype(np.float32)
    labels = [str(i % 25) for i in range(6_000)]  # more labels than a legend holds
    assert_png(plots.plot_embedding(vectors, out=tmp_path / "big.png", labels=labels))


def test_plot_embedding_tsne_when_scikit_learn_is_installed(matplotlib, tmp_path):
    pytest.importorskip("sklearn")
    vectors = np.random.default_rng(3).normal(size=(40, 6))
    assert_png(plots.plot_embedding(vectors, out=tmp_path / "tsne.png", method="tsne"))


def test_plot_embedding_names_a_missing_package(matplotlib, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name in ("umap", "sklearn.manifold"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    vectors = np.random.default_rng(4).normal(size=(10, 3))
    with pytest.raises(ConfigError, match="umap-learn"):
        plots.plot_embedding(vectors, out=tmp_path / "u.png", method="umap")
    with pytest.raises(ConfigError, match="scikit-learn"):
        plots.plot_embedding(vectors, out=tmp_path / "t.png", method="tsne")


def test_plot_embedding_rejects_bad_inputs(matplotlib, tmp_path):
    vectors = np.zeros((5, 3))
    with pytest.raises(ConfigError, match="3 labels for 5 vectors"):
        plots.plot_embedding(vectors, out=tmp_path / "m.png", labels=["a", "b", "c"])
    with pytest.raises(ConfigError, match="method 'lda'"):
        plots.plot_embedding(vectors, out=tmp_path / "m.png", method="lda")
    with pytest.raises(ConfigError, match=r"\.png"):
        plots.plot_embedding(vectors, out=tmp_path / "m.jpg")
    with pytest.raises(ConfigError, match="2-D"):
        plots.plot_embedding(np.zeros(5), out=tmp_path / "m.png")
    with pytest.raises(DataError, match="NaN"):
        plots.plot_embedding(np.full((5, 3), np.nan), out=tmp_path / "m.png")


def test_plot_confusion_writes_a_png(matplotlib, tmp_path):
    matrix = np.array([[8, 2, 0], [1, 9, 0], [0, 0, 0]])
    out = plots.plot_confusion(matrix, ["airplane", "bird", "cat"], out=tmp_path / "cm.png")
    assert_png(out)


def test_plot_confusion_many_classes_hides_the_names(matplotlib, tmp_path):
    rng = np.random.default_rng(5)
    matrix = rng.integers(0, 5, size=(40, 40)) + np.eye(40, dtype=int) * 20
    assert_png(plots.plot_confusion(matrix, [f"class{i}" for i in range(40)], out=tmp_path / "cm40.png"))


def test_plot_confusion_rejects_mismatched_names(matplotlib, tmp_path):
    with pytest.raises(ConfigError, match="2 class names for a 3 x 3"):
        plots.plot_confusion(np.eye(3), ["a", "b"], out=tmp_path / "cm.png")
    with pytest.raises(ConfigError, match="square"):
        plots.plot_confusion(np.ones((2, 3)), ["a", "b"], out=tmp_path / "cm.png")
