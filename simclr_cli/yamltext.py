"""YAML the user writes (preset files, `--set` values), read as bounded data.

`yaml.safe_load` constructs no objects, but its aliases let a few hundred characters stand for a structure of
millions of elements, which any error message that shows the value then expands. Aliases are refused (anchors
alone are harmless), a preset is at most MAX_FILE_BYTES of UTF-8 text, and `shown` cuts any echoed value short.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml

from simclr_cli.engine.errors import ConfigError

MAX_FILE_BYTES = 1_000_000  # the shipped presets are a few KB
MAX_SHOWN = 200  # characters of a value echoed in an error message


class _AliasRefused(yaml.YAMLError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that stops at the first alias (`*name`), before anything is expanded."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _AliasRefused(self.peek_event().anchor)
        return super().compose_node(parent, index)


def parse(text: str, *, source: str) -> Any:
    """`text` as plain YAML data; ConfigError naming `source` when it uses an alias or an unreadable number,
    yaml.YAMLError (for the caller to word) when it is not valid YAML."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except _AliasRefused as exc:
        raise ConfigError(f"{source}: YAML aliases (*{exc.name}) are not accepted; write the value out in full") from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply to read; a config nests a few levels") from None
    except ValueError as exc:  # an integer past Python's 4,300-digit limit for int('...')
        raise ConfigError(f"{source}: {str(exc).split(';')[0]}; write a shorter number") from None


def read(path: Path) -> Any:
    """The YAML file `path` as plain data; ConfigError when it cannot be read, is too large, is not UTF-8 or not YAML."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_FILE_BYTES:,} bytes; a preset is a short YAML file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x}); save it as UTF-8") from None
    try:
        return parse(text, source=str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({exc.__class__.__name__}); fix the syntax") from exc


class _ShortRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # never converted to text: past 4,300 digits Python refuses, below it is slow and long
            return f"<a {x.bit_length()}-bit integer>"
        return super().repr_int(x, level)


_repr = _ShortRepr()
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict, _repr.maxstring, _repr.maxother = 3, 6, 6, 6, MAX_SHOWN, MAX_SHOWN


def shown(value: Any) -> str:
    """`repr(value)` cut short (nested structures, long lists and strings elided), for one-line error messages."""
    text = _repr.repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text) - MAX_SHOWN:,} more characters)"
