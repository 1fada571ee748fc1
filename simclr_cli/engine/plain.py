"""The plain form of a config (mappings, lists, numbers, text), as config.yaml, checkpoints and results.json hold it."""

from __future__ import annotations

import dataclasses
from typing import Any


def to_plain(obj: Any) -> Any:
    """Plain, YAML/JSON-ready data from a (nested) config dataclass; tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'arch': 'resnet18'}} -> {'model.arch': 'resnet18'}: the keys --set and --resume speak of."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed(tree: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The flattened keys of `tree` whose values differ from `base`'s, in `tree`'s order."""
    was = flatten(base)
    return {key: value for key, value in flatten(tree).items() if key not in was or was[key] != value}
