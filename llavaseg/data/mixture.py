"""Sampling-rate mixtures over datasets, as LISA trains on ``sem_seg||refer_seg||vqa||reason_seg`` (9,3,3,1).

LISA's ``HybridDataset.__getitem__`` ignores the index it is given: it picks a *source* with
``np.random.choice(len(datasets), p=sample_rate / sum)`` and then a random item of that source. Rates are
therefore the expected fraction of training samples per source, independent of the sources' sizes (239
ReasonSeg images are seen as often as 1/16 of all samples even next to millions of COCO-Stuff pixels).

:class:`Mixture` reproduces that rule, deterministically: every draw is a pure function of ``(seed, step)``
(:meth:`Mixture.batch`), so an interrupted training run that resumes at step ``s`` sees exactly the batches
an uninterrupted run would. With a single source it does the usual thing instead: a fresh permutation per
epoch (seeded by ``(seed, epoch)``), every item once per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from llavaseg.errors import InputError

__all__ = ["Mixture", "LISA_RATES"]

T = TypeVar("T")

LISA_RATES: dict[str, float] = {"sem_seg": 9.0, "refer_seg": 3.0, "vqa": 3.0, "reason_seg": 1.0}
"""LISA's default ``--sample_rates 9,3,3,1`` for ``--dataset sem_seg||refer_seg||vqa||reason_seg``."""


def _materialise(source: Any) -> Sequence[Any]:
    """A dataset (anything with ``queries()``) becomes the list of its queries; sequences stay as they are."""
    if hasattr(source, "queries") and callable(source.queries):
        return list(source.queries())
    if isinstance(source, Sequence):
        return source
    raise InputError(f"mixture source must be a dataset with queries() or a sequence, got {type(source).__name__}")


class Mixture(Generic[T]):
    """Draw items from several sources with given sampling rates (LISA's rule), deterministically.

    ``sources`` is a list of ``(dataset_or_sequence, rate)``; rates are any positive weights (normalised
    here). Items are the datasets' :class:`~llavaseg.data.base.SegQuery` objects, or whatever the sequences
    hold (training mixes lists of cache keys this way).
    """

    def __init__(self, sources: Sequence[tuple[Any, float]], seed: int = 0,
                 names: Sequence[str] | None = None) -> None:
        if not sources:
            raise InputError("a mixture needs at least one source")
        self.sources: list[Sequence[T]] = []
        weights = []
        for index, entry in enumerate(sources):
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise InputError(f"mixture source {index} must be a (dataset, rate) pair")
            source, rate = entry
            items = _materialise(source)
            if len(items) == 0:
                raise InputError(f"mixture source {index} is empty")
            if not isinstance(rate, (int, float)) or not np.isfinite(rate) or rate <= 0:
                raise InputError(f"mixture source {index} has rate {rate!r}; rates must be positive numbers")
            self.sources.append(items)
            weights.append(float(rate))
        self.weights = tuple(weights)
        self.rates = tuple(float(w) for w in np.asarray(weights) / np.sum(weights))
        self.seed = int(seed)
        self.names = list(names) if names is not None else [f"source{i}" for i in range(len(self.sources))]
        if len(self.names) != len(self.sources):
            raise InputError(f"{len(self.names)} names for {len(self.sources)} mixture sources")
        self._rng = np.random.default_rng([self.seed, 0x5EED])

    def __len__(self) -> int:
        """Total number of distinct items over all sources."""
        return sum(len(source) for source in self.sources)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {len(s)} items @ {r:.3f}" for n, s, r in zip(self.names, self.sources, self.rates))
        return f"Mixture({parts}; seed={self.seed})"

    # ------------------------------------------------------------------------------ LISA's stateful draw
    def draw_index(self, rng: np.random.Generator | None = None) -> tuple[int, int]:
        """``(source, item)`` indices of one draw: source by rate, then a uniform item of it (LISA)."""
        rng = rng if rng is not None else self._rng
        source = int(rng.choice(len(self.sources), p=self.rates))
        return source, int(rng.integers(len(self.sources[source])))

    def draw(self, rng: np.random.Generator | None = None) -> T:
        source, item = self.draw_index(rng)
        return self.sources[source][item]

    def sample(self, n: int) -> list[T]:
        """``n`` draws from the mixture's own generator (seeded at construction: same seed, same list)."""
        return [self.draw() for _ in range(n)]

    def __iter__(self) -> Iterator[T]:
        """Endless stream of draws (LISA's dataset has no natural end either)."""
        while True:
            yield self.draw()

    # ----------------------------------------------------------------------- resumable, per-step batches
    def batch_indices(self, step: int, batch_size: int) -> list[tuple[int, int]]:
        """``(source, item)`` pairs of training step ``step``: a pure function of ``(seed, step, batch_size)``.

        One source: position ``step * batch_size + k`` of the concatenated per-epoch permutations (epoch
        ``e`` shuffled by ``default_rng([seed, e])``), so every item is seen once per epoch. Several sources:
        LISA's draw with a generator seeded by ``(seed, step)``.
        """
        if step < 0 or batch_size < 1:
            raise InputError(f"step must be >= 0 and batch_size >= 1, got {step}, {batch_size}")
        if len(self.sources) == 1:
            size = len(self.sources[0])
            out = []
            cached: dict[int, np.ndarray] = {}
            for position in range(step * batch_size, (step + 1) * batch_size):
                epoch, offset = divmod(position, size)
                if epoch not in cached:
                    cached[epoch] = self.epoch_order(epoch)
                out.append((0, int(cached[epoch][offset])))
            return out
        rng = np.random.default_rng([self.seed, 1, step])
        return [self.draw_index(rng) for _ in range(batch_size)]

    def batch(self, step: int, batch_size: int) -> list[T]:
        return [self.sources[s][i] for s, i in self.batch_indices(step, batch_size)]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The item order of one epoch of a single-source mixture (a seeded permutation)."""
        return np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.sources[0]))
