"""The feature-cache directory: its index, per-image SAM features and per-chunk query shards.

Safe to share: several processes may build into one cache directory at once. Every file is named by its
content (images by pixel digest, a shard by the ordered keys of the chunk it holds), written to a temporary
name and renamed into place, and recorded in ``index.json`` with its size and sha256 under a file lock
(``index.lock``), merging with whatever other processes committed meanwhile. A run reads back exactly the
chunks it computed or found (a *reference* names chunk and key): a query that another run computed in another
batch is not substituted, so a run's numbers never depend on who else shares the folder. A file whose size or
hash no longer matches its record is reported in one line and rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from filelock import FileLock
from pydantic import BaseModel, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from llavaseg.atomic import atomic_write, atomic_write_text
from llavaseg.cache.identity import CACHE_FORMAT_VERSION, CacheIdentity, StageSource
from llavaseg.errors import CheckpointMismatchError, InputError
from llavaseg.models.sam import SamImageFeatures, load_sam_features, save_sam_features
from llavaseg.paths import cache_dir

__all__ = ["QueryEntry", "CachedSample", "FeatureCache", "default_cache_root", "shard_name"]

logger = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """The ``features`` folder of the user cache (:func:`llavaseg.paths.cache_root`)."""
    return cache_dir("features")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class QueryEntry(BaseModel):
    """Index record of one cached query: labels, stage outputs and where its tensors live."""

    key: str
    query_id: str
    sample_id: str
    text_index: int
    text: str
    is_sentence: bool
    image: str  # image digest
    shard: str  # name of the chunk shard holding its tensors
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


def shard_name(keys: Sequence[str]) -> str:
    """A chunk's shard name: a digest of its keys *in order* (the order is the batch the models saw)."""
    return hashlib.blake2b("\n".join(keys).encode(), digest_size=12).hexdigest()


_LOCK_NAME = "index.lock"


def _is_own_file(name: str) -> bool:
    """Whether a name in a cache folder without ``identity.json`` is what another process opening the same new
    cache leaves there mid-way (the lock, a temporary file of an atomic write, the namespaces folder): such a
    folder is being created, not someone else's folder."""
    return name in (_LOCK_NAME, "namespaces") or name.startswith((".identity.json.", ".index.json."))


def _empty_index() -> dict[str, Any]:
    return {"format_version": CACHE_FORMAT_VERSION, "images": {}, "shards": {}}


class FeatureCache:
    """A cache directory bound to one :class:`CacheIdentity`.

    ``root`` holds the cache itself when its ``identity.json`` is this identity (or it is new); a cache built
    for other models is refused, unless ``on_mismatch="namespace"`` asks for a separate namespace inside it
    (``root/namespaces/<identity digest>/``). The default cache root (:func:`default_cache_root`) always
    namespaces: it is shared by every run of every model.
    """

    def __init__(self, root: Path | str, identity: CacheIdentity, *,
                 on_mismatch: Literal["error", "namespace"] = "error", image_lru: int = 512) -> None:
        self.root = Path(root).expanduser()
        self.identity = identity
        self.dir = self._resolve_dir("namespace" if self.root == default_cache_root() else on_mismatch)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock = FileLock(str(self.dir / _LOCK_NAME))
            with self._lock:  # processes opening one new cache together (the ranks of a run) write it once
                identity_path = self.dir / "identity.json"
                if not identity_path.is_file():
                    atomic_write_text(identity_path,
                                      json.dumps(identity.model_dump(mode="json"), indent=1, sort_keys=True))
                elif self._read_identity(identity_path) != identity:
                    raise CheckpointMismatchError(f"feature cache {self.dir} was just created by another process "
                                                  "for other models/settings; use another cache directory")
        except OSError as exc:
            raise InputError(f"cannot write the feature cache at {self.dir}: {exc.strerror}") from None
        self._index = self._read_index()
        self._verified: set[str] = set()
        self._damaged: set[str] = set()
        self._features: OrderedDict[str, SamImageFeatures] = OrderedDict()
        self._image_lru = image_lru

    # ------------------------------------------------------------------------------------------ identity
    @staticmethod
    def _read_identity(path: Path) -> CacheIdentity:
        try:
            return CacheIdentity.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, ValidationError) as exc:
            raise CheckpointMismatchError(f"{path} is not a llavaseg feature-cache identity "
                                          f"({type(exc).__name__})") from None

    def _resolve_dir(self, on_mismatch: str) -> Path:
        primary = self.root / "identity.json"
        if primary.is_file():
            recorded = self._read_identity(primary)
            if recorded == self.identity:
                return self.root
            if on_mismatch != "namespace":
                differs = ", ".join(recorded.differences(self.identity))
                raise CheckpointMismatchError(
                    f"feature cache {self.root} was built for other models/settings (differs in: {differs}); use "
                    "another cache directory or allow a new namespace (--cache-namespace / on_mismatch='namespace')")
            return self._namespace()
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"feature cache {self.root} is a file, not a folder")
        if self.root.exists() and not all(_is_own_file(p.name) for p in self.root.iterdir()):
            if primary.is_file():
                # Another process finished creating this cache between the two looks (its identity.json, then
                # its first data files, appeared after the check above): judge the cache it wrote.
                return self._resolve_dir(on_mismatch)
            raise CheckpointMismatchError(f"{self.root} is not empty and holds no feature-cache identity.json; "
                                          "refusing to use it as a cache")
        return self._namespace() if self.root == default_cache_root() else self.root

    def _namespace(self) -> Path:
        namespace = self.root / "namespaces" / self.identity.digest()
        ns_identity = namespace / "identity.json"
        if ns_identity.is_file() and self._read_identity(ns_identity) != self.identity:
            raise CheckpointMismatchError(f"cache namespace {namespace} holds another identity (hash collision?)")
        return namespace

    # -------------------------------------------------------------------------------------------- index
    def _read_index(self) -> dict[str, Any]:
        path = self.dir / "index.json"
        if not path.is_file():
            return _empty_index()
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointMismatchError(f"{path}: unreadable cache index ({type(exc).__name__}); delete the "
                                          "folder to rebuild it") from None
        if not isinstance(index, dict) or index.get("format_version") != CACHE_FORMAT_VERSION:
            version = index.get("format_version") if isinstance(index, dict) else None
            raise CheckpointMismatchError(f"{path}: cache format {version}, expected {CACHE_FORMAT_VERSION}; "
                                          "use another cache folder")
        return index

    def _commit(self, images: dict[str, dict], shards: dict[str, dict]) -> None:
        """Merge new records into the index on disk under the lock (other processes' commits are kept)."""
        with self._lock:
            index = self._read_index()
            for section, new in (("images", images), ("shards", shards)):
                index[section].update(new)
            atomic_write_text(self.dir / "index.json", json.dumps(index, indent=1, sort_keys=True))
        self._index = index

    def refresh(self) -> None:
        """Re-read the index (to see what other processes committed)."""
        self._index = self._read_index()

    def __len__(self) -> int:
        """Distinct queries cached (a query computed in two chunks counts once)."""
        return len({entry["key"] for record in self._index["shards"].values() for entry in record["entries"]})

    def _inside(self, relative: str) -> Path:
        """A path the index names, refused if it leads outside the cache folder."""
        path = (self.dir / relative).resolve()
        if not path.is_relative_to(self.dir.resolve()):
            raise CheckpointMismatchError(f"{self.dir}/index.json names a file outside the cache ({relative})")
        return path

    def _file_ok(self, record: dict) -> bool:
        """Whether a recorded file is intact (size, then sha256 once per process); reports damage once."""
        relative = str(record.get("file", ""))
        if relative in self._verified:
            return True
        if relative in self._damaged:
            return False
        path = self._inside(relative)
        problem = None
        if not path.is_file():
            problem = "missing"
        elif path.stat().st_size != record.get("bytes"):
            problem = f"{path.stat().st_size} bytes instead of {record.get('bytes')}"
        elif _sha256(path) != record.get("sha256"):
            problem = "contents changed"
        if problem is None:
            self._verified.add(relative)
            return True
        self._damaged.add(relative)
        logger.warning("feature cache: %s is damaged (%s); its entries are rebuilt", path, problem)
        return False

    def has_image(self, digest: str) -> bool:
        record = self._index["images"].get(digest)
        return record is not None and self._file_ok(record)

    def has_chunk(self, keys: Sequence[str]) -> bool:
        """Whether this exact chunk (these keys, in this order) is cached with its shard and images intact."""
        record = self._index["shards"].get(shard_name(keys))
        return (record is not None and self._file_ok(record)
                and all(self.has_image(entry["image"]) for entry in record["entries"]))

    def entry(self, reference: str) -> QueryEntry:
        """The index record of one reference (``<shard>#<key>``, as :func:`build_cache` returns them)."""
        shard, _, key = reference.partition("#")
        record = self._index["shards"].get(shard)
        for entry in (record or {}).get("entries", []):
            if entry["key"] == key:
                return QueryEntry.model_validate(entry)
        raise InputError(f"{reference} is not in the feature cache {self.dir}")

    # ------------------------------------------------------------------------------------------- images
    def image_features(self, digest: str) -> SamImageFeatures:
        """SAM features of one cached image (kept in a small LRU: training revisits images every epoch)."""
        if digest in self._features:
            self._features.move_to_end(digest)
            return self._features[digest]
        record = self._index["images"].get(digest)
        if record is None:
            raise InputError(f"image {digest} is not in the feature cache {self.dir}")
        if not self._file_ok(record):
            raise CheckpointMismatchError(f"feature cache {self.dir}: the file of image {digest} is damaged; "
                                          "re-run to rebuild it")
        features = load_sam_features(self._inside(record["file"]))
        self._features[digest] = features
        while len(self._features) > self._image_lru:
            self._features.popitem(last=False)
        return features

    # ------------------------------------------------------------------------------------------ queries
    def _record(self, relative: str) -> dict:
        path = self.dir / relative
        self._verified.add(relative)
        self._damaged.discard(relative)
        return {"file": relative, "bytes": path.stat().st_size, "sha256": _sha256(path)}

    def put_chunk(self, images: dict[str, SamImageFeatures], entries: Sequence[QueryEntry],
                  texts: Sequence[torch.Tensor], masks: Sequence[np.ndarray]) -> list[str]:
        """Write a chunk's new images and one shard of its queries (atomic files), then commit them to the
        index in one locked merge: the chunk is cached entirely or not at all. Returns its references."""
        image_records = {}
        for digest, features in images.items():
            relative = f"images/{digest[:2]}/{digest}.safetensors"
            save_sam_features(self.dir / relative, features)
            image_records[digest] = self._record(relative)
        name = shard_name([entry.key for entry in entries])
        relative = f"queries/{name}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for entry, text, mask in zip(entries, texts, masks, strict=True):
            tensors[f"text/{entry.key}"] = text.detach().float().cpu().contiguous()
            tensors[f"mask/{entry.key}"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))
        atomic_write(self.dir / relative, lambda p: save_file(tensors, str(p)))
        record = self._record(relative) | {
            "entries": [entry.model_copy(update={"shard": name}).model_dump(mode="json") for entry in entries]}
        self._commit(image_records, {name: record})
        return [f"{name}#{entry.key}" for entry in entries]

    def references(self, keys: Sequence[str]) -> list[str]:
        """References of an intact cached chunk (see :meth:`has_chunk`)."""
        name = shard_name(keys)
        return [f"{name}#{key}" for key in keys]

    def flush(self) -> None:
        """Kept for callers of the earlier format: every commit is already on disk."""

    def load_samples(self, references: Sequence[str]) -> list[CachedSample]:
        """Read queries (entry, text embeddings, mask) into memory, opening each shard once."""
        entries = [self.entry(reference) for reference in references]
        by_shard: dict[str, list[int]] = {}
        for position, entry in enumerate(entries):
            by_shard.setdefault(entry.shard, []).append(position)
        out: list[CachedSample | None] = [None] * len(entries)
        for shard, positions in by_shard.items():
            record = self._index["shards"][shard]
            if not self._file_ok(record):
                raise CheckpointMismatchError(f"feature cache {self.dir}: shard {shard} is damaged; re-run to "
                                              "rebuild it")
            with safe_open(str(self._inside(record["file"])), framework="pt") as handle:
                for position in positions:
                    entry = entries[position]
                    out[position] = CachedSample(entry, handle.get_tensor(f"text/{entry.key}"),
                                                 handle.get_tensor(f"mask/{entry.key}").numpy())
        return out  # type: ignore[return-value]
