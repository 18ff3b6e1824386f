"""Validation during adapter training: the shared evaluator on cached samples (no frozen model runs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llavaseg.cache import CachedSample, FeatureCache
from llavaseg.evaluate import MetricAccumulator, SplitMetrics
from llavaseg.method.segment import predict_logits
from llavaseg.models.adapters import MultiScaleAdapters
from llavaseg.models.sam import FrozenSAM

__all__ = ["evaluate_cached"]


@torch.no_grad()
def evaluate_cached(adapters: MultiScaleAdapters, sam: FrozenSAM, cache: FeatureCache,
                    samples: Sequence[CachedSample], *, use_attributes: bool = True,
                    batch_size: int = 16) -> dict[str, SplitMetrics]:
    """gIoU/cIoU (shared evaluator) of the adapters on cached samples; description only if not ``use_attributes``."""
    was_training = adapters.training
    adapters.eval()
    accumulator = MetricAccumulator()
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start: start + batch_size]
            features = [cache.image_features(s.entry.image) for s in chunk]
            texts = [s.text if use_attributes else s.text[:1] for s in chunk]
            logits = predict_logits(adapters, sam, features, texts)
            for sample, logit in zip(chunk, logits):
                entry = sample.entry
                accumulator.add_masks((logit > sam.mask_threshold).cpu().numpy(), sample.mask,
                                      query_id=entry.query_id, is_sentence=entry.is_sentence,
                                      sample=entry.sample_id, text_index=entry.text_index)
    finally:
        adapters.train(was_training)
    return accumulator.result()
