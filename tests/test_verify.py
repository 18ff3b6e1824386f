"""llavaseg-verify and its helpers: schema-constrained decoding, self-consistency votes, beam candidates, the
MLLM's yes/no check on a highlighted view."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llavaseg.attributes import Attributes, parse_attributes
from llavaseg.method.candidates import majority_attributes, sample_stage_candidates
from llavaseg.method.constrained import TokenTrie, attribute_answers, attribute_constraint
from llavaseg.models.mllm import Decoding
from llavaseg.prompting import PromptSet
from llavaseg.views import VIEW_FILL, highlight_view

SCHEMA = {"color": ["red", "blue"], "location": ["top left", "right"], "size": ["small"], "shape": ["circle"]}


def test_attribute_answers_and_trie_by_hand() -> None:
    answers = attribute_answers(SCHEMA)
    assert len(answers) == 2 * 2 * 1 * 1
    assert answers[0] == "color : red ; location : top left ; size : small ; shape : circle"
    trie = TokenTrie([[1, 2, 3], [1, 2, 4], [1, 5]])
    assert trie.next_tokens([]) == ([1], False)
    assert sorted(trie.next_tokens([1])[0]) == [2, 5]
    assert trie.next_tokens([1, 5]) == ([], True)
    assert trie.next_tokens([9]) == ([], False)


def test_majority_is_per_key_with_the_earliest_breaking_ties() -> None:
    parsed = [Attributes(color="red", location="top"), Attributes(color="blue", location="left"),
              Attributes(color="blue", location="top"), Attributes(color="red", location="left")]
    assert dict(majority_attributes(parsed).items()) == {"color": "red", "location": "top"}
    parsed.append(Attributes(color="blue"))
    assert dict(majority_attributes(parsed).items()) == {"color": "blue", "location": "top"}


@pytest.fixture(scope="module")
def tiny(fast_tiny_models):
    from llavaseg.bench.runner import shared_components

    return shared_components("tiny", "cpu")


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)


def test_constrained_answers_of_a_random_model_always_parse_into_the_schema(tiny) -> None:
    from llavaseg.tinyworld.vocab import ATTRIBUTE_VALUES

    prompts = PromptSet.load()
    images = [_image(i) for i in range(3)]
    _, state = tiny.mllm.begin(images, [prompts.render("reason", query="the red circle")] * 3)
    constraint = attribute_constraint(tiny.mllm.tokenizer, ATTRIBUTE_VALUES)
    free = tiny.mllm.follow_up(tiny.mllm.fork(state), [prompts.render("attributes", description="circle")] * 3,
                               max_new_tokens=24)
    held = tiny.mllm.follow_up(state, [prompts.render("attributes", description="circle")] * 3, max_new_tokens=24,
                               decoding=Decoding(constraint=constraint))
    assert not any(parse_attributes(answer).method == "key_value" for answer in free)  # a random model's noise
    for answer in held:
        parsed = dict(parse_attributes(answer).attributes.items())
        assert set(parsed) == set(ATTRIBUTE_VALUES) and all(v in ATTRIBUTE_VALUES[k] for k, v in parsed.items())


def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone(tiny) -> None:
    prompts = PromptSet.load()
    image = _image(1)
    runs = []
    for _ in range(2):
        _, state = tiny.mllm.begin([image], [prompts.render("reason", query="the thing")])
        torch.manual_seed(123)
        before = torch.rand(1)
        torch.manual_seed(123)
        runs.append(tiny.mllm.follow_up(state, [prompts.render("attributes", description="x")],
                                        decoding=Decoding(sample=True, seed=7)))
        assert torch.equal(torch.rand(1), before)  # sampling drew from its own generator
    assert runs[0] == runs[1]


def test_choice_probabilities_are_a_softmax_of_the_first_answer_tokens(tiny) -> None:
    mllm = tiny.mllm
    image = _image(2)
    prompt = "is this the object ?"
    probabilities = mllm.choice_probabilities([image], [prompt], ("yes", "no"))
    assert probabilities.shape == (1, 2) and abs(probabilities.sum() - 1) < 1e-6
    from PIL import Image

    inputs = mllm.processor(images=[Image.fromarray(image)], text=[mllm.render_chat([], prompt)], return_tensors="pt")
    with torch.inference_mode():
        logits = mllm.model(**inputs).logits[0, -1]
    ids = [mllm.tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in ("yes", "no")]
    assert np.allclose(probabilities[0], torch.softmax(logits[ids], -1).numpy(), atol=1e-6)


def test_highlight_view_keeps_the_region_and_dims_the_rest() -> None:
    image = np.full((4, 5, 3), 200, np.uint8)
    mask = np.zeros((4, 5), bool)
    mask[1, 2] = True
    view = highlight_view(image, mask, dim=0.25)
    assert (view[1, 2] == 200).all()
    assert (view[0, 0] == np.rint(200 * 0.25 + np.array(VIEW_FILL) * 0.75)).all()


def test_candidates_and_the_verify_route(tiny) -> None:
    from llavaseg.routes.verify import VerifyRoute

    prompts = PromptSet.load()
    images, queries = [_image(3), _image(4)], ["the red circle", "the small square"]
    stages = sample_stage_candidates(tiny.mllm, prompts, images, queries, samples=2, seed=1, vote=True, beams=3)
    assert all(len(s.answers) == 1 + 2 + 3 and len(s.attribute_sets) == len(s.votes) for s in stages)
    common = (tiny.mllm, tiny.sam, tiny.text_encoder, tiny.adapters, prompts)
    first = VerifyRoute(*common, threshold=0.0, samples=0, beams=3, with_answer=False)(images, queries)
    never = VerifyRoute(*common, threshold=1.0, margin=0.0, samples=0, beams=3, with_answer=False)(images, queries)
    plain = VerifyRoute(*common, verify=False, samples=0, beams=0, with_answer=False)(images, queries)
    stubborn = VerifyRoute(*common, threshold=1.0, margin=1.0, samples=0, beams=3, with_answer=False)(images, queries)
    assert all(r.raw_outputs["kept"] == "0" for r in stubborn)  # no margin is ever reached: the first stays
    for a, b, c in zip(first, never, plain):
        assert a.raw_outputs["kept"] == "0" and np.array_equal(a.mask, c.mask)  # threshold 0: the first confirms
        candidates = json.loads(b.raw_outputs["candidates"])
        p_yes = [c["p_yes"] for c in candidates]
        assert None not in p_yes and int(b.raw_outputs["kept"]) == int(np.argmax(p_yes))  # none confirmed: best
        assert float(a.raw_outputs["mllm_calls"]) == 1 + 1 + 1 + 1  # stage 1, stage 2, beams, one check
        assert float(b.raw_outputs["mllm_calls"]) == 1 + 1 + 1 + len(candidates)


def test_a_sampled_answer_does_not_depend_on_the_rest_of_its_batch(tiny) -> None:
    """Each conversation samples from its own generator: alone, first or second in a batch, the same answer."""
    prompts = PromptSet.load()
    images, texts = [_image(1), _image(2)], ["the thing", "the other thing"]

    def sampled(order: list[int]) -> list[str]:
        reason = [prompts.render("reason", query=texts[i]) for i in order]
        _, state = tiny.mllm.begin([images[i] for i in order], reason)
        return tiny.mllm.follow_up(state, [prompts.render("attributes", description="x")] * len(order),
                                   max_new_tokens=12, decoding=Decoding(sample=True, seed=3))

    together, swapped, alone = sampled([0, 1]), sampled([1, 0]), sampled([0])
    assert together[0] == swapped[1] == alone[0] and together[1] == swapped[0]
    first_turn = tiny.mllm.begin([images[0]], [prompts.render("reason", query=texts[0])])[1]
    ask = [prompts.render("attributes", description="x")]
    other_seeds = {tuple(tiny.mllm.follow_up(tiny.mllm.fork(first_turn), ask, max_new_tokens=12,
                                             decoding=Decoding(sample=True, seed=seed)))
                   for seed in range(4)}
    assert len(other_seeds) > 1  # the seed matters: a random tiny model's answers vary between seeds


def test_row_sampler_draws_from_the_temperature_softmax() -> None:
    from llavaseg.models.sampling import RowSampler

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    for temperature in (1.0, 0.5):
        draws = [int(RowSampler([seed], temperature)(torch.zeros(1, 1, dtype=torch.long), logits).argmax())
                 for seed in range(4000)]
        expected = torch.softmax(logits[0] / temperature, -1).numpy()
        observed = np.bincount(draws, minlength=3) / len(draws)
        assert np.abs(observed - expected).max() < 0.03, (temperature, observed, expected)
