"""`results.json`: what an evaluation measured, with the settings, checkpoint and data that produced it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from simclr_cli.engine.files import atomic_write

RESULTS_FILE = "results.json"


def write_results(out_dir: Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as `out_dir/results.json` atomically; paths become strings."""
    return write_json(Path(out_dir) / RESULTS_FILE, payload)


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as indented JSON to `path` atomically; paths become strings."""
    text = json.dumps(payload, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path
