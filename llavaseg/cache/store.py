"""On-disk cache of everything the *frozen* models compute for training the adapters.

The MLLM, SAM and the text encoder never change during adapter training, so their outputs for a given image
and query are fixed: they are computed once here and training reads them back (an adapter step then costs
a few milliseconds instead of an MLLM generation plus a ViT forward pass).

What is stored
--------------
* per **image** (keyed by :func:`llavaseg.images.image_digest`, i.e. by pixel content): SAM's image
  embedding plus every encoder level the adapters read, with input/original size;
* per **query** (keyed by image digest + query text + ground-truth mask digest [+ teacher annotation]):
  the two chain-of-thought stage outputs (raw text, description, parsed attributes), the phrases embedded,
  their text embeddings (``T x D``: row 0 is the description, rows 1.. the attribute phrases, so the
  description-only ablation is row 0 alone) and the ground-truth mask at original resolution.

Layout::

    <root>/identity.json                 identity of the models this cache belongs to
    <root>/index.json                    images + queries (stage outputs, phrases, shard file), JSON
    <root>/images/<d[:2]>/<d>.safetensors  embedding, level_0.., metadata input/original size
    <root>/queries/shard-000000.safetensors text/<key> (T x D float32), mask/<key> (H x W uint8)
    <root>/namespaces/<id-hash>/...      same layout, for other identities (only when asked for)

Identity
--------
The identity records SAM (``sam.identity()`` + the feature layers), the text encoder, the MLLM, the prompt
templates, the number of phrases kept and where stage outputs come from (``mllm`` = the frozen MLLM's own
outputs, what inference sees; ``teacher`` = ground-truth ``stages.jsonl`` annotations, for ablations; the
MLLM and prompts then play no part and are recorded as such). A cache built for another identity is
**never silently reused**: :class:`FeatureCache` raises :class:`~llavaseg.errors.CheckpointMismatchError`
naming the differing parts, unless ``on_mismatch="namespace"`` asks for a separate namespace in the same
directory.

Every file is written to a temporary name and renamed into place; the index is rewritten after each shard,
so an interrupted build loses at most one shard and :func:`build_cache` resumes by skipping present keys.
One builder per cache directory at a time (no locking).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import save_file

from llavaseg.atomic import atomic_write, atomic_write_text
from llavaseg.attributes import Attributes
from llavaseg.data.base import SegQuery
from llavaseg.errors import CheckpointMismatchError, DatasetFormatError, InputError
from llavaseg.images import image_digest
from llavaseg.models.sam import FrozenSAM, SamImageFeatures
from llavaseg.models.text_encoder import FrozenTextEncoder

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheIdentity",
    "QueryEntry",
    "CachedSample",
    "TeacherStages",
    "FeatureCache",
    "cache_identity",
    "build_cache",
    "default_cache_root",
]

CACHE_FORMAT_VERSION = 1
StageSource = Literal["mllm", "teacher"]


def default_cache_root() -> Path:
    """``$LLAVASEG_CACHE/features`` or ``~/.cache/llavaseg/features``."""
    base = os.environ.get("LLAVASEG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "llavaseg")
    return Path(base) / "features"




def _atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True))


# ------------------------------------------------------------------------------------------------ identity
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


TEACHER_MLLM = {"teacher": "ground-truth stages.jsonl (description + attributes), no MLLM"}


def cache_identity(sam: FrozenSAM, text_encoder: FrozenTextEncoder, *, max_text_tokens: int,
                   stage_source: StageSource = "mllm", mllm: Any = None, prompts: Any = None) -> CacheIdentity:
    """The identity of a cache for these frozen models (``mllm``/``prompts`` are needed in ``mllm`` mode)."""
    if stage_source == "mllm":
        if mllm is None or prompts is None:
            raise InputError("a cache of MLLM stage outputs needs the MLLM and the prompt templates")
        mllm_id, prompts_id = dict(mllm.identity()), dict(prompts.identity())
    elif stage_source == "teacher":
        mllm_id, prompts_id = dict(TEACHER_MLLM), {}
    else:
        raise InputError(f"stage_source must be 'mllm' or 'teacher', got {stage_source!r}")
    return CacheIdentity(stage_source=stage_source, sam=dict(sam.identity()), feature_layers=tuple(sam.feature_layers),
                         text_encoder=dict(text_encoder.identity()), max_text_tokens=max_text_tokens,
                         mllm=mllm_id, prompts=prompts_id)


# ------------------------------------------------------------------------------------------------- entries
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

    @property
    def num_phrases(self) -> int:
        return len(self.phrases)


class CachedSample:
    """One training/validation sample read back from the cache (everything the adapters need)."""

    __slots__ = ("entry", "text", "mask")

    def __init__(self, entry: QueryEntry, text: torch.Tensor, mask: np.ndarray) -> None:
        self.entry = entry
        self.text = text  # T x D, row 0 = description
        self.mask = mask  # H x W uint8 (0 / 1 / 255)


class TeacherStages:
    """Ground-truth stage outputs (tiny world ``stages.jsonl``), looked up by (image name, query text)."""

    def __init__(self, records: dict[tuple[str, str], tuple[str, dict[str, str]]], source: str) -> None:
        self.records = records
        self.source = source

    @classmethod
    def from_jsonl(cls, path: Path | str) -> TeacherStages:
        path = Path(path)
        if not path.is_file():
            raise DatasetFormatError(f"teacher stage annotations not found: {path} (tiny-world splits have stages.jsonl)")
        records: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                records[(str(rec["image"]), str(rec["text"]))] = (
                    str(rec["description"]), {str(k): str(v) for k, v in dict(rec.get("attributes") or {}).items()})
            except (ValueError, KeyError, TypeError) as exc:
                raise DatasetFormatError(f"{path} line {lineno}: not a stage record ({type(exc).__name__}: {exc})") from None
        return cls(records, str(path))

    @classmethod
    def for_dataset(cls, dataset: Any) -> TeacherStages:
        """``stages.jsonl`` next to a ReasonSeg-format split (what ``generate_tinyworld`` writes)."""
        split_dir = getattr(dataset, "split_dir", None)
        if split_dir is None:
            raise DatasetFormatError("teacher mode needs a ReasonSeg-format split with stages.jsonl")
        return cls.from_jsonl(Path(split_dir) / "stages.jsonl")

    def lookup(self, query: SegQuery) -> tuple[str, dict[str, str]]:
        name = str(query.sample_id).rsplit("/", 1)[-1]
        try:
            return self.records[(name, query.text)]
        except KeyError:
            raise DatasetFormatError(f"{self.source}: no stage record for image {name!r} text {query.text!r}") from None


# --------------------------------------------------------------------------------------------------- cache
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

    @property
    def num_images(self) -> int:
        return len(self._index["images"])

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
        tensors = {"embedding": features.embedding.detach().cpu().contiguous()}
        tensors.update({f"level_{i}": level.detach().cpu().contiguous() for i, level in enumerate(features.levels)})
        metadata = {"input_size": json.dumps(list(features.input_size)),
                    "original_size": json.dumps(list(features.original_size))}
        atomic_write(self.dir / relative, lambda p: save_file(tensors, str(p), metadata=metadata))
        self._index["images"][digest] = {"file": relative, "input_size": list(features.input_size),
                                         "original_size": list(features.original_size),
                                         "num_levels": len(features.levels)}

    def image_features(self, digest: str) -> SamImageFeatures:
        """SAM features of one cached image (kept in a small LRU: training revisits images every epoch)."""
        if digest in self._features:
            self._features.move_to_end(digest)
            return self._features[digest]
        try:
            record = self._index["images"][digest]
        except KeyError:
            raise InputError(f"image {digest} is not in the feature cache {self.dir}") from None
        with safe_open(str(self.dir / record["file"]), framework="pt") as handle:
            embedding = handle.get_tensor("embedding")
            levels = [handle.get_tensor(f"level_{i}") for i in range(int(record["num_levels"]))]
        features = SamImageFeatures(embedding, levels, tuple(record["input_size"]), tuple(record["original_size"]))
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


# ------------------------------------------------------------------------------------------------- building
def _digest_bytes(*parts: str | bytes) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def query_key(image_key: str, text: str, mask: np.ndarray, teacher: tuple[str, dict[str, str]] | None = None) -> str:
    """Content key of a query: same pixels, text, ground truth (and teacher annotation) -> same key."""
    mask_digest = _digest_bytes(str(mask.shape), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    extra = json.dumps(teacher, sort_keys=True) if teacher is not None else ""
    return _digest_bytes(image_key, text, mask_digest, extra)


def build_cache(cache: FeatureCache, queries: Iterable[SegQuery], *, sam: FrozenSAM,
                text_encoder: FrozenTextEncoder, mllm: Any = None, prompts: Any = None,
                teacher: TeacherStages | None = None, batch_size: int = 8, progress: bool = True,
                desc: str = "caching features") -> list[str]:
    """Compute and store the frozen models' outputs for ``queries``; return their cache keys in order.

    Resumable: queries whose key is already cached are skipped (no model runs for them), images already
    cached are not re-encoded. ``teacher`` replaces the MLLM's stage outputs by ground-truth annotations
    (the cache's identity must say ``stage_source="teacher"``).
    """
    from tqdm.auto import tqdm

    from llavaseg.routes.llavaseg import run_stages, text_phrases

    source: StageSource = cache.identity.stage_source
    if (teacher is not None) != (source == "teacher"):
        raise InputError(f"cache identity says stage_source={source!r} but teacher annotations were "
                         f"{'given' if teacher is not None else 'not given'}")
    if source == "mllm" and (mllm is None or prompts is None):
        raise InputError("building an MLLM-stage cache needs the MLLM and the prompt templates")
    queries = list(queries)
    keys: list[str] = []
    pending: list[tuple[SegQuery, np.ndarray, str, np.ndarray, str, tuple[str, dict[str, str]] | None]] = []
    skipped = 0
    bar = tqdm(total=len(queries), desc=desc, disable=not progress, unit="query", leave=False)

    def flush_pending() -> None:
        if not pending:
            return
        new_images: dict[str, np.ndarray] = {}
        for _, image, digest, _, _, _ in pending:
            if not cache.has_image(digest) and digest not in new_images:
                new_images[digest] = image
        if new_images:
            for digest, features in zip(new_images, sam.encode_batch(list(new_images.values())), strict=True):
                cache.put_image(digest, features)
        if source == "teacher":
            stages = [(t[0], Attributes(**t[1]), "teacher", "", "") for *_, t in pending]  # type: ignore[index]
        else:
            outputs = run_stages(mllm, prompts, [p[1] for p in pending], [p[0].text for p in pending])
            stages = [(o.description, o.attributes, o.attribute_parse, o.reason_output, o.attributes_output)
                      for o in outputs]
        phrase_lists = [text_phrases(d, a, True, cache.identity.max_text_tokens) for d, a, *_ in stages]
        flat = text_encoder.encode_text([p for phrases in phrase_lists for p in phrases])
        entries, texts, masks = [], [], []
        offset = 0
        for (query, _, digest, mask, key, _), (description, attributes, parse, raw_r, raw_a), phrases in zip(
                pending, stages, phrase_lists, strict=True):
            texts.append(flat[offset: offset + len(phrases)].clone())
            offset += len(phrases)
            masks.append(mask)
            entries.append(QueryEntry(
                key=key, query_id=str(query.query_id), sample_id=str(query.sample_id), text_index=int(query.text_index),
                text=query.text, is_sentence=bool(query.is_sentence), image=digest, shard="", source=source,
                description=description, attributes={k: v for k, v in attributes.items()},
                attribute_parse=str(parse), reason_output=raw_r, attributes_output=raw_a, phrases=phrases))
        cache.put_queries(entries, texts, masks)
        bar.update(len(pending))
        pending.clear()

    try:
        for query in queries:
            image = query.load_image()
            mask = np.asarray(query.load_mask(), dtype=np.uint8)
            digest = image_digest(image)
            if mask.shape != image.shape[:2]:
                raise DatasetFormatError(f"query {query.query_id}: mask {mask.shape} does not match image {image.shape[:2]}")
            stage = teacher.lookup(query) if teacher is not None else None
            key = query_key(digest, query.text, mask, stage)
            keys.append(key)
            if cache.has_query(key) or any(p[4] == key for p in pending):
                skipped += 1
                bar.update(1)
                bar.set_postfix(skipped=skipped)
                continue
            pending.append((query, image, digest, mask, key, stage))
            if len(pending) >= batch_size:
                flush_pending()
        flush_pending()
    finally:
        bar.close()
    return keys
