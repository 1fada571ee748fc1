"""`simclr cka`: linear CKA (engine/cka) between every stage of encoder A and every stage of encoder B.

The stages are the ResNet's stem (after the max-pool), layer1, layer2, layer3 and h. Each stage output (B, C, H, W)
is reduced by global average pooling to (B, C) before CKA: the common choice, and the one that keeps every
cross-product at most (C, C) whatever the image size (flattening a layer1 map of a 224 px image would give 200,704
features per image). layer4 pooled this way IS h (ResNet.forward), so it appears once, as h. Both encoders see
the same images in the same order, each through its own file's eval transform; the images are the held-out split of
--data (at most cka.max_images of them, a seed-drawn subset beyond that).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from simclr_cli.engine import cka, defaults, distributed, external, plots, rundir
from simclr_cli.engine.configs import CkaConfig
from simclr_cli.engine.device import Runtime, runtime
from simclr_cli.engine.errors import DataError
from simclr_cli.engine.evaluation import splits_for
from simclr_cli.engine.features import Encoder, RowShard, iter_features, open_encoder, weights_of
from simclr_cli.engine.files import check_output_folder
from simclr_cli.engine.report import Progress
from simclr_cli.engine.results import write_json

log = logging.getLogger("simclr")

STAGES = ("stem", "layer1", "layer2", "layer3", "h")
POOLING = "global average pooling of each stage's output (layer4 pooled is h)"
CKA_FILE = "cka.json"
HEATMAP_FILE = "cka.png"


@dataclass(frozen=True)
class CkaResult:
    matrix: list[list[float]]  # [i][j]: A's stage i against B's stage j; NaN for a stage without variance
    a: dict[str, Any]  # what names encoder A in cka.json
    b: dict[str, Any]
    data: str
    images: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": "linear CKA (Kornblith et al. 2019), centred features, float64",
            "pooling": POOLING,
            "stages": list(STAGES),
            "matrix": [[None if math.isnan(v) else v for v in row] for row in self.matrix],  # rows: A, columns: B
            "a": self.a,
            "b": self.b,
            "data": self.data,
            "split": "held-out (val or test)",
            "images": self.images,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class Compared:
    """What `simclr cka` shows: the result, and the files written."""

    result: CkaResult
    results_file: Path
    heatmap: Path | None  # None without matplotlib


def run(cfg: CkaConfig, *, a: Path | None, b: Path | None, out: Path | None = None,
        progress: Progress | None = None) -> Compared | None:
    """CKA of encoder `a` (default runs/latest's) against `b` (default: `a` itself, or with cfg.random_init its
    untrained twin) on the held-out images of cfg.data; writes cka.json and cka.png in `out` (default: beside A).
    Inside the process group every rank encodes its share of the images; rank 0 computes, writes and returns what
    to show, the others None."""
    cfg.validate()
    with distributed.context(device=cfg.device) as world:
        path_a = rundir.resolve_checkpoint(a)
        path_b = path_a if b is None else rundir.encoder_file(b)
        folder = out or rundir.default_eval_dir(external.file_of(path_a), "cka")
        check_output_folder(folder)  # now, not after the extraction
        # B's twin draws from the seed the other commands use; A's from the next, so two twins of one file differ.
        encoder_a = open_encoder(path_a, random_init=cfg.random_init_a, seed=cfg.seed + 1)
        encoder_b = open_encoder(path_b, random_init=cfg.random_init, seed=cfg.seed)
        splits = splits_for(cfg, encoder_a)  # by default A's pretraining data
        images = _subset(splits.val, limit=cfg.max_images, seed=cfg.seed)
        rt = runtime(device=cfg.device, precision=cfg.precision)
        cfg = replace(cfg, workers=defaults.resolve_workers(cfg.workers, rt.device))
        started = time.perf_counter()
        common = dict(batch_size=cfg.batch_size, workers=cfg.workers, rt=rt, progress=progress)
        features_a = stage_features(encoder_a, images, description="CKA: A's stages", **common)
        features_b = stage_features(encoder_b, images, description="CKA: B's stages", **common)
        if not world.is_main:
            return None
        matrix = cka.cka_matrix(features_a, features_b, chunk_rows=cfg.chunk_rows)  # (stages, stages)
        result = CkaResult(matrix=matrix.tolist(), a=_described(encoder_a, path_a, features_a),
                           b=_described(encoder_b, path_b, features_b), data=splits.name, images=len(images),
                           seconds=time.perf_counter() - started)
        results_file = write_json(folder / CKA_FILE, result.to_dict())
        return Compared(result=result, results_file=results_file, heatmap=_heatmap(result, folder / HEATMAP_FILE))


def stage_features(encoder: Encoder, images: Dataset, *, batch_size: int, workers: int, rt: Runtime,
                   progress: Progress | None = None, description: str = "stages") -> dict[str, Tensor]:
    """Each of STAGES as an (N, C) float32 CPU tensor, row i = image i: one pass, the inner stages read by forward hooks
    on the shared feature extractor's forward and pooled there, so no full feature map outlives its batch. Under a
    process group each rank encodes its shard and the rows are gathered as in `features.extract`."""
    resnet = encoder.model.encoder
    hooked = {"stem": resnet.maxpool, "layer1": resnet.layer1, "layer2": resnet.layer2, "layer3": resnet.layer3}
    pooled: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, output: Tensor) -> None:
            pooled[name] = output.float().mean(dim=(2, 3)).to("cpu", copy=True)  # (B, C, H, W) -> (B, C)
        return hook

    dims = {**resnet.stage_dims, "h": resnet.out_dim}
    out = {name: RowShard(len(images), dims[name], batch_size=batch_size) for name in STAGES}  # (N, C) each, once gathered
    handles = [module.register_forward_hook(keep(name)) for name, module in hooked.items()]
    try:
        for start, h in iter_features(encoder, images, layer="encoder", batch_size=batch_size, workers=workers, rt=rt,
                                      progress=progress, description=description):
            for name, chunk in {**pooled, "h": h}.items():
                out[name].put(start, chunk)
    finally:
        for handle in handles:
            handle.remove()
    return {name: out[name].gathered() for name in STAGES}


def _subset(images: Dataset, *, limit: int, seed: int) -> Dataset:
    """All of `images`, or `limit` of them drawn with `seed` (kept in dataset order)."""
    if len(images) < 2:
        raise DataError(f"CKA needs at least 2 held-out images; the data has {len(images)}")
    if len(images) <= limit:
        return images
    drawn = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit]
    log.info("CKA on %d of the %d held-out images (cka.max_images; drawn with seed %d)", limit, len(images), seed)
    return Subset(images, sorted(drawn.tolist()))


def _described(encoder: Encoder, path: Path, features: dict[str, Tensor]) -> dict[str, Any]:
    """An encoder as cka.json names it: the file, its hash, the weights measured and the input it was given."""
    return {"file": str(external.file_of(path).resolve()), "encoder_spec": encoder.spec,
            "checkpoint": None if encoder.source is None else str(encoder.source),
            "checkpoint_sha256": encoder.digest, "random_init": encoder.source is None, "weights": weights_of(encoder),
            "image_size": encoder.info.image_size, "mean": list(encoder.info.mean), "std": list(encoder.info.std),
            "feature_dims": {name: int(x.shape[1]) for name, x in features.items()}}


def _heatmap(result: CkaResult, out: Path) -> Path | None:
    if not plots.available():
        log.info("no %s: drawing it needs matplotlib; %s", out.name, plots.INSTALL_HINT)
        return None
    return plots.plot_cka(result.matrix, rows=STAGES, columns=STAGES, row_title=f"A: {_name(result.a)}",
                          column_title=f"B: {_name(result.b)}", title=f"linear CKA on {result.images} images of {result.data}",
                          out=out)


def _name(described: dict[str, Any]) -> str:
    """The encoder's folder and file name: `encoder.safetensors` alone would not tell two runs apart."""
    file = Path(described["file"])
    name = f"{file.parent.name}/{file.name}"
    return f"{name} (random init)" if described["random_init"] else name
