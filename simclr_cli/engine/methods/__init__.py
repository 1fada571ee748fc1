"""Pretraining methods: one short module each over `base.Method`; `build` makes the one a config names."""

from __future__ import annotations

from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.methods.base import Method
from simclr_cli.engine.methods.moco import MoCoV1, MoCoV2
from simclr_cli.engine.methods.pirl import PIRL
from simclr_cli.engine.methods.simclr import SimCLRMethod
from simclr_cli.engine.methods.swav import SwAV

METHODS = {method.name: method for method in (SimCLRMethod, MoCoV1, MoCoV2, SwAV, PIRL)}


def check_name(name: str) -> None:
    if name not in METHODS:
        raise ConfigError(f"method {name!r} is not supported; choose one of {', '.join(METHODS)}")


def build(cfg, *, processes: int) -> Method:
    """The method `cfg.train.method` names, its modules built from the (resolved) config on the current torch seed."""
    check_name(cfg.train.method)
    return METHODS[cfg.train.method].from_config(cfg, processes=processes)
