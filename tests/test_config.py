"""Config resolution: presets, YAML, typed from/to dict, --set, and the stated precedence."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from simclr_cli.config import from_dict, load_yaml, merge, nest, parse_sets, preset_names, preset_path, resolve_pretrain, resolve_task
from simclr_cli.engine.plain import to_plain
from simclr_cli.engine.augment import AugmentConfig
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.model import ModelConfig
from simclr_cli.engine.optim import OptimConfig
from simclr_cli.engine import defaults
from simclr_cli.engine.configs import TASK_CONFIGS, PretrainConfig

PRESETS = Path(__file__).resolve().parent.parent / "presets"
SHIPPED = ["cifar10", "demo", "imagenet", "moco-v1", "moco-v2", "pirl", "simclrv2", "stl10", "swav"]


# --- presets ---------------------------------------------------------------------------------------


def test_preset_names_are_the_yaml_files_of_presets_folder():
    assert preset_names() == sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert preset_names() == SHIPPED


def test_preset_path_by_name_finds_the_shipped_file():
    assert preset_path("demo").resolve() == (PRESETS / "demo.yaml").resolve()


def test_preset_path_accepts_a_yaml_file(tmp_path):
    mine = tmp_path / "mine.yml"
    mine.write_text("train: {epochs: 3}\n")
    assert preset_path(str(mine)) == mine


def test_unknown_preset_name_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        preset_path("cifar11")
    assert str(err.value) == "unknown preset 'cifar11'; choose one of: cifar10, demo, imagenet, moco-v1, moco-v2, pirl, simclrv2, stl10, swav, or pass a YAML file"


def test_missing_preset_file_is_an_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        preset_path(str(missing))
    assert str(err.value) == f"preset file {missing} does not exist; pass a YAML file or one of: cifar10, demo, imagenet, moco-v1, moco-v2, pirl, simclrv2, stl10, swav"


def test_a_folder_given_as_preset_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^preset .* is a folder; pass a YAML file or one of: cifar10, demo"):
        preset_path(str(tmp_path))


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    """`simclr pretrain` (the demo preset) run where a `demo/` folder is, e.g. from the README's runs."""
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert preset_path("demo").resolve() == (PRESETS / "demo.yaml").resolve()


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_preset_is_a_valid_runnable_recipe(name):
    path = preset_path(name)
    assert path.read_text(encoding="utf-8").startswith("# "), "a preset starts with a comment saying what it reproduces"
    recipe = load_yaml(path)
    cfg = from_dict(PretrainConfig, {k: v for k, v in recipe.items() if k not in TASK_CONFIGS})
    defaults.resolve_sizes(cfg)  # validates every section
    for section in set(recipe) & set(TASK_CONFIGS):  # and the other commands' sections, as they read them
        resolve_task(section, preset=name, sets=None, flags={})


# --- load_yaml -------------------------------------------------------------------------------------


def test_load_yaml_reads_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  arch: resnet18\noptim: {lr: 0.5}\n")
    assert load_yaml(path) == {"model": {"arch": "resnet18"}, "optim": {"lr": 0.5}}


def test_load_yaml_empty_file_is_an_empty_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing but a comment\n")
    assert load_yaml(path) == {}


def test_load_yaml_invalid_syntax(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [resnet18\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value) == f"{path} is not valid YAML (ParserError); fix the syntax"


def test_load_yaml_non_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value) == f"{path} must hold a mapping of sections (model:, augment:, ...), not a list"


def test_load_yaml_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value) == f"cannot read {path}: No such file or directory"


def test_load_yaml_never_constructs_python_objects(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.yaml"
    path.write_text(f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_yaml(path)
    assert not marker.exists()


# --- merge / nest ----------------------------------------------------------------------------------


def test_merge_is_deep_and_override_wins_without_mutating_inputs():
    base = {"model": {"arch": "resnet50", "width": 1.0}, "train": {"epochs": 100}}
    override = {"model": {"arch": "resnet18"}, "optim": {"lr": 0.1}}
    merged = merge(base, override)
    assert merged == {"model": {"arch": "resnet18", "width": 1.0}, "train": {"epochs": 100}, "optim": {"lr": 0.1}}
    assert base == {"model": {"arch": "resnet50", "width": 1.0}, "train": {"epochs": 100}}
    assert override == {"model": {"arch": "resnet18"}, "optim": {"lr": 0.1}}


def test_merge_a_scalar_replaces_a_mapping():
    assert merge({"a": {"b": 1}}, {"a": 3}) == {"a": 3}


def test_nest_builds_sections_and_drops_flags_not_given():
    assert nest({"model.arch": "resnet18", "model.width": None, "train.epochs": 3, "x.y.z": 1}) == {
        "model": {"arch": "resnet18"},
        "train": {"epochs": 3},
        "x": {"y": {"z": 1}},
    }


def test_nest_keeps_none_when_asked():
    assert nest({"model.stem": None}, drop_none=False) == {"model": {"stem": None}}


# --- from_dict / to_dict ---------------------------------------------------------------------------


def test_from_dict_keeps_defaults_for_missing_keys():
    assert from_dict(ModelConfig, {"arch": "resnet18"}) == ModelConfig(arch="resnet18")


def test_unknown_top_level_key_names_it():
    with pytest.raises(ConfigError) as err:
        from_dict(ModelConfig, {"arch": "resnet18", "depth": 3})
    assert str(err.value) == "unknown config key 'depth'; valid keys: arch, width, stem, head_layers, proj_dim, zero_init_residual, head_output_bn, sk_ratio"


def test_unknown_nested_key_names_the_dotted_key():
    with pytest.raises(ConfigError) as err:
        from_dict(PretrainConfig, {"optim": {"learning_rate": 0.1}})
    assert str(err.value) == (
        "unknown config key 'optim.learning_rate'; valid keys in optim: "
        "name, lr, lr_scaling, momentum, weight_decay, warmup_epochs, trust_coefficient"
    )


def test_unknown_section_names_it():
    with pytest.raises(ConfigError, match=r"^unknown config key 'trian'; valid keys: data, model, augment, optim, train, monitor, moco, swav, pirl$"):
        from_dict(PretrainConfig, {"trian": {"epochs": 1}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"epochs": 2.5}}, "'train.epochs' must be a whole number, got 2.5 (float)"),
        ({"train": {"epochs": "10"}}, "'train.epochs' must be a whole number, got '10' (str)"),
        ({"train": {"epochs": True}}, "'train.epochs' must be a whole number, got True (bool)"),
        ({"train": {"max_steps": "x"}}, "'train.max_steps' must be a whole number, got 'x' (str)"),
        ({"optim": {"lr": "fast"}}, "'optim.lr' must be a number, got 'fast' (str)"),
        ({"optim": {"lr": False}}, "'optim.lr' must be a number, got False (bool)"),
        ({"data": {"download": "yes please"}}, "'data.download' must be true or false, got 'yes please' (str)"),
        ({"data": {"download": 1}}, "'data.download' must be true or false, got 1 (int)"),
        ({"model": {"arch": 18}}, "'model.arch' must be text, got 18 (int)"),
        ({"model": {"stem": 3}}, "'model.stem' must be text, got 3 (int)"),
        ({"augment": {"crop_scale": 0.5}}, "'augment.crop_scale' must be a list of 2 numbers, got 0.5 (float)"),
        ({"augment": {"crop_scale": [0.1, 0.5, 1.0]}}, "'augment.crop_scale' must be a list of 2 numbers, got [0.1, 0.5, 1.0] (list)"),
        ({"augment": {"mean": [0.5, "x", 0.5]}}, "'augment.mean' must be a number, got 'x' (str)"),
        ({"model": None}, "'model' must be a mapping, got None (NoneType)"),
        ({"model": "resnet18"}, "'model' must be a mapping, got 'resnet18' (str)"),
    ],
)
def test_from_dict_type_errors_name_the_key_and_value(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(PretrainConfig, data)
    assert str(err.value) == message


def test_from_dict_coerces_values():
    cfg = from_dict(
        PretrainConfig,
        {
            "optim": {"lr": 1, "weight_decay": "1e-6"},  # an int for a float; PyYAML reads 1e-6 as a string
            "augment": {"crop_scale": [0.2, 1], "blur_p": None, "color_strength": 0.5},
            "model": {"stem": None, "width": 0.25},
            "train": {"max_steps": 7},
        },
    )
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.optim.weight_decay == 1e-6 and type(cfg.optim.weight_decay) is float
    assert cfg.augment.crop_scale == (0.2, 1.0) and type(cfg.augment.crop_scale) is tuple
    assert all(type(v) is float for v in cfg.augment.crop_scale)
    assert cfg.augment.blur_p is None and cfg.augment.color_strength == 0.5
    assert cfg.model.stem is None and cfg.model.width == 0.25
    assert cfg.train.max_steps == 7


def test_yaml_exponent_without_dot_is_read_as_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: 1e-6\n")
    assert load_yaml(path) == {"optim": {"weight_decay": "1e-6"}}  # YAML 1.1 quirk this coercion exists for
    assert from_dict(PretrainConfig, load_yaml(path)).optim.weight_decay == 1e-6


def test_from_dict_rejects_unsupported_field_types_as_a_bug():
    @dataclass
    class Odd:
        items: list = field(default_factory=list)

    with pytest.raises(TypeError, match="config field 'items' has an unsupported type"):
        from_dict(Odd, {"items": [1]})


def test_to_dict_is_plain_data_and_round_trips():
    cfg = PretrainConfig(
        model=ModelConfig(arch="resnet18", width=0.25, stem="small"),
        augment=AugmentConfig(image_size=16, crop_scale=(0.3, 1.0), blur_p=0.0),
        optim=OptimConfig(name="adamw", lr=0.01),
    )
    plain = to_plain(cfg)
    assert plain["augment"]["crop_scale"] == [0.3, 1.0]
    assert plain["augment"]["mean"] == [0.485, 0.456, 0.406]
    assert plain["model"] == {"arch": "resnet18", "width": 0.25, "stem": "small", "head_layers": 2, "proj_dim": 128,
                              "zero_init_residual": False, "head_output_bn": None, "sk_ratio": 0.0}
    assert plain["data"] == {"source": None, "root": None, "download": False, "workers": None, "on_bad_image": "skip",
                             "decode_side": None, "cache_gb": None, "decode_device": "auto", "max_bad_fraction": 0.5,
                             "max_image_pixels": 178956970, "file_list": None, "subset": None, "unbalanced": None}
    assert from_dict(PretrainConfig, plain) == cfg


# --- --set ----------------------------------------------------------------------------------------


def test_parse_sets_reads_values_as_yaml():
    assert parse_sets(
        ["augment.crop_scale=[0.2, 1.0]", "train.epochs=5", "model.arch = resnet18", "data.download=true", "optim.lr=0.5"]
    ) == {
        "augment": {"crop_scale": [0.2, 1.0]},
        "train": {"epochs": 5},
        "model": {"arch": "resnet18"},
        "data": {"download": True},
        "optim": {"lr": 0.5},
    }


def test_parse_sets_none_and_empty():
    assert parse_sets(None) == {}
    assert parse_sets([]) == {}


def test_parse_sets_value_may_contain_equals_sign():
    assert parse_sets(["data.source=/x/a=b"]) == {"data": {"source": "/x/a=b"}}


def test_parse_sets_last_one_wins():
    assert parse_sets(["train.epochs=5", "train.epochs=6"]) == {"train": {"epochs": 6}}


def test_parse_sets_explicit_null_is_kept():
    # `--set model.stem=null` must reach the config (back to the size-aware auto), not vanish like an absent flag
    assert parse_sets(["model.stem=null", "train.max_steps=~"]) == {"model": {"stem": None}, "train": {"max_steps": None}}


@pytest.mark.parametrize("item", ["train.epochs", "=5", " =5"])
def test_parse_sets_rejects_items_that_are_not_key_value(item):
    with pytest.raises(ConfigError) as err:
        parse_sets([item])
    assert str(err.value) == f"--set {item!r} is not KEY=VALUE; write e.g. --set augment.crop_scale=[0.2,1.0]"


def test_parse_sets_rejects_invalid_yaml_values():
    with pytest.raises(ConfigError) as err:
        parse_sets(["augment.crop_scale=[0.2,"])
    assert str(err.value) == "--set 'augment.crop_scale=[0.2,': the value is not valid YAML (ParserError)"


def test_parse_sets_section_and_key_conflict_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        parse_sets(["model=resnet18", "model.arch=resnet18"])
    assert str(err.value) == "'model.arch' cannot be set: 'model' is already set to a value, not a section"


# --- resolve_pretrain: precedence -----------------------------------------------------------------

NO_FLAGS: dict = {}


def test_no_data_and_no_preset_is_the_demo_preset():
    cfg = resolve_pretrain(data=None, preset=None, sets=None, flags=NO_FLAGS)
    assert cfg == from_dict(PretrainConfig, merge(to_plain(PretrainConfig()), load_yaml(PRESETS / "demo.yaml")))
    assert cfg.data.source == "digits"
    assert (cfg.model.arch, cfg.model.width, cfg.augment.image_size, cfg.train.epochs) == ("resnet18", 0.5, 16, 15)
    assert cfg.optim.weight_decay == 1e-6


@pytest.mark.parametrize(("data", "size"), [("cifar10", 32), ("cifar100", 32), ("stl10", 96), ("digits", 32), ("/some/folder", 224)])
def test_data_without_preset_uses_defaults_sized_for_the_data(data, size):
    cfg = resolve_pretrain(data=data, preset=None, sets=None, flags=NO_FLAGS)
    assert cfg.augment.image_size == size
    assert cfg.data.source == data
    # no demo preset: everything else is the dataclass defaults
    assert cfg.model == ModelConfig() and cfg.optim == OptimConfig()
    assert cfg.train.epochs == PretrainConfig().train.epochs


def test_preset_beats_the_data_implied_image_size():
    cfg = resolve_pretrain(data="stl10", preset="demo", sets=None, flags=NO_FLAGS)
    assert cfg.augment.image_size == 16
    assert cfg.data.source == "stl10"  # the positional DATA beats the preset's data.source


def test_precedence_defaults_preset_set_flags(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: {arch: resnet34, width: 0.5}\ntrain: {epochs: 3, batch_size: 64}\noptim: {lr: 0.7}\n")
    cfg = resolve_pretrain(
        data="cifar10",
        preset=str(preset),
        sets=["train.epochs=4", "model.width=0.25", "optim.momentum=0.8"],
        flags={"model.width": 2.0, "train.batch_size": None, "optim.lr": None, "train.seed": 9},
    )
    assert cfg.model.arch == "resnet34"  # preset over default
    assert cfg.train.epochs == 4  # --set over preset
    assert cfg.model.width == 2.0  # flag over --set
    assert cfg.train.batch_size == 64  # a flag not given (None) does not override
    assert cfg.optim.lr == 0.7
    assert cfg.optim.momentum == 0.8  # --set over default
    assert cfg.train.seed == 9
    assert cfg.augment.image_size == 32  # implied by cifar10, untouched by the preset
    assert cfg.optim.weight_decay == OptimConfig().weight_decay  # default kept


def test_set_null_restores_an_auto_default_from_a_preset():
    assert resolve_pretrain(data=None, preset="cifar10", sets=None, flags=NO_FLAGS).model.stem == "small"
    cfg = resolve_pretrain(data=None, preset="cifar10", sets=["model.stem=null"], flags=NO_FLAGS)
    assert cfg.model.stem is None


def test_an_explicit_preset_replaces_the_demo_default():
    cfg = resolve_pretrain(data=None, preset="cifar10", sets=None, flags=NO_FLAGS)
    assert cfg == from_dict(
        PretrainConfig,
        merge(merge(to_plain(PretrainConfig()), {"augment": {"image_size": 32}}), load_yaml(PRESETS / "cifar10.yaml")),
    )


def test_set_with_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"^unknown config key 'model\.depth'; valid keys in model: "):
        resolve_pretrain(data=None, preset=None, sets=["model.depth=3"], flags=NO_FLAGS)


def test_set_with_wrong_type_is_an_error_naming_it():
    with pytest.raises(ConfigError) as err:
        resolve_pretrain(data=None, preset=None, sets=["train.epochs=many"], flags=NO_FLAGS)
    assert str(err.value) == "'train.epochs' must be a whole number, got 'many' (str)"


def test_saved_config_replaces_defaults_and_preset():
    saved = to_plain(
        PretrainConfig(
            model=ModelConfig(arch="resnet18", width=0.25, stem="small"),
            augment=AugmentConfig(image_size=16),
        )
    )
    saved["train"]["epochs"] = 2
    cfg = resolve_pretrain(data=None, preset=None, sets=["train.log_every=3"], flags={"train.epochs": 5}, saved=saved)
    assert cfg.model == ModelConfig(arch="resnet18", width=0.25, stem="small")
    assert cfg.augment.image_size == 16  # not the demo preset's, nor the data-implied 32
    assert cfg.train.epochs == 5 and cfg.train.log_every == 3
    assert cfg.data.source is None  # the demo preset's data.source was not merged in
    assert saved["train"]["epochs"] == 2  # the caller's dict is left alone


def test_preset_with_saved_config_is_an_error():
    with pytest.raises(ConfigError) as err:
        resolve_pretrain(data=None, preset="demo", sets=None, flags=NO_FLAGS, saved=to_plain(PretrainConfig()))
    assert str(err.value) == "--preset cannot be combined with --resume: a resumed run keeps its own config"



@pytest.mark.parametrize(("recipe", "sets"), [("knn: 5\n", None), ("train:\n  epochs: 3\n", ["knn=5"])])
def test_a_commands_section_must_be_a_mapping(recipe, sets, tmp_path):
    from simclr_cli.config import resolve_task

    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    with pytest.raises(ConfigError, match=r"^'knn' must be a mapping of its keys"):
        resolve_task("knn", preset=str(path), sets=sets, flags={})


def test_every_command_reads_its_own_section_of_one_preset(tmp_path):
    from simclr_cli.config import resolve_task

    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  epochs: 3\nknn:\n  k: [10, 20]\nlinear_eval:\n  protocol: paper\nembed:\n  normalize: true\n")
    assert resolve_task("knn", preset=str(path), sets=None, flags={}).k == (10, 20)
    assert resolve_task("linear_eval", preset=str(path), sets=None, flags={}).protocol == "paper"
    assert resolve_task("embed", preset=str(path), sets=None, flags={}).normalize is True
    assert resolve_task("finetune", preset=str(path), sets=None, flags={}).label_fraction == 1.0  # no section: defaults
    assert resolve_pretrain(data=None, preset=str(path), sets=None, flags={}).train.epochs == 3


def test_the_simclrv2_preset_resolves_to_the_v2_recipe():
    """v2 §3: 3-layer head, LARS 0.1 x sqrt(B) = 6.4 at 4096, wd 1e-4, 5% of 800 epochs warm-up, tau 0.1; its
    finetune section is step 2 (LARS from head layer 1, batch 1024)."""
    from simclr_cli.config import resolve_task
    from simclr_cli.engine.defaults import resolve_sizes
    from simclr_cli.engine.optim import scaled_lr

    cfg = resolve_sizes(resolve_pretrain(data=None, preset="simclrv2", sets=None, flags=NO_FLAGS))
    assert (cfg.model.arch, cfg.model.width, cfg.model.sk_ratio, cfg.model.head_layers) == ("resnet50", 1, 0, 3)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.lr_scaling, cfg.optim.weight_decay) == ("lars", 0.1, "sqrt", 1e-4)
    assert scaled_lr(cfg.optim.lr, cfg.train.batch_size, cfg.optim.lr_scaling) == pytest.approx(6.4)
    assert cfg.optim.warmup_epochs == 0.05 * cfg.train.epochs == 40
    assert (cfg.train.temperature, cfg.augment.image_size, cfg.model.stem) == (0.1, 224, "standard")
    finetune = resolve_task("finetune", preset="simclrv2", sets=None, flags={})
    assert (finetune.optimizer, finetune.from_head_layer, finetune.batch_size) == ("lars", 1, 1024)
    sk = resolve_pretrain(data=None, preset="simclrv2", sets=["model.sk_ratio=0.0625"], flags=NO_FLAGS)
    assert sk.model.sk_ratio == 0.0625


@pytest.mark.parametrize("name", ["cifar10", "demo", "imagenet", "stl10", "simclrv2"])
def test_a_presets_header_states_the_temperature_it_sets(name):
    """Presets are recipes people trust: the tau the header names is the one the file sets (stl10 once called 0.2
    "the CIFAR temperature", which is 0.5)."""
    import re

    path = preset_path(name)
    header = " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
    stated = re.search(r"(?:tau|temperature) (\d+(?:\.\d+)?)", header)
    assert "CIFAR temperature" not in header
    if stated:
        assert float(stated[1]) == resolve_pretrain(data=None, preset=name, sets=None, flags=NO_FLAGS).train.temperature


def test_the_simclrv2_header_s_run_command_resolves_the_preset(monkeypatch):
    """The header's `Run:` line, as typed, reaches the pretraining task with the v2 recipe."""
    import shlex

    from typer.testing import CliRunner

    from simclr_cli.cli import app
    from simclr_cli.engine.tasks import pretrain as task

    header = preset_path("simclrv2").read_text(encoding="utf-8")
    command = next(line for line in header.splitlines() if line.startswith("# Run: ")).removeprefix("# Run: ")
    got = []
    monkeypatch.setattr(task, "run", lambda cfg, **kwargs: got.append(cfg))
    monkeypatch.setattr("simclr_cli.launcher.launch_pretrain", lambda cfg, **kwargs: got.append(cfg) or 0)
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    (cfg,) = got
    assert (cfg.data.source, cfg.model.head_layers, cfg.optim.lr, cfg.train.epochs) == ("imagenet", 3, 0.1, 800)
