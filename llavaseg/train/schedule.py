"""Learning-rate schedules: linear warm-up, then cosine (to a floor) or linear decay. One module for all trainers.

Two forms of the same curves, because callers apply them in two ways:

* :func:`lr_factor`: a multiplier of the base learning rate (``torch.optim.lr_scheduler.LambdaLR``, or
  ``group["lr"] = base * factor``). ``schedule="linear"`` is DeepSpeed's ``WarmupDecayLR`` that LISA trains
  with; ``"cosine"`` decays to ``floor`` (a fraction of the peak).
* :func:`warmup_cosine_lr`: an absolute rate that decays from ``lr`` to ``min_lr`` (the tiny SAM and CLIP
  recipes set ``group["lr"]`` directly).

The arithmetic of each form is part of what makes a training run reproducible byte for byte, so the order of
operations here is deliberate: change it and the shipped tiny-world weights no longer regenerate exactly.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = ["Schedule", "lr_factor", "warmup_cosine_lr", "lambda_scheduler"]

Schedule = Literal["cosine", "linear"]


def lr_factor(step: int, *, warmup: int, total: int, schedule: Schedule = "cosine", floor: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup``. Then ``cosine``: ``floor + (1 - floor) * (1 + cos(pi * p)) / 2`` with ``p``
    the fraction of the decay done (clamped to 1); ``linear``: ``(total - step) / (total - warmup)``, at least 0.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "linear":
        return max(0.0, (total - step) / max(total - warmup, 1))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_lr(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """The absolute learning rate at ``step``: linear warm-up to ``lr``, then cosine to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def lambda_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total: int, schedule: Schedule = "cosine",
                     floor: float = 0.0, last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor`; ``last_epoch`` as in torch (``step - 1`` when resuming)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup=warmup, total=total, schedule=schedule, floor=floor),
        last_epoch=last_epoch)
