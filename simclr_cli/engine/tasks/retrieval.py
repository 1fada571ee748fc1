"""Nearest-image retrieval over an index written by `simclr embed`: `simclr knn --index VECS.npy --query ...`."""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path


from simclr_cli.engine.files import atomic_write, check_output_file
from simclr_cli.engine.images import ImageFiles, find_images
from simclr_cli.engine import defaults, distributed, rundir
from simclr_cli.engine.configs import RetrievalConfig
from simclr_cli.engine.device import Runtime, runtime
from simclr_cli.engine.errors import ConfigError, DataError
from simclr_cli.engine.features import Encoder, extract, open_encoder
from simclr_cli.engine.index import metadata_file_for, open_index, read_metadata
from simclr_cli.engine.neighbours import nearest

log = logging.getLogger("simclr")


@dataclass(frozen=True)
class Neighbour:
    path: str  # relative to the embedded folder, as in VECS.paths.txt
    similarity: float  # cosine


@dataclass(frozen=True)
class Match:
    query: str
    neighbours: tuple[Neighbour, ...]


def run(cfg: RetrievalConfig, *, index: Path, query: Path, checkpoint: Path | None, out: Path | None = None) -> list[Match]:
    """Each query image's `cfg.k` nearest images in `index`, embedded with the index's own encoder and layer unless
    `checkpoint`/`cfg.layer` say otherwise; written to `out` (.csv or .json) when given."""
    cfg.validate()
    if out is not None:  # before anything is embedded
        _check_matches_out(out)
    with distributed.context(device=cfg.device) as world:
        if world.world_size > 1:
            raise ConfigError("retrieval (--index/--query) runs in one process; drop --gpus")
        made_with = read_metadata(index)
        built_with = made_with.get("encoder_spec") or made_with.get("checkpoint")  # an external encoder: its spec
        path = checkpoint or (Path(built_with) if built_with else rundir.resolve_checkpoint(None))
        encoder = open_encoder(path)
        check_same_encoder(encoder, made_with, index=index)
        rt = runtime(device=cfg.device, precision=cfg.precision)
        matches = search(encoder, index=index, query=query, k=cfg.k, layer=cfg.layer or made_with.get("layer", "encoder"),
                         batch_size=cfg.batch_size, workers=defaults.resolve_workers(cfg.workers, rt.device), rt=rt)
        if out is not None:
            write_matches(matches, out)
        return matches


def check_same_encoder(encoder: Encoder, made_with: dict, *, index: Path) -> None:
    """ConfigError when `encoder` is not, byte for byte, the file the index was embedded with: queries embedded by
    other weights land in another space, and their similarities to the index mean nothing."""
    if not made_with:
        return  # a .npy made elsewhere: nothing to compare with
    recorded = made_with.get("checkpoint_sha256")
    if recorded is None:
        log.warning("%s does not record its encoder's hash (an index from an older simclr): whether %s made it cannot "
                    "be checked", metadata_file_for(index), encoder.source)
        return
    if encoder.digest == recorded:
        return
    built_with = made_with.get("checkpoint") or "another encoder"
    if str(encoder.source) == built_with:
        raise ConfigError(
            f"{built_with} has changed since {index} was embedded with it (its SHA-256 differs); re-run simclr embed "
            "to rebuild the index"
        )
    raise ConfigError(
        f"{index} was embedded with {built_with}, not {encoder.source} (their SHA-256 differ); query with the index's "
        f"encoder, or rebuild the index with simclr embed -c {encoder.source}"
    )


def search(
    encoder: Encoder, *, index: Path, query: Path, k: int, layer: str, batch_size: int, workers: int, rt: Runtime
) -> list[Match]:
    """Each query image's k most similar indexed images, most similar first."""
    vectors, names = open_index(index)  # (N, D), read in chunks by `nearest`
    settings = read_metadata(index)
    made_with = settings.get("layer")
    if made_with is not None and made_with != layer:
        raise ConfigError(f"the index holds --layer {made_with} features, not {layer}; query with --layer {made_with}")
    query = Path(query).expanduser()
    if not query.exists():
        raise DataError(f"query {query} does not exist; pass an image file or a folder of images")
    images = find_images(query) if query.is_dir() else [query]
    queries = extract(encoder, ImageFiles(images), layer=layer, batch_size=batch_size, workers=workers, rt=rt)  # (Q, D)
    similarities, rows = nearest(vectors, queries, k=k, device=rt.device, unit_rows=settings.get("normalize") is True)  # (Q, k) each
    return [
        Match(
            query=str(image),
            neighbours=tuple(Neighbour(path=names[r], similarity=float(s)) for s, r in zip(sims.tolist(), idx.tolist())),
        )
        for image, sims, idx in zip(images, similarities, rows)
    ]


def write_matches(matches: list[Match], out: Path) -> None:
    """Matches as CSV (query, rank, path, similarity) or JSON, chosen by the file's extension."""
    out = Path(out)
    _check_matches_out(out)
    if out.suffix == ".json":
        text = json.dumps([asdict(m) for m in matches], indent=2) + "\n"
    else:  # .csv
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["query", "rank", "path", "similarity"])
        for match in matches:
            for rank, n in enumerate(match.neighbours, start=1):
                writer.writerow([match.query, rank, n.path, f"{n.similarity:.6f}"])
        text = buffer.getvalue()
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))


MATCH_FORMATS = (".csv", ".json")


def _check_matches_out(out: Path) -> None:
    """ConfigError unless `out` is a .csv or .json file simclr can write (an existing one is replaced)."""
    if Path(out).suffix not in MATCH_FORMATS:
        raise ConfigError(f"--out {out} must end with .csv or .json for retrieval results")
    check_output_file(out, overwrite=True)
