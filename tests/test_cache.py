"""Feature cache: round trip, identity refusal / namespaces, resumable builds that skip cached entries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llavaseg.cache import FeatureCache, build_cache, cache_identity
from llavaseg.cache.identity import CacheIdentity
from llavaseg.data.annotations import GroundTruthStages
from llavaseg.data.reasonseg import ReasonSegDataset
from llavaseg.errors import CheckpointMismatchError, InputError
from llavaseg.prompting import PromptSet


@pytest.fixture(scope="module")
def world(make_tiny_world):
    return make_tiny_world(seed=5, sizes={"train": 4, "val": 1})


@pytest.fixture(scope="module")
def models(tiny_sam_and_text_encoder):
    return tiny_sam_and_text_encoder


class CountingSAM:
    """TEST DOUBLE: wraps the real FrozenSAM and counts images sent to its encoder."""

    def __init__(self, sam, fail_after: int | None = None) -> None:
        self.sam, self.images, self.calls, self.fail_after = sam, 0, 0, fail_after

    def encode_batch(self, images):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # simulated interruption in the middle of a build
        self.calls += 1
        self.images += len(images)
        return self.sam.encode_batch(images)

    def __getattr__(self, name):
        return getattr(self.sam, name)


class CountingTextEncoder:
    """TEST DOUBLE: wraps the real FrozenTextEncoder and counts encoded strings."""

    def __init__(self, encoder) -> None:
        self.encoder, self.texts = encoder, 0

    def encode_text(self, texts):
        self.texts += len(texts)
        return self.encoder.encode_text(texts)

    def __getattr__(self, name):
        return getattr(self.encoder, name)


class ScriptedMLLM:
    """TEST DOUBLE for the frozen MLLM: fixed answers per stage, counts queries; only the interface run_stages uses."""

    def __init__(self) -> None:
        self.queries = 0

    def identity(self):
        return {"name": "scripted-test-double", "config": "0", "weights": "0"}

    def begin(self, images, prompts):
        self.queries += len(prompts)
        return [" circle "] * len(prompts), len(prompts)

    def follow_up(self, state, prompts):
        return ["color : red ; location : top left ; size : small"] * state


def _queries(world, split="train"):
    return list(ReasonSegDataset(world, split).queries())


def test_round_trip_equals_the_models_outputs(world, models, tmp_path) -> None:
    sam, text_encoder = models
    mllm, prompts = ScriptedMLLM(), PromptSet.load()
    identity = cache_identity(sam, text_encoder, max_text_tokens=8, mllm=mllm, prompts=prompts)
    cache = FeatureCache(tmp_path / "c", identity)
    queries = _queries(world)[:3]
    keys = build_cache(cache, queries, sam=sam, text_encoder=text_encoder, mllm=mllm, prompts=prompts,
                       batch_size=2, progress=False)
    assert len(keys) == 3 and len(set(keys)) == 3
    reopened = FeatureCache(tmp_path / "c", identity)  # read back from disk, not memory
    samples = reopened.load_samples(keys)
    for query, sample in zip(queries, samples):
        entry = sample.entry
        assert entry.query_id == query.query_id and entry.source == "mllm"
        assert entry.description == "circle" and entry.reason_output == " circle "
        assert entry.attributes == {"color": "red", "location": "top left", "size": "small"}
        assert entry.phrases == ["circle", "color: red", "location: top left", "size: small"]
        assert torch.equal(sample.text, text_encoder.encode_text(entry.phrases))
        assert np.array_equal(sample.mask, query.load_mask())
        live = sam.encode(query.load_image())
        cached = reopened.image_features(entry.image)
        assert torch.equal(cached.embedding, live.embedding)
        assert all(torch.equal(a, b) for a, b in zip(cached.levels, live.levels, strict=True))
        assert cached.original_size == live.original_size and cached.input_size == live.input_size
    on_disk = json.loads((tmp_path / "c" / "identity.json").read_text())
    assert on_disk["mllm"]["name"] == "scripted-test-double" and on_disk["stage_source"] == "mllm"


def test_teacher_mode_reads_ground_truth_stages_and_is_labelled(world, models, tmp_path) -> None:
    sam, text_encoder = models
    dataset = ReasonSegDataset(world, "train")
    identity = cache_identity(sam, text_encoder, max_text_tokens=8, stage_source="teacher")
    assert identity.stage_source == "teacher" and "teacher" in identity.mllm and identity.prompts == {}
    cache = FeatureCache(tmp_path / "t", identity)
    query = next(iter(dataset.queries()))
    keys = build_cache(cache, [query], sam=sam, text_encoder=text_encoder,
                       ground_truth=GroundTruthStages.for_dataset(dataset), progress=False)
    entry = cache.entry(keys[0])
    record = next(json.loads(line) for line in (world / "train" / "stages.jsonl").read_text().splitlines()
                  if json.loads(line)["text"] == query.text)
    assert entry.source == "teacher" and entry.description == record["description"]
    assert entry.attributes == record["attributes"]
    with pytest.raises(InputError, match="teacher"):
        build_cache(cache, [query], sam=sam, text_encoder=text_encoder, progress=False)  # teacher missing


def test_identity_mismatch_is_refused_or_namespaced(world, models, tmp_path) -> None:
    sam, text_encoder = models
    first = cache_identity(sam, text_encoder, max_text_tokens=8, stage_source="teacher")
    FeatureCache(tmp_path / "c", first)
    other_prompts = cache_identity(sam, text_encoder, max_text_tokens=8, mllm=ScriptedMLLM(), prompts=PromptSet.load())
    with pytest.raises(CheckpointMismatchError, match="stage_source, mllm, prompts"):
        FeatureCache(tmp_path / "c", other_prompts)
    from llavaseg.models.components import build_text_encoder

    other_encoder = build_text_encoder("tiny-clip", None, device="cpu")
    other_encoder.model.token_embedding.weight.data.add_(0.01)  # a different (fine-tuned) text tower
    changed = cache_identity(sam, other_encoder, max_text_tokens=8, stage_source="teacher")
    with pytest.raises(CheckpointMismatchError, match="text_encoder"):
        FeatureCache(tmp_path / "c", changed)
    namespaced = FeatureCache(tmp_path / "c", changed, on_mismatch="namespace")
    assert namespaced.dir == tmp_path / "c" / "namespaces" / changed.digest()
    assert FeatureCache(tmp_path / "c", first).dir == tmp_path / "c"  # the original is untouched
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointMismatchError, match="not empty"):
        FeatureCache(tmp_path / "junk", first)


def test_a_cache_another_process_is_creating_is_joined_not_refused(models, tmp_path) -> None:
    """The ranks of one run open the same new cache together: what one leaves mid-way (the lock, the temporary
    file of its identity write) must not read as someone else's folder (CI once failed on this race)."""
    sam, text_encoder = models
    identity = cache_identity(sam, text_encoder, max_text_tokens=8, stage_source="teacher")
    root = tmp_path / "c"
    root.mkdir()
    (root / "index.lock").touch()
    (root / ".identity.json.k2x9.tmp").write_text("{")
    cache = FeatureCache(root, identity)
    assert cache.dir == root and CacheIdentity.model_validate_json((root / "identity.json").read_text()) == identity
    assert FeatureCache(root, identity).dir == root  # and the next process sees a finished cache


def test_a_cache_finished_by_another_process_between_two_looks_is_joined(models, tmp_path, monkeypatch) -> None:
    """The other race of opening one new cache together: the other rank writes identity.json and its first data
    files right after this one looked for identity.json and before it lists the folder (CI failed on it)."""
    sam, text_encoder = models
    identity = cache_identity(sam, text_encoder, max_text_tokens=8, stage_source="teacher")
    root = tmp_path / "c"
    FeatureCache(root, identity)  # what the other rank has written by the time this one lists the folder
    (root / "images").mkdir()
    real_is_file, looks = Path.is_file, []

    def first_look_misses(path: Path) -> bool:
        if path == root / "identity.json" and not looks:
            looks.append(path)
            return False  # this rank looked just before the other rank's identity.json appeared
        return real_is_file(path)

    monkeypatch.setattr(Path, "is_file", first_look_misses)
    assert FeatureCache(root, identity).dir == root and looks
    monkeypatch.setattr(Path, "is_file", real_is_file)
    (root / "identity.json").unlink()  # a folder that really holds no identity is still refused
    with pytest.raises(CheckpointMismatchError, match="holds no feature-cache identity.json"):
        FeatureCache(root, identity)


def test_build_resumes_and_skips_cached_entries(world, models, tmp_path) -> None:
    sam, text_encoder = models
    queries = _queries(world)
    assert len(queries) >= 5
    n_images = len({q.sample_id for q in queries})
    prompts = PromptSet.load()
    identity = cache_identity(sam, text_encoder, max_text_tokens=8, mllm=ScriptedMLLM(), prompts=prompts)

    # 1) interrupted after the first batch of 2 queries
    mllm, counting_sam, counting_text = ScriptedMLLM(), CountingSAM(sam, fail_after=1), CountingTextEncoder(text_encoder)
    cache = FeatureCache(tmp_path / "c", identity)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cache, queries, sam=counting_sam, text_encoder=counting_text, mllm=mllm, prompts=prompts,
                    batch_size=2, progress=False)
    assert len(FeatureCache(tmp_path / "c", identity)) == 2 and mllm.queries == 2

    # 2) resume: only the remaining queries reach the models
    mllm, counting_sam, counting_text = ScriptedMLLM(), CountingSAM(sam), CountingTextEncoder(text_encoder)
    cache = FeatureCache(tmp_path / "c", identity)
    keys = build_cache(cache, queries, sam=counting_sam, text_encoder=counting_text, mllm=mllm, prompts=prompts,
                       batch_size=2, progress=False)
    assert mllm.queries == len(queries) - 2
    assert counting_text.texts == 4 * (len(queries) - 2)  # 4 phrases per query
    first_two_images = len({q.sample_id for q in queries[:2]})
    assert counting_sam.images == n_images - first_two_images  # cached images are not encoded again
    assert len(cache) == len(queries)

    # 3) a complete rerun computes nothing
    mllm, counting_sam, counting_text = ScriptedMLLM(), CountingSAM(sam), CountingTextEncoder(text_encoder)
    again = build_cache(FeatureCache(tmp_path / "c", identity), queries, sam=counting_sam, text_encoder=counting_text,
                        mllm=mllm, prompts=prompts, batch_size=2, progress=False)
    assert again == keys
    assert (mllm.queries, counting_sam.images, counting_text.texts) == (0, 0, 0)
