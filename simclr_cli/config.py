"""Every command's typed config (engine/configs.py) resolved from defaults, a preset, --set and flags.

Precedence is stated once, here: built-in dataclass defaults < preset YAML < --set < explicit flags. A preset's
top-level keys are the pretraining sections (data:, model:, ...) and one section per other command (knn:,
linear_eval:, ...); each command reads its own. Unknown keys and wrongly typed values are errors naming the key
and the fix. The "auto" values that follow the data's name come from engine/defaults.py, merged under the preset.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml

from simclr_cli import yamltext
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.plain import to_plain

T = TypeVar("T")

PRESET_SUFFIX = ".yaml"


def preset_dirs() -> list[Path]:
    """Where named presets live: inside the installed package, else the source checkout's `presets/`."""
    packaged = Path(str(resources.files("simclr_cli"))) / "presets"
    checkout = Path(__file__).resolve().parent.parent / "presets"
    return [d for d in (packaged, checkout) if d.is_dir()]


def preset_names() -> list[str]:
    return sorted({p.stem for d in preset_dirs() for p in d.glob(f"*{PRESET_SUFFIX}")})


def preset_path(name_or_file: str) -> Path:
    """A preset given by name (`cifar10`) or as a path to a YAML file."""
    candidate = Path(name_or_file).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise ConfigError(f"preset file {candidate} does not exist; pass a YAML file or one of: {', '.join(preset_names())}")
        return candidate
    for directory in preset_dirs():  # a folder named like a preset (./demo/) does not hide the preset
        path = directory / f"{name_or_file}{PRESET_SUFFIX}"
        if path.is_file():
            return path
    if candidate.is_dir():
        raise ConfigError(f"preset {candidate} is a folder; pass a YAML file or one of: {', '.join(preset_names())}")
    raise ConfigError(f"unknown preset '{name_or_file}'; choose one of: {', '.join(preset_names())}, or pass a YAML file")


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping, read as bounded data (no object construction, no aliases: see yamltext)."""
    data = yamltext.read(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model:, augment:, ...), not a {type(data).__name__}")
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: values of `override` win; nested mappings merge key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def nest(dotted: dict[str, Any], *, drop_none: bool = True) -> dict[str, Any]:
    """{'model.arch': 'resnet18'} -> {'model': {'arch': 'resnet18'}}; None values (flags not given) are dropped
    unless `drop_none` is False (an explicit `--set key=null`)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        if value is None and drop_none:
            continue
        node = out
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                parent = ".".join(parents[: depth + 1])
                raise ConfigError(f"'{key}' cannot be set: '{parent}' is already set to a value, not a section")
        node[leaf] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build dataclass `cls` from plain data, checking keys and types; missing keys keep their defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or cls.__name__}' must be a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys{' in ' + where if where else ''}: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where=key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[int, ...]: one or more
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(args[0], v, key) for v in value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"'{key}' must be a list of {len(args)} numbers, got {_describe(value)}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {_describe(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be a whole number, got {_describe(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > 1e300:  # float() would overflow
                raise ConfigError(f"'{key}' must be a number, got {_describe(value)}, too large for a float")
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-6` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be a number, got {_describe(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{key}' must be text, got {_describe(value)}")
    raise TypeError(f"config field '{key}' has an unsupported type {hint!r}")  # a bug, not user input


def _describe(value: Any) -> str:
    return f"{yamltext.shown(value)} ({type(value).__name__})"


DEMO_PRESET = "demo"


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`--set key.path=value` items (values read as YAML) as one nested mapping."""
    dotted = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {yamltext.shown(item)} is not KEY=VALUE; write e.g. --set augment.crop_scale=[0.2,1.0]")
        if not text.strip():  # YAML reads nothing as null, which would quietly mean "automatic"
            raise ConfigError(f"--set {yamltext.shown(item)} has no value; write {key.strip()}=VALUE "
                              "(null restores a value that is automatic by default)")
        try:
            dotted[key.strip()] = yamltext.parse(text, source=f"--set {yamltext.shown(item)}")
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {yamltext.shown(item)}: the value is not valid YAML ({exc.__class__.__name__})") from exc
    return nest(dotted, drop_none=False)  # `--set model.stem=null` restores an auto default


def resolve_pretrain(
    *, data: str | None, preset: str | None, sets: list[str] | None, flags: dict[str, Any], saved: dict[str, Any] | None = None
):
    """The pretraining config: defaults (sized for the data) < preset < --set < flags.

    `saved` (a resumed run's own config) replaces defaults and preset, so a resume changes only what is typed.
    """
    from simclr_cli.engine import defaults
    from simclr_cli.engine.configs import PretrainConfig  # lazy: keeps `simclr --help` free of torch

    if saved is not None:
        if preset is not None:
            raise ConfigError("--preset cannot be combined with --resume: a resumed run keeps its own config")
        base = saved
    else:
        base = merge(to_plain(PretrainConfig()), defaults.for_data(data))
        if preset is None and data is None:
            preset = DEMO_PRESET
        if preset is not None:
            base = merge(base, _pretraining_sections(load_yaml(preset_path(preset))))
    merged = merge(merge(base, parse_sets(sets)), nest(flags))
    if data is not None:
        merged = merge(merged, {"data": {"source": data}})
    return from_dict(PretrainConfig, merged)


def pretrain_config(*, data: str | None, preset: str | None, sets: list[str] | None, flags: dict[str, Any],
                    resume_from: Path | None = None):
    """The run's config: the one a --gpus parent resolved, or defaults < preset < --set < flags (a resumed
    run's own config replacing defaults and preset)."""
    from simclr_cli import launcher
    from simclr_cli.engine.configs import PretrainConfig
    from simclr_cli.engine.rundir import RunDir

    resolved_file = launcher.resolved_config_file()
    if resolved_file is not None:  # a worker started by --gpus
        return from_dict(PretrainConfig, load_yaml(resolved_file))
    saved = None
    if resume_from is not None:
        saved_file = RunDir(resume_from).config
        if not saved_file.is_file():
            raise ConfigError(f"{resume_from} has no config.yaml, so it is not a run folder to resume; check --out")
        saved = load_yaml(saved_file)
    return resolve_pretrain(data=data, preset=preset, sets=sets, flags=flags, saved=saved)


def resumed_run_folder(out: Path | None) -> Path:
    """The run folder --resume continues: --out, or runs/latest."""
    from simclr_cli.engine import rundir

    return (out or rundir.RUNS / rundir.LATEST).resolve()


def resolve_task(section: str, *, preset: str | None, sets: list[str] | None, flags: dict[str, Any]):
    """An evaluation or inference command's config (configs.TASK_CONFIGS[section]), validated: defaults < the preset's
    `<section>:` mapping < `--set <section>.KEY=VALUE` < flags (keyed without the section)."""
    from simclr_cli.engine.configs import TASK_CONFIGS, PretrainConfig  # lazy: keeps `simclr --help` free of torch

    cls = TASK_CONFIGS[section]
    base = to_plain(cls())
    if preset is not None:
        recipe = load_yaml(preset_path(preset))
        known = {f.name for f in dataclasses.fields(PretrainConfig)} | set(TASK_CONFIGS)
        unknown = sorted(set(recipe) - known)
        if unknown:  # a typo is an error for every command, not only for the one that reads that section
            raise ConfigError(f"unknown config key '{unknown[0]}'; valid keys: {', '.join(sorted(known))}")
        base = merge(base, _mapping(recipe.get(section), section))
    overrides = parse_sets(sets)
    other = sorted(set(overrides) - {section})
    if other:
        raise ConfigError(f"unknown config key '{other[0]}'; this command's keys are {section}.* (e.g. --set {section}.batch_size=128)")
    merged = merge(merge(base, _mapping(overrides.get(section), section)), nest(flags))
    cfg = from_dict(cls, merged, where=section)
    cfg.validate()
    return cfg


def _mapping(value: Any, section: str) -> dict[str, Any]:
    """A command's section of a preset or of --set: a mapping of its keys (absent: none)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"'{section}' must be a mapping of its keys (e.g. {section}: {{batch_size: 128}}), got {_describe(value)}")
    return value


def _pretraining_sections(recipe: dict[str, Any]) -> dict[str, Any]:
    """A preset without the sections other commands read (knn:, linear_eval:, ...); those commands check them."""
    from simclr_cli.engine.configs import TASK_CONFIGS

    return {key: value for key, value in recipe.items() if key not in TASK_CONFIGS}


def typed(cls: type[T], flags: dict[str, Any], *, where: str) -> T:
    """A command's config from its flags alone (no preset, no --set: `export` has nothing to tune), validated."""
    cfg = from_dict(cls, nest(flags), where=where)
    cfg.validate()
    return cfg
