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
    <root>/index.json                    images and shards (size, sha256; a shard's query entries in order)
    <root>/index.lock                    held while a process merges its commit into index.json
    <root>/images/<d[:2]>/<d>.safetensors  embedding, level_0.., metadata input/original size
    <root>/queries/<chunk>.safetensors   text/<key> (T x D float32), mask/<key> (H x W uint8)
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

Every file is written to a temporary name and renamed into place and committed to the index under a file
lock, so several processes may share one cache folder; an interrupted build loses at most one chunk and
:func:`build_cache` resumes by skipping chunks already cached, computing the same batches an uninterrupted
build would. A damaged file (size or sha256 differ from the index) is reported in one line and rebuilt.
"""

from llavaseg.cache.build import build_cache, query_key
from llavaseg.cache.identity import CACHE_FORMAT_VERSION, CacheIdentity, cache_identity
from llavaseg.cache.store import (
           CachedSample,
           FeatureCache,
           QueryEntry,
           default_cache_root,
)

__all__ = ["CACHE_FORMAT_VERSION", "CacheIdentity", "QueryEntry", "CachedSample", "FeatureCache", "cache_identity",
           "build_cache", "query_key", "default_cache_root"]
