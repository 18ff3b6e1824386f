"""Seeded sampling that does not depend on the batch: each row draws from its own generator.

transformers' sampling draws every row of a batch from one random stream, so what a conversation samples depends
on which other conversations share its batch, and in what order; a self-consistency vote then changes with the
batching. Here each row gets its own ``torch.Generator``, seeded from (seed, the row's token ids), and a logits
processor adds Gumbel noise to the temperature-scaled logits; greedy decoding takes their argmax, which is an
exact draw from ``softmax(logits / temperature)`` (the Gumbel-max trick). Constraints applied before it (an
attribute schema's ``-inf`` logits) stay excluded.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from transformers import LogitsProcessor

__all__ = ["row_seed", "RowSampler"]


def row_seed(seed: int, ids: list[int]) -> int:
    """A 63-bit seed from the sampling seed and one row's (unpadded) token ids."""
    digest = hashlib.sha256(f"{seed}:".encode() + np.asarray(ids, dtype=np.int64).tobytes()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class RowSampler(LogitsProcessor):
    """Temperature plus per-row Gumbel noise; use with greedy decoding to sample each row independently."""

    def __init__(self, seeds: list[int], temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"sampling temperature must be > 0, got {temperature}")
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows to sample but {len(self.generators)} generators")
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64)
                               for g in self.generators]).clamp_(1e-12, 1.0 - 1e-12)
        gumbel = -torch.log(-torch.log(uniform))
        return scores.float() / self.temperature + gumbel.to(device=scores.device, dtype=torch.float32)
