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
def two_square_scene():
    """``two_square_scene(seed)``: a 48 x 64 grey image with two squares of seeded colours, the right-hand one at
    rows 20-40, columns 36-56 (the ReasonSeg-format benchmark tests' scenes)."""

    def scene(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        image = np.full((48, 64, 3), 230, np.uint8)
        image[8:24, 8:24] = rng.integers(0, 255, 3)
        image[20:40, 36:56] = rng.integers(0, 255, 3)
        return image

    return scene


@pytest.fixture(scope="session")
def rgb_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(90, 140, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def make_tiny_world(tmp_path_factory):
    """``make_tiny_world(seed=..., sizes={...})``: a small generated tiny world in a fresh temporary folder."""
    from llavaseg.tinyworld.generate import generate_tinyworld

    def make(*, seed: int, sizes: dict[str, int]):
        return generate_tinyworld(tmp_path_factory.mktemp("tw") / "data", seed=seed, sizes=sizes)

    return make


@pytest.fixture(scope="session")
def tiny_sam_and_text_encoder():
    """Random tiny SAM and open_clip text encoder of the real classes (frozen; shared by cache/train tests)."""
    from llavaseg.models.components import build_sam, build_text_encoder

    torch.set_num_threads(1)
    return build_sam("tiny", None, device="cpu"), build_text_encoder("tiny-clip", None, device="cpu")


@pytest.fixture(scope="module")
def fast_tiny_models():
    """Plumbing only: one torch thread (the machine is shared) and short generations from the random MLLM."""
    from llavaseg.bench.runner import shared_components

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mllm = shared_components("tiny", "cpu").mllm
    saved, mllm.max_new_tokens = mllm.max_new_tokens, 6
    yield
    mllm.max_new_tokens = saved
    torch.set_num_threads(threads)
