"""The identity of a feature cache: everything that determines the cached tensors.

Two caches are interchangeable exactly when their identities are equal; a cache built for another identity
is never silently reused (see :class:`~llavaseg.cache.store.FeatureCache`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from llavaseg.errors import InputError
from llavaseg.models.sam import FrozenSAM
from llavaseg.models.text_encoder import FrozenTextEncoder

__all__ = ["CACHE_FORMAT_VERSION", "StageSource", "CacheIdentity", "GROUND_TRUTH_MLLM", "cache_identity"]

CACHE_FORMAT_VERSION = 2
StageSource = Literal["mllm", "teacher"]


class CacheIdentity(BaseModel):
    """Everything that determines the cached tensors; two caches are interchangeable iff these are equal."""

    model_config = ConfigDict(frozen=True)

    format_version: int = CACHE_FORMAT_VERSION
    stage_source: StageSource
    sam: dict[str, str]
    feature_layers: tuple[int, ...]
    text_encoder: dict[str, str]
    max_text_tokens: int
    mllm: dict[str, str]
    prompts: dict[str, str]

    def digest(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()

    def differences(self, other: CacheIdentity) -> list[str]:
        """Names of the fields that differ (for error messages)."""
        mine, theirs = self.model_dump(mode="json"), other.model_dump(mode="json")
        return [key for key in mine if mine[key] != theirs.get(key)]


GROUND_TRUTH_MLLM = {"teacher": "ground-truth stages.jsonl (description + attributes), no MLLM"}


def cache_identity(sam: FrozenSAM, text_encoder: FrozenTextEncoder, *, max_text_tokens: int,
                   stage_source: StageSource = "mllm", mllm: Any = None, prompts: Any = None) -> CacheIdentity:
    """The identity of a cache for these frozen models (``mllm``/``prompts`` are needed in ``mllm`` mode)."""
    if stage_source == "mllm":
        if mllm is None or prompts is None:
            raise InputError("a cache of MLLM stage outputs needs the MLLM and the prompt templates")
        mllm_id, prompts_id = dict(mllm.identity()), dict(prompts.identity())
    elif stage_source == "teacher":
        mllm_id, prompts_id = dict(GROUND_TRUTH_MLLM), {}
    else:
        raise InputError(f"stage_source must be 'mllm' or 'teacher', got {stage_source!r}")
    layers = tuple(getattr(sam, "feature_layers", ()))  # SAM 1's chosen ViT blocks; SAM 2's levels are fixed
    return CacheIdentity(stage_source=stage_source, sam=dict(sam.identity()), feature_layers=layers,
                         text_encoder=dict(text_encoder.identity()), max_text_tokens=max_text_tokens,
                         mllm=mllm_id, prompts=prompts_id)
