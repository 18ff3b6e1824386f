"""Filling a feature cache: the frozen models run once per image and query, resumably."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from llavaseg.attributes import Attributes
from llavaseg.cache.identity import StageSource
from llavaseg.cache.store import FeatureCache, QueryEntry
from llavaseg.data.annotations import GroundTruthStages, StageRecord
from llavaseg.data.base import SegQuery
from llavaseg.errors import DatasetFormatError, InputError
from llavaseg.images import image_digest
from llavaseg.method.segment import text_phrases
from llavaseg.method.stages import run_stages
from llavaseg.models.sam import FrozenSAM
from llavaseg.models.text_encoder import FrozenTextEncoder

__all__ = ["query_key", "build_cache"]


def _digest_bytes(*parts: str | bytes) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def query_key(image_key: str, text: str, mask: np.ndarray,
              ground_truth: tuple[str, dict[str, str]] | None = None) -> str:
    """Content key of a query: same pixels, text, ground truth (and ground-truth stages) -> same key."""
    mask_digest = _digest_bytes(str(mask.shape), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    extra = json.dumps(ground_truth, sort_keys=True) if ground_truth is not None else ""
    return _digest_bytes(image_key, text, mask_digest, extra)


class _Pending:
    """One query of a chunk: everything needed to compute and store its entry."""

    __slots__ = ("query", "image", "digest", "mask", "key", "stage")

    def __init__(self, query: SegQuery, image: np.ndarray, digest: str, mask: np.ndarray, key: str,
                 stage: StageRecord | None) -> None:
        self.query, self.image, self.digest, self.mask, self.key, self.stage = query, image, digest, mask, key, stage


def _stage_texts(chunk: list[_Pending], source: StageSource, mllm: Any, prompts: Any
                 ) -> list[tuple[str, Attributes, str, str, str]]:
    """(description, attributes, parse method, raw stage-1 text, raw stage-2 text) of every query of a chunk."""
    if source == "teacher":
        return [(p.stage.description, Attributes(**p.stage.attributes), "teacher", "", "")  # type: ignore[union-attr]
                for p in chunk]
    outputs = run_stages(mllm, prompts, [p.image for p in chunk], [p.query.text for p in chunk])
    return [(o.description, o.attributes, o.attribute_parse, o.reason_output, o.attributes_output) for o in outputs]


def _encode_alone(text_encoder: FrozenTextEncoder, phrases: list[str]) -> torch.Tensor:
    """Each phrase through the encoder on its own (a repeat comes from its memo): a cached embedding then never
    depends on which other phrases shared a batch, so a resumed or concurrent build stores the same bits."""
    return torch.cat([text_encoder.encode_text([phrase]) for phrase in phrases])


def _store_chunk(cache: FeatureCache, chunk: list[_Pending], *, sam: FrozenSAM, text_encoder: FrozenTextEncoder,
                 mllm: Any, prompts: Any) -> list[str]:
    """Run the frozen models on one chunk and commit its new images and its queries as one unit."""
    new_images: dict[str, np.ndarray] = {}
    for item in chunk:
        if not cache.has_image(item.digest) and item.digest not in new_images:
            new_images[item.digest] = item.image
    features = {digest: sam.encode_batch([image])[0] for digest, image in new_images.items()}  # one image a call
    source = cache.identity.stage_source
    stages = _stage_texts(chunk, source, mllm, prompts)
    entries, texts = [], []
    for item, (description, attributes, parse, raw_r, raw_a) in zip(chunk, stages, strict=True):
        phrases = text_phrases(description, attributes, True, cache.identity.max_text_tokens)
        texts.append(_encode_alone(text_encoder, phrases))
        query = item.query
        entries.append(QueryEntry(
            key=item.key, query_id=str(query.query_id), sample_id=str(query.sample_id),
            text_index=int(query.text_index), text=query.text, is_sentence=bool(query.is_sentence),
            image=item.digest, shard="", source=source, description=description,
            attributes=dict(attributes.items()), attribute_parse=str(parse), reason_output=raw_r,
            attributes_output=raw_a, phrases=phrases))
    return cache.put_chunk(features, entries, texts, [item.mask for item in chunk])


def _pending_query(query: SegQuery, ground_truth: GroundTruthStages | None) -> _Pending:
    image = query.load_image()
    mask = np.asarray(query.load_mask(), dtype=np.uint8)
    if mask.shape != image.shape[:2]:
        raise DatasetFormatError(f"query {query.query_id}: mask {mask.shape} does not match image {image.shape[:2]}")
    digest = image_digest(image)
    stage = ground_truth.lookup(query) if ground_truth is not None else None
    key = query_key(digest, query.text, mask, (stage.description, stage.attributes) if stage else None)
    return _Pending(query, image, digest, mask, key, stage)


def build_cache(cache: FeatureCache, queries: Iterable[SegQuery], *, sam: FrozenSAM,
                text_encoder: FrozenTextEncoder, mllm: Any = None, prompts: Any = None,
                ground_truth: GroundTruthStages | None = None, batch_size: int = 8, progress: bool = True,
                desc: str = "caching features", shard: tuple[int, int] = (0, 1)) -> list[str]:
    """Compute and store the frozen models' outputs for ``queries``; return their references in order.

    Queries are taken in fixed chunks of ``batch_size`` (by position, whatever is cached already); a chunk cached
    before (same keys in the same order, files intact) is skipped, any other is computed whole and committed as
    one unit. A reference names chunk and key, so the samples read back are the ones this batching produced. So an
    interrupted build resumes with exactly the chunks, batches and bits an uninterrupted one computes; images
    and phrases are encoded one at a time for the same reason. ``ground_truth`` replaces the MLLM's stage
    outputs by the split's ground-truth stages (the cache's identity must then say ``stage_source="teacher"``).
    ``shard=(rank, size)`` computes only every ``size``-th chunk from ``rank`` (one rank of a distributed run);
    the references returned are still all of them (a chunk's name follows from its keys), for use once every
    rank has finished.
    """
    from tqdm.auto import tqdm

    source: StageSource = cache.identity.stage_source
    if (ground_truth is not None) != (source == "teacher"):
        raise InputError(f"cache identity says stage_source={source!r} but ground-truth stages were "
                         f"{'given' if ground_truth is not None else 'not given'}")
    if source == "mllm" and (mllm is None or prompts is None):
        raise InputError("building an MLLM-stage cache needs the MLLM and the prompt templates")
    if batch_size < 1:
        raise InputError(f"cache batch size must be at least 1, got {batch_size}")
    queries = list(queries)
    references: list[str] = []
    models = {"sam": sam, "text_encoder": text_encoder, "mllm": mllm, "prompts": prompts}
    with tqdm(total=len(queries), desc=desc, disable=not progress, unit="query", leave=False) as bar:
        for number, start in enumerate(range(0, len(queries), batch_size)):
            chunk = [_pending_query(query, ground_truth) for query in queries[start: start + batch_size]]
            unique = list({item.key: item for item in chunk}.values())
            unique_keys = [item.key for item in unique]
            if number % shard[1] != shard[0] or cache.has_chunk(unique_keys):
                names = dict(zip(unique_keys, cache.references(unique_keys), strict=True))
            else:
                names = dict(zip(unique_keys, _store_chunk(cache, unique, **models), strict=True))
            references += [names[item.key] for item in chunk]
            bar.update(len(chunk))
    return references
