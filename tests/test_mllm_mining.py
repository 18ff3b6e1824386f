"""The region stage's mined confusions: which object an answer names, what is mined, and the keyed pool file."""

from __future__ import annotations

import json

import pytest

from llavaseg.prompting import PromptSet
from llavaseg.recipes.mllm_mining import MinedConfusion, mine_confusions, mined_pool, pointed_object
from llavaseg.tinyworld.generate import iter_scenes


class NamesTheFirstObject:
    """TEST DOUBLE for the frozen MLLM (the interface ``run_stages`` uses): stage 2 always describes object 0 of
    the scene, whatever the query; it fails if asked more than it was scripted for."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = list(answers)

    def begin(self, images, prompts):
        return ["shape"] * len(prompts), len(prompts)

    def follow_up(self, state, prompts):
        if len(self.answers) < state:
            raise AssertionError("the model was asked again")
        out, self.answers = self.answers[:state], self.answers[state:]
        return out


def _scenes(start: int, count: int):
    return list(iter_scenes("train", 0, count, start=start))


def _script(scenes) -> list[str]:
    return [" ; ".join(f"{k} : {v}" for k, v in scene.objects[0].attributes().items())
            for scene, _, queries, _ in scenes for _ in queries]


def test_the_named_object_is_the_best_match_and_ties_name_none() -> None:
    scene = _scenes(1_000_000, 1)[0][0]  # objects: 0 yellow diamond bottom; 1, 2 large red diamonds; ...
    for index, obj in enumerate(scene.objects):
        assert pointed_object(scene, obj.attributes()) == index
    assert pointed_object(scene, {}) is None
    assert pointed_object(scene, {"color": "red", "size": "large", "shape": "diamond"}) is None  # objects 1 and 2
    # a wrong location breaks the tie, and among equal counts the location match wins
    assert pointed_object(scene, {"color": "red", "location": "bottom left", "size": "large"}) == 2
    assert pointed_object(scene, {"color": "yellow", "location": "top right"}) == 4


def test_mined_confusions_are_the_queries_whose_target_is_not_the_named_object(tmp_path) -> None:
    scenes = _scenes(1_000_000, 4)
    expected = [MinedConfusion(scene=1_000_000 + s, query=q, wrong=0)
                for s, (_, _, queries, _) in enumerate(scenes) for q, query in enumerate(queries)
                if query.target_index != 0]
    asked = sum(len(queries) for _, _, queries, _ in scenes)
    assert 0 < len(expected) < asked  # both cases occur
    mined, n = mine_confusions(NamesTheFirstObject(_script(scenes)), PromptSet.load(), 0, 1_000_000, 4,
                               batch_size=3)
    assert (mined, n) == (expected, asked)

    pool = mined_pool(tmp_path, NamesTheFirstObject(_script(scenes)), "digest-a", PromptSet.load(), 0, 1_000_000, 4,
                      log=lambda _: None)
    assert pool == expected and json.loads((tmp_path / "mined.json").read_text())["asked"] == asked
    # the same key is read back without asking the model; another model's key mines again
    assert mined_pool(tmp_path, NamesTheFirstObject([]), "digest-a", PromptSet.load(), 0, 1_000_000, 4,
                      log=lambda _: None) == expected
    with pytest.raises(AssertionError, match="asked again"):
        mined_pool(tmp_path, NamesTheFirstObject([]), "digest-b", PromptSet.load(), 0, 1_000_000, 4,
                   log=lambda _: None)


def test_at_rate_one_every_region_chat_is_a_mined_pair() -> None:
    from llavaseg.recipes.mllm_data import TINY_WORLD_MLLM_SPEC, ChatEncoder, build_tiny_world_mllm
    from llavaseg.recipes.train_mllm import TrainConfig, tune_batch

    prompts = PromptSet.load()
    _, processor = build_tiny_world_mllm(prompts)
    encoder = ChatEncoder(processor, TINY_WORLD_MLLM_SPEC.num_image_tokens)
    config = TrainConfig(tune_scenes=2, region_per_scene=1, reason_per_scene=2)
    plain = tune_batch(processor, encoder, prompts, config, 0, region=True)
    mined = [MinedConfusion(scene=1_000_000, query=0, wrong=4)]  # the shipped model's slip on this scene
    paired = tune_batch(processor, encoder, prompts, config.model_copy(update={"region_mined_rate": 1.0}), 0,
                        region=True, mined=mined)
    per_scene = config.reason_per_scene + 1  # reasoning chats + one dialogue chat
    assert plain["input_ids"].shape[0] == 2 * (per_scene + 1)
    assert paired["input_ids"].shape[0] == 2 * (per_scene + 2)  # each region chat became a no/yes pair
    tokenizer = processor.tokenizer
    verdicts = [tokenizer.decode([int(t) for t in labels[labels >= 0][:1]]) for labels in paired["labels"]]
    assert verdicts[per_scene: per_scene + 2] == ["no", "yes"]


def test_a_mining_rate_without_a_model_to_mine_is_refused() -> None:
    from pydantic import ValidationError

    from llavaseg.recipes.train_mllm import TrainConfig

    with pytest.raises(ValidationError, match="needs init_from"):
        TrainConfig(region_mined_rate=0.5, mined_scenes=10)
    with pytest.raises(ValidationError, match="mined_scenes > 0"):
        TrainConfig(region_mined_rate=0.5, init_from="some/mllm")
    assert TrainConfig(region_mined_rate=0.5, mined_scenes=10, init_from="some/mllm").region_mined_rate == 0.5


def test_region_start_moves_only_the_region_stage_to_later_scenes() -> None:
    """A continued region stage (``region_start``) trains on scenes its init model never saw; tune is unmoved."""
    import torch

    from llavaseg.recipes.mllm_data import TINY_WORLD_MLLM_SPEC, ChatEncoder, build_tiny_world_mllm
    from llavaseg.recipes.train_mllm import TrainConfig, tune_batch

    prompts = PromptSet.load()
    _, processor = build_tiny_world_mllm(prompts)
    encoder = ChatEncoder(processor, TINY_WORLD_MLLM_SPEC.num_image_tokens)
    config = TrainConfig(tune_scenes=2, region_per_scene=1, reason_per_scene=2)
    moved = config.model_copy(update={"region_start": 10})
    first_image = 0  # row 0 is the first scene's first reasoning chat, on the plain scene image
    later = tune_batch(processor, encoder, prompts, moved, 0, region=True)["pixel_values"][first_image]
    scene_ten = tune_batch(processor, encoder, prompts, config, 5, region=True)["pixel_values"][first_image]
    scene_zero = tune_batch(processor, encoder, prompts, config, 0, region=True)["pixel_values"][first_image]
    assert torch.equal(later, scene_ten) and not torch.equal(later, scene_zero)
    tune_moved = tune_batch(processor, encoder, prompts, moved, 0)
    tune_plain = tune_batch(processor, encoder, prompts, config, 0)
    assert all(torch.equal(tune_moved[key], tune_plain[key]) for key in tune_plain)
