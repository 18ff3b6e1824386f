"""Shared fixtures. Models are small random instances of the real classes (the ``tiny`` preset)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_segmenter():
    from llavaseg import Segmenter

    return Segmenter.from_preset("tiny", batch_size=4)


@pytest.fixture(scope="session")
def rgb_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(90, 140, 3), dtype=np.uint8)
