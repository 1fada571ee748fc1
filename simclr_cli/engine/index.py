"""The embedding index on disk: VECS.npy (N x D float32 rows), VECS.paths.txt (row i's image, one a line, relative
to the embedded folder) and VECS.json (how the rows were made: checkpoint, layer, normalisation).

Written by `simclr embed`, read by retrieval and the embedding map.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simclr_cli.engine.errors import DataError
from simclr_cli.engine.files import atomic_write

LINE_BREAK = "the file name contains a line break, which the one-name-per-line .paths.txt cannot hold"


def paths_file_for(vectors: Path) -> Path:
    """The sidecar listing row i's image: vecs.npy -> vecs.paths.txt."""
    return Path(vectors).with_suffix(".paths.txt")


def metadata_file_for(vectors: Path) -> Path:
    """VECS.npy -> VECS.json: how the index was made (checkpoint and its SHA-256, layer, normalisation)."""
    return Path(vectors).with_suffix(".json")


def write_paths(paths_file: Path, names: Sequence[str], *, replace: bool = True) -> None:
    """One name per line; non-UTF-8 bytes round-trip through surrogateescape (see read_paths). With `replace=False`
    an existing file is kept (FileExistsError), as `files.atomic_write` says."""
    text = "".join(f"{name}\n" for name in names)
    atomic_write(paths_file, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape", newline="\n"),
                 replace=replace)


def read_paths(paths_file: Path) -> list[str]:
    """The sidecar's relative paths, non-UTF-8 names restored exactly as `write_paths` wrote them (surrogateescape)."""
    return Path(paths_file).read_text(encoding="utf-8", errors="surrogateescape").split("\n")[:-1]


def write_metadata(vectors: Path, metadata: dict[str, Any]) -> Path:
    path = metadata_file_for(vectors)
    text = json.dumps(metadata, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def read_metadata(vectors: Path) -> dict[str, Any]:
    """The index's settings, or {} for a .npy made elsewhere (then --layer and CHECKPOINT must be given)."""
    path = metadata_file_for(vectors)
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested past the recursion limit, a huge integer
        raise DataError(f"{path} is not valid JSON ({str(exc)[:100] or 'nested too deeply'}); re-run `simclr embed` or delete it") from exc
    if not isinstance(settings, dict):
        raise DataError(f"{path} is not a JSON object of settings; re-run `simclr embed` or delete it")
    for key in ("checkpoint", "checkpoint_sha256", "layer"):  # the settings retrieval uses
        if settings.get(key) is not None and not isinstance(settings[key], str):
            raise DataError(f"{path} has a '{key}' that is not text; re-run `simclr embed` or delete it")
    return settings


def open_index(vectors: Path) -> tuple[np.ndarray, list[str]]:
    """The (N, D) rows, memory-mapped (read in chunks by the neighbour search), and the N names they stand for."""
    vectors = Path(vectors).expanduser()
    if not vectors.is_file():
        raise DataError(f"index {vectors} does not exist; create it with `simclr embed DIR -o {vectors.name}`")
    paths_file = paths_file_for(vectors)
    if not paths_file.is_file():
        raise DataError(f"{paths_file} is missing: it names the index's rows; re-create the index with `simclr embed`")
    try:
        rows = np.load(vectors, mmap_mode="r", allow_pickle=False)  # (N, D)
    except ValueError as exc:
        raise DataError(f"{vectors} is not a plain .npy array ({exc}); pass a file written by `simclr embed`") from exc
    names = read_paths(paths_file)
    if len(names) != len(rows):
        raise DataError(f"{vectors} has {len(rows)} rows but {paths_file.name} lists {len(names)} paths; re-create the index")
    return rows, names


def relative_name(path: Path, folder: Path) -> str:
    """Row names as the sidecar holds them: relative to the embedded folder, with forward slashes (a listed image
    outside it keeps its absolute path)."""
    try:
        return os.fsdecode(Path(path).relative_to(folder).as_posix())
    except ValueError:
        return os.fsdecode(Path(path).as_posix())
