"""engine/index.py: the embedding index on disk, as embed writes it and retrieval reads it."""

from __future__ import annotations

import os

import numpy as np
import pytest

from simclr_cli.engine import index
from simclr_cli.engine.errors import DataError


def test_paths_round_trip_names_that_are_not_utf8(tmp_path):
    odd = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name: a surrogate escape once decoded
    sidecar = index.paths_file_for(tmp_path / "v.npy")
    assert sidecar == tmp_path / "v.paths.txt"
    index.write_paths(sidecar, ["a/1.png", odd])
    assert index.read_paths(sidecar) == ["a/1.png", odd]


def test_an_index_opens_with_its_names_and_is_refused_when_they_disagree(tmp_path):
    vectors = tmp_path / "v.npy"
    np.save(vectors, np.ones((2, 3), dtype=np.float32))
    with pytest.raises(DataError, match="v.paths.txt is missing"):
        index.open_index(vectors)
    index.write_paths(index.paths_file_for(vectors), ["a.png", "b.png"])
    rows, names = index.open_index(vectors)
    assert rows.shape == (2, 3) and names == ["a.png", "b.png"]
    index.write_paths(index.paths_file_for(vectors), ["a.png"])
    with pytest.raises(DataError, match="has 2 rows but v.paths.txt lists 1 paths"):
        index.open_index(vectors)
    with pytest.raises(DataError, match="does not exist; create it with `simclr embed"):
        index.open_index(tmp_path / "missing.npy")


def test_metadata_is_optional_and_must_be_json(tmp_path):
    vectors = tmp_path / "v.npy"
    assert index.read_metadata(vectors) == {}  # a .npy made elsewhere
    index.write_metadata(vectors, {"layer": "encoder"})
    assert index.read_metadata(vectors) == {"layer": "encoder"}
    (tmp_path / "v.json").write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        index.read_metadata(vectors)
