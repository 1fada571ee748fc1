"""PNG figures of a run's curves, an embedding map and a confusion matrix (needs the optional matplotlib).

matplotlib is imported only when a figure is drawn, so the engine imports without it. Figures are built with
`matplotlib.figure.Figure` rather than pyplot: no GUI backend is ever selected (Agg renders the PNG), the
caller's own pyplot backend is left alone, and no figure stays registered in pyplot's global list, so drawing
at every checkpoint cannot leak memory or need a `close`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from simclr_cli.engine.files import atomic_write
from simclr_cli.engine.images import decode_image
from simclr_cli.engine.errors import ConfigError, DataError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("simclr")

INSTALL_HINT = "pip install matplotlib (or the project's [plots] extra)"
METHODS = ("pca", "tsne", "umap")
MAX_POINTS = 5_000  # points drawn (and projected) in an embedding map; more only hide each other
MAX_THUMBNAILS = 200
THUMBNAIL_PX = 24
MAX_LEGEND = 20  # labels named in a legend; beyond this the colours alone separate them
MAX_TICK_CLASSES = 30  # confusion-matrix class names shown; beyond this they overlap
MAX_CELL_TEXT = 12  # classes up to which each confusion cell is annotated with its percentage
DPI = 120


def available() -> bool:
    """Whether matplotlib can be imported, i.e. whether the functions below can draw."""
    try:
        _figure_class()
    except ConfigError:
        return False
    return True


def plot_run(run_dir: Path) -> list[Path]:
    """Draw `loss.png` (loss and lr over steps) and, when the kNN monitor ran, `knn.png` from the run's
    metrics.jsonl; returns the files written (none while no step has been logged yet)."""
    Figure = _figure_class()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist; pass the folder `simclr pretrain` wrote")
    steps, knn = read_metrics(run_dir / "metrics.jsonl")
    written = []
    if steps:
        written.append(_save(_loss_figure(Figure, steps), run_dir / "loss.png"))
    if knn:
        written.append(_save(_knn_figure(Figure, knn), run_dir / "knn.png"))
    return written


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, kNN records) of a metrics.jsonl, each sorted by step; a missing file is empty.

    The last line may be torn (the run was killed mid-write, or is writing it now) and is skipped;
    an unreadable line before it means the file is damaged.
    """
    if not path.exists():
        return [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    steps, knn = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                log.debug("skipping the torn last line of %s", path)
                break
            raise DataError(f"{path} line {number} is not JSON ({exc.msg}); the file is damaged") from exc
        if not isinstance(record, dict) or "step" not in record:
            raise DataError(f"{path} line {number} is not a metrics record (no 'step'); the file is damaged")
        if "knn_top1" in record:
            knn.append(record)
        elif record.get("loss") is not None:  # null: an update dropped by --on-nonfinite skip; events have none
            steps.append(record)
    return sorted(steps, key=lambda r: r["step"]), sorted(knn, key=lambda r: r["step"])


def plot_embedding(
    vectors: np.ndarray,
    *,
    out: Path,
    labels: Sequence[str] | None = None,
    thumbnails: Sequence[Path] | None = None,
    method: str = "pca",
) -> Path:
    """A 2-D map of the rows of `vectors` (N, D), coloured by `labels`, with small images of `thumbnails`.

    At most 5,000 rows (a fixed sample) are projected and drawn; thumbnails on at most 200 of them.
    """
    Figure = _figure_class()
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out} must end with .png (the map is a PNG image)")
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not supported; choose one of {', '.join(METHODS)}")
    if vectors.ndim != 2:
        raise ConfigError(f"the vectors have shape {vectors.shape}; expected a 2-D (rows, dim) array such as `simclr embed` writes")
    n = len(vectors)
    if n == 0:
        raise DataError("there are no vectors to plot (the array has 0 rows)")
    for name, given in (("labels", labels), ("thumbnails", thumbnails)):
        if given is not None and len(given) != n:
            raise ConfigError(f"{len(given)} {name} for {n} vectors; give one per row, in row order")

    rows = sample_rows(n, limit=MAX_POINTS)
    x = np.asarray(vectors[rows], dtype=np.float64)  # (M, D); fancy indexing reads only these rows of a memmap
    if not np.isfinite(x).all():
        raise DataError("the vectors contain NaN or inf; re-create them (`simclr embed`) from a finite checkpoint")
    if method == "pca":
        xy, explained = pca_2d(x)  # (M, 2)
        axis_names = [f"PC{i + 1} ({100 * r:.1f}% of variance)" for i, r in enumerate(explained)]
    else:
        xy = _nonlinear_2d(x, method=method)
        axis_names = [f"{method} 1", f"{method} 2"]

    fig = Figure(figsize=(8, 7), dpi=DPI)
    ax = fig.add_subplot()
    size = 4 if len(rows) > 1000 else 12
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, alpha=0.7, linewidths=0)
    else:
        chosen = np.asarray([str(labels[i]) for i in rows])
        names = sorted(set(chosen))
        colours = _colours(len(names))
        for name, colour in zip(names, colours):
            mine = chosen == name
            ax.scatter(xy[mine, 0], xy[mine, 1], s=size, alpha=0.7, linewidths=0, color=colour, label=name)
        if len(names) <= MAX_LEGEND:
            ax.legend(loc="best", fontsize="small", markerscale=2, frameon=True)
    if thumbnails is not None:
        _draw_thumbnails(ax, xy, [Path(thumbnails[i]) for i in rows])
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    sampled = f", a fixed sample of {len(rows):,} of {n:,}" if len(rows) < n else ""
    ax.set_title(f"{method.upper() if method == 'pca' else method} map of {len(rows):,} vectors ({vectors.shape[1]}-d{sampled})")
    fig.tight_layout()
    return _save(fig, out)


def sample_rows(n: int, *, limit: int) -> np.ndarray:
    """Sorted indices of at most `limit` of `n` rows, the same every call (seeded), so maps are reproducible."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates (N, 2) on the first two principal axes, their share of the variance (2,)).

    SVD of the centred data; each axis's sign is fixed so its largest-magnitude loading is positive
    (as scikit-learn does), so the map does not flip between runs. Missing axes (D < 2 or N < 3) are zeros.
    """
    centred = x - x.mean(axis=0)  # (N, D)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)  # vt: (K, D), K = min(N, D)
    k = min(2, len(s))
    axes = vt[:k]  # (k, D)
    signs = np.sign(axes[np.arange(k), np.abs(axes).argmax(axis=1)])
    axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
    xy = np.zeros((len(x), 2))
    xy[:, :k] = centred @ axes.T  # (N, k)
    total = float((s**2).sum())
    explained = np.zeros(2)
    if total > 0:
        explained[:k] = s[:k] ** 2 / total
    return xy, explained


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], *, out: Path) -> Path:
    """A heat map of `matrix` (C, C) counts, row i = true class i, normalised per row; the title gives accuracy."""
    Figure = _figure_class()
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out} must end with .png (the confusion matrix is a PNG image)")
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ConfigError(f"the confusion matrix has shape {matrix.shape}; expected a square (classes, classes) array")
    c = matrix.shape[0]
    if len(classes) != c:
        raise ConfigError(f"{len(classes)} class names for a {c} x {c} confusion matrix; give one name per row")
    if (matrix < 0).any():
        raise ConfigError("the confusion matrix has negative entries; it must hold counts")
    total = float(matrix.sum())
    accuracy = f"{100 * float(np.trace(matrix)) / total:.2f}%" if total > 0 else "n/a (no samples)"
    rates = normalize_rows(matrix)  # (C, C)

    side = min(4 + 0.35 * c, 20)
    fig = Figure(figsize=(side + 1, side), dpi=DPI)
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if c <= MAX_TICK_CLASSES:
        ticks = np.arange(c)
        ax.set_xticks(ticks, [str(name) for name in classes], rotation=90, fontsize="small")
        ax.set_yticks(ticks, [str(name) for name in classes], fontsize="small")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if c <= MAX_CELL_TEXT:
        for i in range(c):
            for j in range(c):
                if matrix[i, j]:
                    ax.text(j, i, f"{100 * rates[i, j]:.0f}", ha="center", va="center", fontsize="x-small",
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"accuracy {accuracy} over {int(total):,} samples, {c} classes")
    fig.tight_layout()
    return _save(fig, out)


def plot_cka(matrix: np.ndarray, *, rows: Sequence[str], columns: Sequence[str], row_title: str, column_title: str,
             title: str, out: Path) -> Path:
    """A heat map of a CKA matrix (len(rows), len(columns)) on the fixed 0..1 scale, each cell annotated; NaN cells
    (a representation without variance) are left blank."""
    Figure = _figure_class()
    matrix = np.asarray(matrix, dtype=np.float64)
    fig = Figure(figsize=(2.5 + 0.8 * len(columns), 2 + 0.7 * len(rows)), dpi=DPI)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="linear CKA")
    ax.set_xticks(np.arange(len(columns)), list(columns), rotation=45, ha="right")
    ax.set_yticks(np.arange(len(rows)), list(rows))
    for (i, j), value in np.ndenumerate(matrix):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small",
                    color="black" if value > 0.6 else "white")
    ax.set_xlabel(column_title)
    ax.set_ylabel(row_title)
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    return _save(fig, Path(out))


def plot_compare(scores: Sequence[Sequence[float | None]], *, ranks: Sequence[Sequence[float | None]], rows: Sequence[str],
                 columns: Sequence[str], correlation: Sequence[Sequence[float]], title: str, out: Path) -> Path:
    """`simclr compare`'s picture: encoders x tasks, each cell coloured by its place between the column's worst (dark)
    and best (bright) score and annotated with the score and its rank; beside it, with two tasks or more, the
    Spearman rank correlation between the tasks across the encoders (-1..1). Missing scores are left blank."""
    Figure = _figure_class()
    values = np.array([[np.nan if v is None else v for v in line] for line in scores], dtype=np.float64).reshape(
        len(rows), len(columns))
    low, high = np.nanmin(np.where(np.isfinite(values), values, np.inf), axis=0), np.nanmax(
        np.where(np.isfinite(values), values, -np.inf), axis=0)
    span = np.where(high > low, high - low, 1.0)
    relative = np.where(np.isfinite(values), (values - low) / span, np.nan)  # (E, T): 0 worst .. 1 best in the column
    relative = np.where(np.isfinite(values) & (high == low), 1.0, relative)
    panels = 2 if len(columns) >= 2 else 1
    fig = Figure(figsize=(3 + 1.1 * len(columns) * panels + 2 * (panels - 1), 2.2 + 0.5 * max(len(rows), len(columns))),
                 dpi=DPI)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    image = ax.imshow(relative, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="within each task: worst (0) .. best (1)")
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.3f}\n#{ranks[i][j]:g}", ha="center", va="center", fontsize="small",
                    color="black" if relative[i, j] > 0.6 else "white")
    ax.set_xticks(np.arange(len(columns)), list(columns), rotation=45, ha="right")
    ax.set_yticks(np.arange(len(rows)), list(rows))
    ax.set_title(title, fontsize="medium")
    if panels == 2:
        rho = np.array([[np.nan if v is None else v for v in line] for line in correlation], dtype=np.float64)
        ax = axes[1]
        image = ax.imshow(rho, cmap="coolwarm", vmin=-1.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="Spearman rank correlation")
        for (i, j), value in np.ndenumerate(rho):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small")
        ax.set_xticks(np.arange(len(columns)), list(columns), rotation=45, ha="right")
        ax.set_yticks(np.arange(len(columns)), list(columns))
        ax.set_title("do the tasks rank the encoders alike?", fontsize="medium")
    fig.tight_layout()
    return _save(fig, Path(out))


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum, so row i is the distribution of predictions for true class i; rows of zeros stay zero."""
    matrix = np.asarray(matrix, dtype=np.float64)
    sums = matrix.sum(axis=1, keepdims=True)  # (C, 1)
    return np.divide(matrix, sums, out=np.zeros_like(matrix), where=sums > 0)


def _figure_class() -> type[Figure]:
    """matplotlib's Figure, or the ConfigError that tells the user how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(f"drawing plots needs matplotlib, which is not installed; {INSTALL_HINT}") from exc
    return Figure


def _save(fig: Figure, path: Path) -> Path:
    # Agg renders the PNG (matplotlib picks it from the format); atomic so a reader never sees half a file.
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    fig.clear()  # drop the artists now rather than when the garbage collector finds the figure
    return path


def _loss_figure(Figure: type[Figure], steps: list[dict[str, Any]]) -> Figure:
    x = [r["step"] for r in steps]
    fig = Figure(figsize=(8, 6), dpi=DPI)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    loss_ax.plot(x, [r["loss"] for r in steps], color="tab:blue", marker="." if len(x) < 50 else None)
    loss_ax.set_ylabel("NT-Xent loss")
    loss_ax.grid(alpha=0.3)
    last = steps[-1]
    loss_ax.set_title(f"pretraining: step {last['step']:,} (epoch {last['epoch']}), loss {last['loss']:.4f}")
    if "lr" in last:
        lr_ax.plot(x, [r.get("lr", np.nan) for r in steps], color="tab:orange")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _knn_figure(Figure: type[Figure], knn: list[dict[str, Any]]) -> Figure:
    x = [r["epoch"] for r in knn]  # counted from 1: the check after the first epoch sits at 1
    fig = Figure(figsize=(8, 4.5), dpi=DPI)
    ax = fig.add_subplot()
    ax.plot(x, [100 * r["knn_top1"] for r in knn], marker="o", label="top-1")
    if all(r.get("knn_top5") is not None for r in knn):  # None below 5 classes
        ax.plot(x, [100 * r["knn_top5"] for r in knn], marker="o", linestyle="--", alpha=0.6, label="top-5")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    last = knn[-1]
    k = f", k={last['knn_k']}" if "knn_k" in last else ""
    ax.set_title(f"kNN monitor{k}: top-1 {100 * last['knn_top1']:.2f}% at step {last['step']:,}")
    fig.tight_layout()
    return fig


def _nonlinear_2d(x: np.ndarray, *, method: str) -> np.ndarray:
    """t-SNE (scikit-learn) or UMAP (umap-learn) coordinates (N, 2), seeded; ConfigError naming the missing package."""
    n = len(x)
    if n < 3:
        return pca_2d(x)[0]  # neither method is defined on so few points
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as exc:
            raise ConfigError("method 'tsne' needs scikit-learn, which is not installed; pip install scikit-learn, or use method 'pca'") from exc
        # perplexity must stay below the number of points; 30 is scikit-learn's default
        return TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=0).fit_transform(x)
    try:
        import umap
    except ImportError as exc:
        raise ConfigError("method 'umap' needs umap-learn, which is not installed; pip install umap-learn, or use method 'pca'") from exc
    return umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=0).fit_transform(x)


def _colours(count: int) -> list[Any]:
    """Distinct colours: the qualitative tab10/tab20 palettes while they last, then an evenly sampled colour map."""
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["turbo"](i / (count - 1)) for i in range(count)]


def _draw_thumbnails(ax: Any, xy: np.ndarray, paths: list[Path]) -> None:
    """24-px images of up to 200 evenly spread points, drawn at their coordinates; unreadable files are skipped."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    picked = np.unique(np.linspace(0, len(paths) - 1, num=min(MAX_THUMBNAILS, len(paths))).round().astype(int))
    for i in picked:
        try:
            image = decode_image(paths[i])
        except Exception as exc:  # noqa: BLE001 - any broken file only loses its thumbnail
            log.warning("no thumbnail for %s: %s", paths[i], exc)
            continue
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        # dpi_cor=False: the thumbnail is 24 pixels in the PNG whatever the figure's dpi
        box = AnnotationBbox(OffsetImage(np.asarray(image), dpi_cor=False), (xy[i, 0], xy[i, 1]), frameon=False, pad=0)
        ax.add_artist(box)
