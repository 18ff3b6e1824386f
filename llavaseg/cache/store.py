"""The feature-cache directory: its index, per-image SAM features and per-query shards."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from safetensors import safe_open
from safetensors.torch import save_file

from llavaseg.atomic import atomic_write, atomic_write_text
from llavaseg.cache.identity import CACHE_FORMAT_VERSION, CacheIdentity, StageSource
from llavaseg.errors import CheckpointMismatchError, InputError
from llavaseg.models.sam import SamImageFeatures, load_sam_features, save_sam_features
from llavaseg.paths import cache_dir

__all__ = ["QueryEntry", "CachedSample", "FeatureCache", "default_cache_root"]


def default_cache_root() -> Path:
    """The ``features`` folder of the user cache (:func:`llavaseg.paths.cache_root`)."""
    return cache_dir("features")


def _atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True))


class QueryEntry(BaseModel):
    """Index record of one cached query: labels, stage outputs and where its tensors live."""

    key: str
    query_id: str
    sample_id: str
    text_index: int
    text: str
    is_sentence: bool
    image: str  # image digest
    shard: str  # path relative to the cache directory
    source: StageSource
    description: str
    attributes: dict[str, str] = Field(default_factory=dict)
    attribute_parse: str = "none"
    reason_output: str = ""
    attributes_output: str = ""
    phrases: list[str]


class CachedSample:
    """One training/validation sample read back from the cache (everything the adapters need)."""

    __slots__ = ("entry", "text", "mask")

    def __init__(self, entry: QueryEntry, text: torch.Tensor, mask: np.ndarray) -> None:
        self.entry = entry
        self.text = text  # T x D, row 0 = description
        self.mask = mask  # H x W uint8 (0 / 1 / 255)


class FeatureCache:
    """A cache directory bound to one :class:`CacheIdentity` (see the module docstring for the layout)."""

    def __init__(self, root: Path | str, identity: CacheIdentity, *,
                 on_mismatch: Literal["error", "namespace"] = "error", image_lru: int = 512) -> None:
        self.root = Path(root).expanduser()
        self.identity = identity
        self.dir = self._resolve_dir(on_mismatch)
        self.dir.mkdir(parents=True, exist_ok=True)
        identity_path = self.dir / "identity.json"
        if not identity_path.is_file():
            _atomic_write_json(identity_path, identity.model_dump(mode="json"))
        self._index = self._load_index()
        self._features: OrderedDict[str, SamImageFeatures] = OrderedDict()
        self._image_lru = image_lru

    # ------------------------------------------------------------------------------------------ identity
    @staticmethod
    def _read_identity(path: Path) -> CacheIdentity:
        try:
            return CacheIdentity.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointMismatchError(f"{path} is not a llavaseg feature-cache identity ({type(exc).__name__})") from None

    def _resolve_dir(self, on_mismatch: str) -> Path:
        primary = self.root / "identity.json"
        if not primary.is_file():
            if self.root.exists() and any(self.root.iterdir()):
                raise CheckpointMismatchError(
                    f"{self.root} is not empty and holds no feature-cache identity.json; refusing to use it as a cache")
            return self.root
        recorded = self._read_identity(primary)
        if recorded == self.identity:
            return self.root
        if on_mismatch != "namespace":
            differs = ", ".join(recorded.differences(self.identity))
            raise CheckpointMismatchError(
                f"feature cache {self.root} was built for other models/settings (differs in: {differs}); "
                "use another cache directory or allow a new namespace (--cache-namespace / on_mismatch='namespace')")
        namespace = self.root / "namespaces" / self.identity.digest()
        ns_identity = namespace / "identity.json"
        if ns_identity.is_file() and self._read_identity(ns_identity) != self.identity:
            raise CheckpointMismatchError(f"cache namespace {namespace} holds another identity (hash collision?)")
        return namespace

    # -------------------------------------------------------------------------------------------- index
    def _load_index(self) -> dict[str, Any]:
        path = self.dir / "index.json"
        if not path.is_file():
            return {"format_version": CACHE_FORMAT_VERSION, "images": {}, "queries": {}, "next_shard": 0}
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CheckpointMismatchError(f"{path}: unreadable cache index ({exc})") from None
        if index.get("format_version") != CACHE_FORMAT_VERSION:
            raise CheckpointMismatchError(f"{path}: cache format {index.get('format_version')}, expected {CACHE_FORMAT_VERSION}")
        return index

    def _save_index(self) -> None:
        _atomic_write_json(self.dir / "index.json", self._index)

    def __len__(self) -> int:
        return len(self._index["queries"])

    def has_image(self, digest: str) -> bool:
        return digest in self._index["images"]

    def has_query(self, key: str) -> bool:
        return key in self._index["queries"]

    def entry(self, key: str) -> QueryEntry:
        try:
            return QueryEntry.model_validate(self._index["queries"][key])
        except KeyError:
            raise InputError(f"query {key} is not in the feature cache {self.dir}") from None

    # ------------------------------------------------------------------------------------------- images
    def put_image(self, digest: str, features: SamImageFeatures) -> None:
        """Write one image's SAM features (atomic) and record it in the index (saved with the next shard)."""
        relative = f"images/{digest[:2]}/{digest}.safetensors"
        save_sam_features(self.dir / relative, features)
        self._index["images"][digest] = {"file": relative}

    def image_features(self, digest: str) -> SamImageFeatures:
        """SAM features of one cached image (kept in a small LRU: training revisits images every epoch)."""
        if digest in self._features:
            self._features.move_to_end(digest)
            return self._features[digest]
        try:
            record = self._index["images"][digest]
        except KeyError:
            raise InputError(f"image {digest} is not in the feature cache {self.dir}") from None
        features = load_sam_features(self.dir / record["file"])
        self._features[digest] = features
        while len(self._features) > self._image_lru:
            self._features.popitem(last=False)
        return features

    # ------------------------------------------------------------------------------------------ queries
    def put_queries(self, entries: Sequence[QueryEntry], texts: Sequence[torch.Tensor],
                    masks: Sequence[np.ndarray]) -> str:
        """Write one shard of queries atomically, then the index (the commit point of the shard)."""
        shard = f"queries/shard-{int(self._index['next_shard']):06d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for entry, text, mask in zip(entries, texts, masks, strict=True):
            tensors[f"text/{entry.key}"] = text.detach().float().cpu().contiguous()
            tensors[f"mask/{entry.key}"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))
        atomic_write(self.dir / shard, lambda p: save_file(tensors, str(p)))
        for entry in entries:
            self._index["queries"][entry.key] = entry.model_copy(update={"shard": shard}).model_dump(mode="json")
        self._index["next_shard"] = int(self._index["next_shard"]) + 1
        self._save_index()
        return shard

    def flush(self) -> None:
        """Persist image records added without a following shard."""
        self._save_index()

    def load_samples(self, keys: Sequence[str]) -> list[CachedSample]:
        """Read queries (entry, text embeddings, mask) into memory, opening each shard once."""
        entries = [self.entry(key) for key in keys]
        by_shard: dict[str, list[int]] = {}
        for position, entry in enumerate(entries):
            by_shard.setdefault(entry.shard, []).append(position)
        out: list[CachedSample | None] = [None] * len(entries)
        for shard, positions in by_shard.items():
            with safe_open(str(self.dir / shard), framework="pt") as handle:
                for position in positions:
                    entry = entries[position]
                    out[position] = CachedSample(entry, handle.get_tensor(f"text/{entry.key}"),
                                                 handle.get_tensor(f"mask/{entry.key}").numpy())
        return out  # type: ignore[return-value]
