"""What every route shares: the call signature, timing, and the dialogue model the evaluator probes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # pragma: no cover - the registry is imported before any model (flags are checked first)
    import numpy as np

    from llavaseg.models.mllm import FrozenMLLM
    from llavaseg.results import SegmentationResult

__all__ = ["Route"]


class Route(Protocol):
    """A way to turn (image, query) pairs into masks. All routes return :class:`SegmentationResult`."""

    name: str

    def __call__(self, images: list[np.ndarray], queries: list[str]) -> list[SegmentationResult]: ...

    def dialogue_model(self) -> FrozenMLLM:
        """The MLLM that answers ordinary chat for this route (probed for dialogue preservation)."""
        ...
