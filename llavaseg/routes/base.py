"""What every route shares: the call signature, timing, and the dialogue model the evaluator probes."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Protocol

import numpy as np

from llavaseg.models.mllm import FrozenMLLM
from llavaseg.results import SegmentationResult


class Route(Protocol):
    """A way to turn (image, query) pairs into masks. All routes return :class:`SegmentationResult`."""

    name: str

    def __call__(self, images: list[np.ndarray], queries: list[str]) -> list[SegmentationResult]: ...

    def dialogue_model(self) -> FrozenMLLM:
        """The MLLM that answers ordinary chat for this route (probed for dialogue preservation)."""
        ...


class StageTimer:
    """Wall time per named stage of one batch, later split evenly over the batch's results."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def per_item(self, batch_size: int) -> dict[str, float]:
        return {name: value / max(batch_size, 1) for name, value in self.seconds.items()}
