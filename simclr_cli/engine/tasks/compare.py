"""`simclr compare`: many encoders, many tasks, one table (the ViRB lesson, Kotar et al. 2021: one benchmark's
ranking is a poor guide to another's, so measure the encoders on the tasks you care about, side by side).

Every encoder is opened through `features.open_encoder` and sees every image through its own file's eval transform.
For each (encoder, dataset) the features are extracted once and shared by the tasks that read them:
- the plain pass (h of every train and held-out image, and for the probe images the last stage's map averaged to
  `probes.COLOUR_GRID` cells) feeds knn, linear, rotation's 0-degree rows and colour-grid;
- rotation and jigsaw each add one pass over their views of the probe images (3 and 9 per image).
knn is the weighted kNN of `simclr knn` (T = 0.1, k = 20 below 10,000 training images, else 200); linear is
linear-eval's cached protocol (L-BFGS, L2 1e-4 on standardised h); finetune-1pct is `simclr finetune
--label-fraction 0.01` (it trains a copy of the encoder, reading no shared features); the probes are in
engine/probes.py. Every
score lands in `<out>/cache/`, keyed by the encoder file's sha256 (with the seed for a random-init twin), the task,
the data and the protocol's settings, so a second run with one more encoder computes only the new row.

Under a process group (`--gpus N`) each pass is shared out like `features.extract` (contiguous, batch-aligned
shares, rows gathered in dataset order), so rank 0 fits the probes on exactly the features one process computes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from simclr_cli.engine import defaults, distributed, logistic, neighbours, plots, probes, rundir
from simclr_cli.engine.configs import LR_SCALING, CompareConfig, FinetuneConfig
from simclr_cli.engine.datasets import NAMED_DATASETS, labelled_splits
from simclr_cli.engine.device import Runtime, runtime
from simclr_cli.engine.errors import CheckpointError, DataError, one_line
from simclr_cli.engine.features import Encoder, extract, extract_with_map, labels_of, open_encoder, transform_for, weights_of
from simclr_cli.engine.files import atomic_write, check_output_folder
from simclr_cli.engine.images import ImageFiles, scan_folder
from simclr_cli.engine.ranks import ranks, spearman
from simclr_cli.engine.report import Progress
from simclr_cli.engine.results import write_json
from simclr_cli.engine.labelsets import class_balanced_subset
from simclr_cli.engine.supervised import finetune_encoder

log = logging.getLogger("simclr")

DEFAULT_OUT = rundir.RUNS / "compare"
CACHE_DIR = "cache"
JSON_FILE, CSV_FILE, HEATMAP_FILE = "compare.json", "compare.csv", "compare.png"
LABELLED_TASKS = ("knn", "linear", "finetune-1pct")
METRICS = {"knn": "top-1", "linear": "top-1", "finetune-1pct": "top-1", "rotation": "top-1 (4-way)", "jigsaw": "top-1 (8-way)", "colour-grid": "R^2"}
UNLABELLED_PROBE_SPLIT = 0.8  # of an image folder without train/ and val/: the probes' train share
MIN_ENCODERS_FOR_CORRELATION = 4  # below this a rank correlation takes only a handful of values (3 encoders: 4)
VERSION = 1  # of the protocols: bump to invalidate every cache


@dataclass(frozen=True)
class Data:
    """One --data: its labelled splits (None for an unlabelled folder) and the probes' train and held-out images."""

    name: str
    key: str  # what names this data in the cache
    train: Dataset | None
    val: Dataset | None
    num_classes: int
    probe_train: Dataset
    probe_test: Dataset
    probe_train_rows: Tensor  # indices of probe_train in train (or 0..n-1 without labels)
    probe_test_rows: Tensor


@dataclass
class Row:
    """One encoder of the table: what it is, how it saw the images, its scores by column, or why it failed."""

    name: str
    file: str
    random_init: bool
    sha256: str | None = None  # of the file (a random-init twin: of the file its architecture came from)
    input: dict[str, Any] | None = None
    failed: str | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)  # the columns computed by this run (the rest: from the cache)

    def to_dict(self, columns: list[str], column_ranks: dict[str, dict[str, float]]) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "random_init": self.random_init, "checkpoint_sha256": self.sha256,
                "weights": None if self.failed else ("random init" if self.random_init else "trained"),
                "input": self.input, "failed": self.failed,
                "scores": {c: _finite(self.scores.get(c)) for c in columns},
                "ranks": {c: column_ranks[c].get(self.name) for c in columns}, "computed": self.computed}


@dataclass(frozen=True)
class Comparison:
    """What `simclr compare` shows, and the files written."""

    rows: list[Row]
    columns: list[str]  # "task" with one dataset, "task@data" with several
    ranks: dict[str, dict[str, float]]  # column -> row name -> rank (1 = best)
    correlation: list[list[float]]  # Spearman between columns, across the encoders that scored both
    correlation_warning: str | None
    results_file: Path
    csv_file: Path
    heatmap: Path | None  # None without matplotlib
    seconds: float

    def input_text(self, row: Row) -> str:
        return "-" if row.input is None else input_text(row.input)


def run(cfg: CompareConfig, *, encoders: list[Path], out: Path | None = None,
        progress: Progress | None = None) -> Comparison | None:
    """Score every encoder in `encoders` (plus, with cfg.random_init, the untrained twin of the first) on every task
    and dataset of `cfg`; write compare.json, compare.csv and compare.png in `out` (default runs/compare).

    Inside the process group every rank walks the same cells in the same order and joins each extraction (its share
    of the images, gathered in order); rank 0 alone reads and writes the cache, fits the probes, writes the files and
    returns what to show, the others None."""
    cfg.validate()
    if not encoders:
        raise DataError("compare needs at least one ENCODER (an encoder file or a run folder)")
    folder = Path(out) if out is not None else DEFAULT_OUT
    with distributed.context(device=cfg.device) as world:
        check_output_folder(folder)  # now, not after the extraction
        started = time.perf_counter()
        datasets = [_open_data(name, cfg) for name in cfg.data]
        rt = runtime(device=cfg.device, precision=cfg.precision)
        cfg = replace(cfg, workers=defaults.resolve_workers(cfg.workers, rt.device))
        columns = [(task, data) for data in datasets for task in cfg.tasks]
        names = [_column_name(task, data, several=len(datasets) > 1) for task, data in columns]
        specs = [(Path(e), False) for e in encoders] + ([(Path(encoders[0]), True)] if cfg.random_init else [])
        cache = _Cache(folder / CACHE_DIR)
        rows = []
        for spec, random_init in specs:
            row, encoder = _open_row(spec, random_init=random_init, seed=cfg.seed)
            rows.append(row)
            if encoder is None:
                continue
            for data in datasets:
                shared = _Features(encoder, data, cfg=cfg, rt=rt, progress=progress if world.is_main else None,
                                   label=row.name)
                for (task, column_data), column in zip(columns, names):
                    if column_data is data:
                        row.scores[column] = _score(task, shared, cache=cache, row=row, column=column, cfg=cfg,
                                                    main=world.is_main)
        if not world.is_main:
            return None
        return _table(rows, names, columns, datasets, cfg=cfg, folder=folder, started=started)


def _table(rows: list[Row], names: list[str], columns: list[tuple[str, Data]], datasets: list[Data], *,
           cfg: CompareConfig, folder: Path, started: float) -> Comparison:
    """Ranks, rank correlations and the files, from the scored rows."""
    _unique_names(rows)
    column_ranks = {c: _column_ranks(rows, c) for c in names}
    correlation = [[_correlation(rows, a, b) for b in names] for a in names]
    scored = sum(1 for r in rows if r.failed is None)
    warning = None
    if scored < MIN_ENCODERS_FOR_CORRELATION:
        warning = (f"rank correlations across {scored} encoder(s) mean little (3 encoders allow only 4 values); "
                   f"compare at least {MIN_ENCODERS_FOR_CORRELATION} before reading them")
        log.warning("%s", warning)
    payload = {
        "protocols": _protocols(cfg), "tasks": list(cfg.tasks), "data": [d.name for d in datasets], "columns": names,
        "metrics": {c: METRICS[task] for (task, _), c in zip(columns, names)},
        "rows": [r.to_dict(names, column_ranks) for r in rows],
        "spearman": {"columns": names, "matrix": [[_finite(v) for v in line] for line in correlation],
                     "encoders": scored, "warning": warning},
        "seconds": round(time.perf_counter() - started, 3),
    }
    results_file = write_json(folder / JSON_FILE, payload)
    csv_file = _write_csv(folder / CSV_FILE, rows, names, column_ranks)
    heatmap = _heatmap(rows, names, column_ranks, correlation, folder / HEATMAP_FILE,
                       title=", ".join(d.name for d in datasets))
    return Comparison(rows=rows, columns=names, ranks=column_ranks, correlation=correlation, correlation_warning=warning,
                      results_file=results_file, csv_file=csv_file, heatmap=heatmap,
                      seconds=time.perf_counter() - started)


# --- data ---------------------------------------------------------------------------------------------------------

def _open_data(name: str, cfg: CompareConfig) -> Data:
    """A named dataset or a folder with train/ and val/ (or test/): labelled; any other folder: images for the probes."""
    folder = Path(name).expanduser()
    labelled = name in NAMED_DATASETS or (folder / "train").is_dir()
    generator = torch.Generator().manual_seed(cfg.seed)
    if labelled:
        splits = labelled_splits(name, root=Path(cfg.data_root).expanduser() if cfg.data_root else None,
                                 download=cfg.download)
        train_rows = _draw(len(splits.train), cfg.probe_train_images, generator)
        test_rows = _draw(len(splits.val), cfg.probe_test_images, generator)
        key = name if name in NAMED_DATASETS else f"{folder.resolve()} ({len(splits.train)} train, {len(splits.val)} val)"
        return Data(name=splits.name, key=key, train=splits.train, val=splits.val, num_classes=len(splits.classes),
                    probe_train=Subset(splits.train, train_rows.tolist()), probe_test=Subset(splits.val, test_rows.tolist()),
                    probe_train_rows=train_rows, probe_test_rows=test_rows)
    if not folder.is_dir():
        raise DataError(f"--data {name!r} is neither a dataset name ({', '.join(NAMED_DATASETS)}) nor a folder")
    images = ImageFiles(scan_folder(folder).images)
    if len(images) < 4:
        raise DataError(f"--data {folder} holds {len(images)} images; the probes need at least 4 (a train and a test split)")
    order = torch.randperm(len(images), generator=generator)
    cut = max(1, min(len(images) - 1, round(UNLABELLED_PROBE_SPLIT * len(images))))
    train = sorted(order[:cut][: cfg.probe_train_images].tolist())
    test = sorted(order[cut:][: cfg.probe_test_images].tolist())
    log.info("data: %s has no train/ and val/: the probes only (%d train, %d test images)", folder, len(train), len(test))
    probe_train, probe_test = Subset(images, train), Subset(images, test)
    return Data(name=str(folder), key=f"{folder.resolve()} ({len(images)} images)", train=None, val=None, num_classes=0,
                probe_train=probe_train, probe_test=probe_test, probe_train_rows=torch.arange(len(train)),
                probe_test_rows=torch.arange(len(test)))


def _draw(count: int, limit: int, generator: torch.Generator) -> Tensor:
    """Sorted indices of `limit` of `count` items (all of them when there are no more)."""
    if count < 2:
        raise DataError(f"a split of {count} image(s) is too small for the probes; give at least 2 train and 2 val images")
    if count <= limit:
        return torch.arange(count)
    return torch.randperm(count, generator=generator)[:limit].sort().values


# --- encoders -----------------------------------------------------------------------------------------------------

def _open_row(spec: Path, *, random_init: bool, seed: int) -> tuple[Row, Encoder | None]:
    """The encoder and its row; a file that cannot be read is named in one line and its row marked failed."""
    name = _name(spec) + (" (random init)" if random_init else "")
    error = None
    try:
        trained = open_encoder(spec)
        encoder = open_encoder(spec, random_init=True, seed=seed) if random_init else trained
    except (CheckpointError, DataError, OSError) as exc:
        error = one_line(exc)
    # Every process skips the row together, or the others would wait in its extraction for one that skipped it.
    if distributed.any_rank(error is not None):
        error = error or "another process of --gpus could not read it (is it on storage every process sees?)"
        log.warning("%s: cannot be read, its row is marked failed (%s)", spec, error)
        return Row(name=name, file=str(spec), random_init=random_init, failed=error), None
    info = encoder.info
    described = {"image_size": info.image_size, "mean": list(info.mean), "std": list(info.std),
                 "interpolation": info.interpolation, "weights": weights_of(encoder)}
    return Row(name=name, file=str(trained.source), random_init=random_init, sha256=trained.digest,
               input=described), encoder


def _name(spec: Path) -> str:
    """An encoder's folder and file name: `encoder.safetensors` alone would not tell two runs apart."""
    path = rundir.encoder_file(spec) if spec.is_dir() else spec
    path = path.resolve() if path.exists() else path
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _unique_names(rows: list[Row]) -> None:
    seen: dict[str, int] = {}
    for row in rows:
        seen[row.name] = seen.get(row.name, 0) + 1
        if seen[row.name] > 1:
            row.name = f"{row.name} #{seen[row.name]}"


def input_text(described: dict[str, Any]) -> str:
    """How an encoder saw the images, short: `16 px bilinear, mean 0.5/0.5/0.5, std 0.25/0.25/0.25`."""
    def triple(values):
        return "/".join(f"{v:.3g}" for v in values)
    return (f"{described['image_size']} px {described['interpolation']}, mean {triple(described['mean'])}, "
            f"std {triple(described['std'])}")


# --- features, shared by the tasks -------------------------------------------------------------------------------

SPLITS = ("train", "test")


class _Features:
    """The features of one (encoder, dataset): each pass extracted once, when `extract` is first asked for it."""

    def __init__(self, encoder: Encoder, data: Data, *, cfg: CompareConfig, rt: Runtime, progress: Progress | None,
                 label: str) -> None:
        self.encoder, self.data, self.cfg, self.rt, self.progress, self.label = encoder, data, cfg, rt, progress, label
        self.transform = transform_for(encoder)
        self.wants_labels = any(t in ("knn", "linear") for t in cfg.tasks) and data.train is not None
        self._passes: dict[tuple[str, str], Any] = {}

    def extract(self, passes: tuple[str, ...]) -> None:
        """Run the passes not run yet, in a fixed order: every process calls this for the same passes in the same
        order, since each pass is a collective under a process group."""
        for name in passes:
            for split in SPLITS:
                if (name, split) not in self._passes:
                    self._passes[name, split] = getattr(self, f"_{name}_pass")(split)

    def _get(self, name: str, split: str):
        if (name, split) not in self._passes:  # a task that reads a pass its `reads` does not list: a bug
            raise RuntimeError(f"the {name} features were read before they were extracted; list {name!r} in the "
                               "task's `reads`")
        return self._passes[name, split]

    def _common(self, what: str) -> dict[str, Any]:
        return dict(batch_size=self.cfg.batch_size, workers=self.cfg.workers, rt=self.rt, progress=self.progress,
                    description=f"{self.label}: {what}")

    def _probe_images(self, split: str) -> Dataset:
        return self.data.probe_train if split == "train" else self.data.probe_test

    def plain(self, split: str) -> tuple[Tensor, Tensor, Tensor]:
        """(h of the split's images (N, D), h of its probe images (M, D), their colour-grid cells (M, G^2, C))."""
        return self._get("plain", split)

    def _plain_pass(self, split: str):
        train = split == "train"
        images, rows = ((self.data.train, self.data.probe_train_rows) if train else
                        (self.data.val, self.data.probe_test_rows))
        if not self.wants_labels:
            images = self._probe_images(split)
            rows = torch.arange(len(images))
        h, grid = extract_with_map(self.encoder, images, rows=rows, reduce=probes.grid_features,
                                   **self._common(f"{'train' if train else 'held-out'} features"))
        return h, h[rows], grid

    def rotated(self, split: str) -> Tensor:
        """h of the probe images turned 90, 180 and 270 degrees (3M, D), image-major."""
        return self._get("rotated", split)

    def _rotated_pass(self, split: str) -> Tensor:
        views = probes.rotated_views(self._probe_images(split), self.transform, ROTATED)
        return self._views(views, f"{'train' if split == 'train' else 'held-out'} rotations")

    def patches(self, split: str) -> Tensor:
        """h of every probe image's 9 jigsaw patches (M, 9, D)."""
        return self._get("patches", split)

    def _patches_pass(self, split: str) -> Tensor:
        views = probes.patch_views(self._probe_images(split), self.transform)
        return self._views(views, f"{'train' if split == 'train' else 'held-out'} patches").unflatten(0, (-1, 9))

    def _views(self, views: Dataset, what: str) -> Tensor:
        return extract(self.encoder, views, transform=_as_is, **self._common(what))

    def colours(self, split: str) -> Tensor:
        """The colour-grid targets of the probe images (M, G^2, 3): read from the images, no encoder pass."""
        info = self.encoder.info
        return probes.colour_targets(self._probe_images(split), self.transform, mean=info.mean, std=info.std)


ROTATED = probes.ROTATIONS[1:]  # the 0-degree rows are the plain pass's


def _as_is(x: Tensor) -> Tensor:
    return x  # the views are tensors already, through the encoder's transform


# --- the tasks ----------------------------------------------------------------------------------------------------

def _knn(f: _Features) -> dict[str, Any]:
    (train_h, _, _), (val_h, _, _) = f.plain("train"), f.plain("test")
    train_y, val_y = labels_of(f.data.train), labels_of(f.data.val)
    k = neighbours.default_k(len(train_y))
    (score,) = neighbours.scores(train_h, train_y, val_h, val_y, k=(k,), temperature=f.cfg.knn_temperature,
                                 num_classes=f.data.num_classes, device=f.rt.device)
    return {"score": score.top1, "k": score.k_used, "train": len(train_y), "test": len(val_y)}


def _linear(f: _Features) -> dict[str, Any]:
    (train_h, _, _), (val_h, _, _) = f.plain("train"), f.plain("test")
    train_y, val_y = labels_of(f.data.train), labels_of(f.data.val)
    return _classify(f, train_h, train_y, val_h, val_y, num_classes=f.data.num_classes)


FINETUNE_FRACTION = 0.01


def _finetune_1pct(f: _Features) -> dict[str, Any]:
    """`simclr finetune --label-fraction 0.01` with its defaults (SimCLR Appendix B.6): the whole encoder and a linear
    layer on a class-balanced 1% of the train labels (at least one per class), top-1 on val after the last epoch."""
    train, val = f.data.train, f.data.val
    subset = class_balanced_subset(labels_of(train).tolist(), FINETUNE_FRACTION, seed=f.cfg.seed)
    cfg = FinetuneConfig(label_fraction=FINETUNE_FRACTION, seed=f.cfg.seed, workers=f.cfg.workers).resolved(
        labelled_images=len(subset), labelled_fraction=len(subset) / len(train))
    run = finetune_encoder(cfg, f.encoder.model, f.encoder.info, Subset(train, subset), val,
                           num_classes=f.data.num_classes, lr_scaling=LR_SCALING[cfg.optimizer], rt=f.rt,
                           progress=f.progress)
    return {"score": run.history[-1]["top1"], "labelled": len(subset), "epochs": cfg.epochs, "steps": run.steps,
            "train": len(subset), "test": len(val)}


def _rotation(f: _Features) -> dict[str, Any]:
    def split(name: str) -> tuple[Tensor, Tensor]:
        upright = f.plain(name)[1]  # (M, D)
        turned = f.rotated(name)  # (3M, D): image-major, turns 1, 2, 3
        labels = torch.tensor(ROTATED).repeat(len(upright))
        return torch.cat([upright, turned]), torch.cat([torch.zeros(len(upright), dtype=torch.long), labels])

    return _classify(f, *split("train"), *split("test"), num_classes=len(probes.ROTATIONS))


def _jigsaw(f: _Features) -> dict[str, Any]:
    return _classify(f, *probes.relative_pairs(f.patches("train")), *probes.relative_pairs(f.patches("test")),
                     num_classes=len(probes.NEIGHBOURS))


def _colour_grid(f: _Features) -> dict[str, Any]:
    def split(name: str) -> tuple[Tensor, Tensor]:
        cells = f.plain(name)[2]  # (M, G^2, C)
        return cells.flatten(0, 1), f.colours(name).flatten(0, 1)  # (M G^2, C), (M G^2, 3)

    (x, y), (x_test, y_test) = split("train"), split("test")
    predict = probes.fit_ridge(x, y)
    return {"score": probes.r2_score(predict(x_test), y_test), "train": len(x), "test": len(x_test)}


def _classify(f: _Features, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor, *, num_classes: int) -> dict[str, Any]:
    """A linear classifier fitted as linear-eval's cached protocol does; its top-1 on the held-out rows."""
    torch.manual_seed(f.cfg.seed)
    head, fit = logistic.fit_linear(x, y, num_classes=num_classes, l2=f.cfg.l2, max_iter=f.cfg.max_iter, device=f.rt.device)
    top1, _ = logistic.accuracy(head, x_test, y_test, device=f.rt.device)
    return {"score": top1, "iterations": fit["iterations"], "train": len(y), "test": len(y_test)}


@dataclass(frozen=True)
class _Task:
    """A column's protocol: the shared passes it reads (extracted by every process, together) and its scoring."""

    reads: tuple[str, ...]  # of _Features: plain, rotated, patches
    score: Callable[[_Features], dict[str, Any]]
    # Trains a copy of the encoder instead of reading shared passes. Every process runs it whole (its training is
    # not split), so none waits at its next collective for rank 0's training, which may outlast the group's timeout.
    every_process: bool = False


TASKS: dict[str, _Task] = {
    "knn": _Task(("plain",), _knn), "linear": _Task(("plain",), _linear),
    "finetune-1pct": _Task((), _finetune_1pct, every_process=True), "rotation": _Task(("plain", "rotated"), _rotation),
    "jigsaw": _Task(("patches",), _jigsaw), "colour-grid": _Task(("plain",), _colour_grid),
}


def _score(task: str, shared: _Features, *, cache: _Cache, row: Row, column: str, cfg: CompareConfig,
           main: bool = True) -> float | None:
    """One cell: from the cache, or computed (and cached); None for a labelled task on data without labels.
    Every process calls it for the same cells in the same order; only the main one (`main`) reads the cache, scores
    (but see _Task.every_process) and writes, and gets the score, the others None."""
    if task in LABELLED_TASKS and shared.data.train is None:
        return None
    # The input transform is part of the key: one external file read at two sizes (`@SIZE`) is two encoders.
    key = {"version": VERSION, "encoder": row.sha256, "random_init_seed": cfg.seed if row.random_init else None,
           "input": row.input, "task": task, "data": shared.data.key, "protocol": _protocols(cfg)[task]}
    hit = cache.get(key) if main and row.sha256 is not None else None  # no file hash, no name to cache it under
    if distributed.main_decides(hit is not None):  # a cached cell: no process extracts its passes
        return hit["score"] if main else None
    started = time.perf_counter()
    shared.extract(TASKS[task].reads)
    if not (main or TASKS[task].every_process):
        return None
    result = TASKS[task].score(shared)
    if not main:
        return None
    result["seconds"] = round(time.perf_counter() - started, 3)
    log.info("%s, %s on %s: %s %.4f", row.name, task, shared.data.name, METRICS[task], result["score"])
    if row.sha256 is not None:
        cache.put(key, result)
    row.computed.append(column)
    return result["score"]


def _protocols(cfg: CompareConfig) -> dict[str, dict[str, Any]]:
    """Each task's fixed settings, as compare.json states them and the cache keys them."""
    probe = {"probe_train_images": cfg.probe_train_images, "probe_test_images": cfg.probe_test_images, "seed": cfg.seed}
    fit = {"fit": "multinomial logistic regression, L-BFGS on standardised features", "l2": cfg.l2,
           "max_iter": cfg.max_iter}
    return {
        "knn": {"protocol": "weighted kNN (Wu et al. 2018) on h, cosine", "temperature": cfg.knn_temperature,
                "k": "20 below 10,000 training images, else 200", "split": "train -> val"},
        "linear": {"protocol": "linear on frozen h (linear-eval --protocol cached)", **fit, "split": "train -> val"},
        "finetune-1pct": {"protocol": "simclr finetune --label-fraction 0.01 (its defaults), train -> val",
                          "label_fraction": FINETUNE_FRACTION, "seed": cfg.seed},
        "rotation": {"protocol": "4-way rotation (0/90/180/270 ccw) from h", **fit, **probe},
        "jigsaw": {"protocol": f"8-way relative position of a {probes.JIGSAW_GRID}x{probes.JIGSAW_GRID} grid's "
                               "neighbour to its centre, from [h_centre, h_neighbour]; patches resized to the input size",
                   **fit, **probe},
        "colour-grid": {"protocol": f"ridge regression of each {probes.COLOUR_GRID}x{probes.COLOUR_GRID} cell's mean RGB "
                                    "from layer4's map averaged to that cell; R^2 on the held-out images",
                        "l2": probes.RIDGE_L2, **probe},
    }


class _Cache:
    """One JSON file per scored cell, named by the sha256 of its key (which the file repeats)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, key: dict[str, Any]) -> Path:
        text = json.dumps(key, sort_keys=True, default=str)
        return self.folder / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # absent, or torn by a killed run: computed again
        if saved.get("key") != json.loads(json.dumps(key, default=str)) or not isinstance(saved.get("result"), dict):
            return None
        return saved["result"]

    def put(self, key: dict[str, Any], result: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self._path(key), {"key": key, "result": result})


# --- the table ----------------------------------------------------------------------------------------------------

def _column_name(task: str, data: Data, *, several: bool) -> str:
    return f"{task}@{Path(data.name).name or data.name}" if several else task


def _column_ranks(rows: list[Row], column: str) -> dict[str, float]:
    scored = [(r.name, r.scores[column]) for r in rows if _is_score(r.scores.get(column))]
    return dict(zip([n for n, _ in scored], ranks([v for _, v in scored])))


def _correlation(rows: list[Row], a: str, b: str) -> float:
    pairs = [(r.scores[a], r.scores[b]) for r in rows if _is_score(r.scores.get(a)) and _is_score(r.scores.get(b))]
    return spearman([x for x, _ in pairs], [y for _, y in pairs])


def _is_score(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _finite(value: float | None) -> float | None:
    return value if _is_score(value) else None


def _write_csv(path: Path, rows: list[Row], columns: list[str], column_ranks: dict[str, dict[str, float]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["encoder", "file", "checkpoint_sha256", "input", "status",
                     *[name for c in columns for name in (c, f"{c} rank")]])
    for r in rows:
        cells = []
        for c in columns:
            value = _finite(r.scores.get(c))
            cells += ["" if value is None else f"{value:.6f}", column_ranks[c].get(r.name, "")]
        writer.writerow([r.name, r.file, r.sha256 or "", "" if r.input is None else input_text(r.input),
                         f"failed: {r.failed}" if r.failed else "ok", *cells])
    text = buffer.getvalue()
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def _heatmap(rows: list[Row], columns: list[str], column_ranks: dict[str, dict[str, float]], correlation: list[list[float]],
             out: Path, *, title: str) -> Path | None:
    if not plots.available():
        log.info("no %s: drawing it needs matplotlib; %s", out.name, plots.INSTALL_HINT)
        return None
    scores = [[_finite(r.scores.get(c)) for c in columns] for r in rows]
    names = [f"{r.name} (failed)" if r.failed else r.name for r in rows]
    ranked = [[column_ranks[c].get(r.name) for c in columns] for r in rows]
    return plots.plot_compare(scores, ranks=ranked, rows=names, columns=columns, correlation=correlation,
                              title=f"{len(rows)} encoders on {title}", out=out)
