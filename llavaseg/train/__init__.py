"""Training the adapters, the only trainable part of the LLaVASeg route, on cached frozen features.

    >>> from llavaseg.train import TrainConfig, train_adapters
    >>> result = train_adapters(TrainConfig(preset="tiny-world", steps=2000, out="adapters/tiny-world"))

Modules, one job each: :mod:`~llavaseg.train.config` (what defines a run), :mod:`~llavaseg.train.loop` (the run),
:mod:`~llavaseg.train.step` (one optimiser step), :mod:`~llavaseg.train.validate` (validation on cached samples),
:mod:`~llavaseg.train.card` (the card beside the weights), and the mechanisms every trainer of the project
shares: :mod:`~llavaseg.train.schedule` (learning-rate schedules) and :mod:`~llavaseg.train.state` (resumable
training state). The losses are :mod:`llavaseg.losses`.
"""

from llavaseg.losses import dice_loss, mask_loss, sigmoid_bce_loss
from llavaseg.train.config import (
           DataSource,
           LossPoint,
           TrainConfig,
           TrainResult,
           ValPoint,
)
from llavaseg.train.loop import train_adapters
from llavaseg.train.schedule import lr_factor
from llavaseg.train.step import adapter_train_step
from llavaseg.train.validate import evaluate_cached

__all__ = ["DataSource", "TrainConfig", "TrainResult", "ValPoint", "LossPoint", "sigmoid_bce_loss", "dice_loss",
           "mask_loss", "lr_factor", "adapter_train_step", "evaluate_cached", "train_adapters"]
