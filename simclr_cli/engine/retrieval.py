"""Nearest-image retrieval over an index written by `simclr embed`: `simclr knn --index VECS.npy --query ...`."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simclr_cli.engine.checkpoint import atomic_write
from simclr_cli.engine.data import ImageFiles, find_images
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.embed import EmbedResult, paths_file_for, read_paths
from simclr_cli.engine.errors import ConfigError, DataError
from simclr_cli.engine.features import Encoder, extract
from simclr_cli.engine.knn import nearest


@dataclass(frozen=True)
class Neighbour:
    path: str  # relative to the embedded folder, as in VECS.paths.txt
    similarity: float  # cosine


@dataclass(frozen=True)
class Match:
    query: str
    neighbours: tuple[Neighbour, ...]


def metadata_file_for(index: Path) -> Path:
    """VECS.npy -> VECS.json: how the index was made (checkpoint, layer, normalisation)."""
    return Path(index).with_suffix(".json")


def write_index_metadata(result: EmbedResult) -> Path:
    path = metadata_file_for(result.out)
    text = json.dumps(result.to_dict(), indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def index_metadata(index: Path) -> dict[str, Any]:
    """The index's settings, or {} for a .npy made elsewhere (then --layer and CHECKPOINT must be given)."""
    path = metadata_file_for(index)
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested past the recursion limit, a huge integer
        raise DataError(f"{path} is not valid JSON ({str(exc)[:100] or 'nested too deeply'}); re-run `simclr embed` or delete it") from exc
    if not isinstance(settings, dict):
        raise DataError(f"{path} is not a JSON object of settings; re-run `simclr embed` or delete it")
    for key in ("checkpoint", "layer"):  # the two settings retrieval uses
        if settings.get(key) is not None and not isinstance(settings[key], str):
            raise DataError(f"{path} has a '{key}' that is not text; re-run `simclr embed` or delete it")
    return settings


def search(
    encoder: Encoder, *, index: Path, query: Path, k: int, layer: str, batch_size: int, workers: int, rt: Runtime
) -> list[Match]:
    """Each query image's k most similar indexed images, most similar first."""
    index = Path(index).expanduser()
    if not index.is_file():
        raise DataError(f"index {index} does not exist; create it with `simclr embed DIR -o {index.name}`")
    paths_file = paths_file_for(index)
    if not paths_file.is_file():
        raise DataError(f"{paths_file} is missing: it names the index's rows; re-create the index with `simclr embed`")
    made_with = index_metadata(index).get("layer")
    if made_with is not None and made_with != layer:
        raise ConfigError(f"the index holds --layer {made_with} features, not {layer}; query with --layer {made_with}")
    try:
        vectors = np.load(index, mmap_mode="r", allow_pickle=False)  # (N, D), read in chunks by `nearest`
    except ValueError as exc:
        raise DataError(f"{index} is not a plain .npy array ({exc}); pass a file written by `simclr embed`") from exc
    names = read_paths(paths_file)
    if len(names) != len(vectors):
        raise DataError(f"{index} has {len(vectors)} rows but {paths_file.name} lists {len(names)} paths; re-create the index")
    query = Path(query).expanduser()
    if not query.exists():
        raise DataError(f"query {query} does not exist; pass an image file or a folder of images")
    images = find_images(query) if query.is_dir() else [query]
    queries = extract(encoder, ImageFiles(images), layer=layer, batch_size=batch_size, workers=workers, rt=rt)  # (Q, D)
    similarities, rows = nearest(vectors, queries, k=k, device=rt.device)  # (Q, k) each
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
    if out.suffix == ".json":
        text = json.dumps([asdict(m) for m in matches], indent=2) + "\n"
    elif out.suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["query", "rank", "path", "similarity"])
        for match in matches:
            for rank, n in enumerate(match.neighbours, start=1):
                writer.writerow([match.query, rank, n.path, f"{n.similarity:.6f}"])
        text = buffer.getvalue()
    else:
        raise ConfigError(f"--out {out} must end with .csv or .json for retrieval results")
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))
