"""Wall time per named stage of a batch (what every result's ``timings`` reports)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["StageTimer"]


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
