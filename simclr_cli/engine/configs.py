"""The typed config of every task, composed of the sections their blocks own (ModelConfig in model, AugmentConfig
in augment, OptimConfig in optim, DataConfig in pipeline, TrainConfig in trainer, MonitorConfig in monitor), and the
plain-data form every config is saved in.

Blocks never import this module: they take their own section. `simclr_cli/config.py` fills these from defaults,
presets, --set and flags; `defaults` fills their "auto" values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from simclr_cli.engine.augment import AugmentConfig
from simclr_cli.engine.model import ModelConfig
from simclr_cli.engine.monitor import MonitorConfig
from simclr_cli.engine.optim import OptimConfig
from simclr_cli.engine.pipeline import DataConfig
from simclr_cli.engine.trainer import TrainConfig


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run; saved resolved with every output."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def validate(self) -> None:
        for section in (self.data, self.model, self.augment, self.optim, self.train, self.monitor):
            section.validate()
