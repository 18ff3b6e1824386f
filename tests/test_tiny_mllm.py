"""The shipped tiny-world MLLM: loads offline as a frozen transformers model and does both chain-of-thought stages.

Also checks that the training encoding is the token layout ``FrozenMLLM`` feeds at inference, and that training
is deterministic and resumable (tiny configs, a few seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llavaseg.attributes import parse_attributes
from llavaseg.models.mllm import FrozenMLLM
from llavaseg.prompting import PromptSet
from llavaseg.recipes.mllm_data import (
    IGNORE,
    TINY_WORLD_MLLM_SPEC,
    ChatEncoder,
    dialogue_turns,
    format_attributes,
    pixel_values,
    reason_turns,
)
from llavaseg.tinyworld.generate import iter_scenes

WEIGHTS = Path(__file__).resolve().parents[1] / "llavaseg" / "weights" / "tinyworld"
MLLM_DIR = WEIGHTS / "mllm"


@pytest.fixture(scope="module")
def mllm() -> FrozenMLLM:
    if not (MLLM_DIR / "config.json").is_file():
        pytest.fail(f"shipped tiny-world MLLM missing at {MLLM_DIR}")
    return FrozenMLLM.from_pretrained(MLLM_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def prompts() -> PromptSet:
    return PromptSet.load()


def val_queries(count: int) -> list[tuple[np.ndarray, object]]:
    """The first ``count`` val-split queries, generated now (held out from training)."""
    out = []
    for _, image, queries, _ in iter_scenes("val", seed=0, count=20):
        out += [(np.asarray(image), q) for q in queries]
        if len(out) >= count:
            break
    return out[:count]


def test_loads_frozen_small_and_offline(mllm: FrozenMLLM) -> None:
    assert all(not p.requires_grad for p in mllm.model.parameters())
    assert not mllm.model.training
    assert type(mllm.model).__name__ == "LlavaForConditionalGeneration"
    assert mllm.processor.chat_template
    size = sum(f.stat().st_size for f in MLLM_DIR.iterdir() if f.is_file())
    assert size < 12 * 2**20


def test_card_numbers_hold_on_a_fresh_measurement(mllm: FrozenMLLM, prompts: PromptSet) -> None:
    """The card's val figures (whole split) and a re-measurement of the shipped files on its first 10 scenes.

    Measured at release on all 214 val queries: stage-1 exact match 0.949, attribute accuracy 0.922 (issue #4
    asks >= 0.9 for both); on the first 10 scenes (22 queries) 0.864 and 0.898. The card floors are the issue's
    targets; the fresh floors catch regressions such as a broken chat template or mismatched processor, which
    drop both to ~0.
    """
    from llavaseg.recipes.mllm_data import evaluate_mllm

    card = json.loads((WEIGHTS / "mllm_card.json").read_text())
    assert card["val"]["queries"] > 200
    assert card["val"]["stage1_exact_match"] >= 0.9
    assert card["val"]["attribute_accuracy"] >= 0.9
    fresh = evaluate_mllm(mllm, prompts, "val", 0, count=10)
    assert fresh["stage1_exact_match"] >= 0.8
    assert fresh["attribute_accuracy"] >= 0.8
    assert fresh["attribute_key_value_parse_rate"] == 1.0


def test_two_stage_chat_on_fresh_val_queries(mllm: FrozenMLLM, prompts: PromptSet) -> None:
    batch = val_queries(10)
    images = [image for image, _ in batch]
    raw, state = mllm.begin(images, [prompts.render("reason", query=q.text) for _, q in batch])
    follow = [prompts.render("attributes", description=d.strip(), query=q.text) for d, (_, q) in zip(raw, batch)]
    answers = mllm.follow_up(state, follow)
    stage1 = np.mean([d.strip() == q.description for d, (_, q) in zip(raw, batch)])
    parsed = [parse_attributes(a) for a in answers]
    colour = np.mean([p.attributes.color == q.attributes["color"] for p, (_, q) in zip(parsed, batch)])
    assert stage1 >= 0.8, list(zip([q.text for _, q in batch], raw))
    assert all(p.method == "key_value" for p in parsed), answers
    assert colour >= 0.7, answers  # 0.9 measured on these 10 (0.925 over val); a broken chat drops it to ~0
    # The same chat through ``converse`` (prompts fixed up front, batch of one reusing the KV cache) agrees.
    image, q = batch[0]
    again = mllm.converse([image], [[prompts.render("reason", query=q.text), follow[0]]])[0]
    assert again == [raw[0].strip(), answers[0]]


def test_training_encoding_matches_inference_layout(mllm: FrozenMLLM, prompts: PromptSet) -> None:
    encoder = ChatEncoder(mllm.processor, TINY_WORLD_MLLM_SPEC.num_image_tokens)
    (_, image, queries, dialogue), = list(iter_scenes("val", seed=0, count=1))
    for turns in (reason_turns(prompts, queries[0]), dialogue_turns(dialogue)):
        ids, labels = encoder.encode(turns)
        full = mllm.processor(images=[image], text=[encoder.render(turns)], return_tensors="pt")
        assert full["input_ids"][0].tolist() == ids
        assert mllm.tokenizer.unk_token_id not in ids
        # Loss falls exactly on each answer and its closing </s>.
        supervised, segments = [t for t in labels if t != IGNORE], [[]]
        for token in supervised:
            segments[-1].append(token)
            if token == mllm.tokenizer.eos_token_id:
                segments.append([])
        assert [mllm.tokenizer.decode(s[:-1]) for s in segments[:-1]] == [a for _, a in turns]
        # Training pixels are the processor's own.
        assert (pixel_values(mllm.processor, [np.asarray(image)]) == full["pixel_values"]).all()
    assert parse_attributes(format_attributes(queries[0].attributes)).attributes.model_dump() == queries[0].attributes


def test_training_is_deterministic_and_resumable(tmp_path: Path) -> None:
    from llavaseg.recipes.train_mllm import TrainConfig, train_mllm, weights_digest

    # eval_every=2: the mid-run val measurement (a deep copy of the model in training) runs too.
    config = TrainConfig(align_steps=2, align_batch=4, align_pool=8, tune_steps=2, tune_scenes=2, warmup=2,
                         checkpoint_every=1, log_every=1, eval_every=2, eval_scenes=1)
    quiet = lambda *_: None  # noqa: E731
    straight, _, _ = train_mllm(config, tmp_path / "a", log=quiet)
    train_mllm(config, tmp_path / "b", log=quiet, stop_after=3)  # "killed" after one tune step
    resumed, _, record = train_mllm(config, tmp_path / "b", log=quiet)
    assert record["stage"] == "done"
    assert weights_digest(straight) == weights_digest(resumed)


def test_identity_does_not_depend_on_where_the_model_lives(mllm: FrozenMLLM, tmp_path: Path) -> None:
    """The feature cache and the shipped <SEG> model record this identity; copying the directory keeps it."""
    import shutil

    moved = shutil.copytree(MLLM_DIR, tmp_path / "elsewhere" / MLLM_DIR.name)
    assert FrozenMLLM.from_pretrained(moved, local_files_only=True).identity() == mllm.identity()


def test_answer_positions_are_where_each_answer_is_decided() -> None:
    from llavaseg.recipes.mllm_data import answer_positions

    labels = [IGNORE, IGNORE, 7, 3, IGNORE, IGNORE, IGNORE, 9, 8, 3]
    assert answer_positions(labels) == [1, 6]  # the tokens *before* each labelled run
    assert answer_positions([IGNORE, IGNORE]) == []


def test_object_targets_name_the_object_in_cell_target_columns() -> None:
    from llavaseg.recipes.mllm_data import AUX_CLASSES, object_targets
    from llavaseg.tinyworld.scenes import Scene, SceneObject
    from llavaseg.tinyworld.vocab import COLORS, SHAPES, SIZES

    blob = SceneObject(shape="triangle", color="yellow", size="large", cell=(2, 1), location="bottom",
                       center=(64, 107), radius=15.0, rgb=(235, 205, 25), polygon=[[64, 87], [81, 117], [47, 117]],
                       bbox=(47, 87, 82, 118))
    scene = Scene(background=(220, 220, 220), texture_seed=1, objects=[blob], focus_index=0)
    assert list(AUX_CLASSES) == ["present", "color", "shape", "size", "cell"]
    # yellow is COLORS[3], triangle SHAPES[2], large SIZES[1]; row 2, column 1 of the 3x3 grid is cell 7.
    assert (COLORS.index("yellow"), SHAPES.index("triangle"), SIZES.index("large")) == (3, 2, 1)
    assert object_targets(scene, 0).tolist() == [IGNORE, 3, 2, 1, 7]


def test_tune_batch_probes_each_answer_for_the_object_it_is_about(prompts: PromptSet) -> None:
    from llavaseg.recipes.mllm_data import build_tiny_world_mllm
    from llavaseg.recipes.train_mllm import TrainConfig, tune_batch
    from llavaseg.tinyworld.vocab import COLORS, LOCATION_GRID, SHAPES, SIZES

    config = TrainConfig(tune_scenes=2, reason_per_scene=2)
    _, processor = build_tiny_world_mllm(prompts)
    encoder = ChatEncoder(processor, TINY_WORLD_MLLM_SPEC.num_image_tokens)
    batch = tune_batch(processor, encoder, prompts, config, step=5)
    ids, labels, positions, referent = batch["input_ids"], batch["labels"], batch["answer_positions"], batch["referent"]
    assert positions.shape == (6, 5) and referent.shape == (6, 5, 5)  # 2 scenes x (2 reasoning + 1 dialogue chat)
    tokens = processor.tokenizer.convert_ids_to_tokens
    checked = {"reason": 0, "dialogue": 0}
    for row in range(6):
        real = [int(p) for p in positions[row] if p > 0]
        assert len(real) == (5 if row % 3 == 2 else 2)
        assert (referent[row, len(real):] == IGNORE).all()  # padding is never probed
        for turn, position in enumerate(real):
            # The probed position is the last prompt token; the next one opens the answer.
            assert labels[row, position] == IGNORE and labels[row, position + 1] == ids[row, position + 1]
            target = referent[row, turn]
            if target[1] == IGNORE:
                continue
            colour, shape, size = COLORS[int(target[1])], SHAPES[int(target[2])], SIZES[int(target[3])]
            location = LOCATION_GRID[int(target[4]) // 3][int(target[4]) % 3]
            end = position + 1 + int((labels[row, position + 1:] == processor.tokenizer.eos_token_id).int().argmax())
            answer = tokens(ids[row, position + 1:end].tolist())
            if row % 3 == 2:  # dialogue: the answer names one of the object's own attributes
                assert set(answer) <= {colour, shape, size, *location.split(), "a", "an"}, (answer, target)
                checked["dialogue"] += 1
            elif turn == 0:  # stage 1 answers with the referent's shape; stage 2 lists its attributes
                assert answer == [shape]
                checked["reason"] += 1
            else:
                assert " ".join(answer) == format_attributes(
                    {"color": colour, "location": location, "size": size, "shape": shape})
    assert checked["reason"] == 4 and checked["dialogue"] >= 4


def test_referent_probes_learn_from_language_model_states(prompts: PromptSet) -> None:
    """Deep supervision trains the language model itself, not only the probes: a few steps cut the probe loss
    and change the layers below the probed one (the layer above gets no gradient from it)."""
    from llavaseg.recipes.mllm_data import build_tiny_world_mllm
    from llavaseg.recipes.train_mllm import ReferentProbes, TrainConfig, tune_batch

    torch.manual_seed(0)
    model, processor = build_tiny_world_mllm(prompts)
    encoder = ChatEncoder(processor, TINY_WORLD_MLLM_SPEC.num_image_tokens)
    batch = tune_batch(processor, encoder, prompts, TrainConfig(tune_scenes=2), step=0)
    probes = ReferentProbes(TINY_WORLD_MLLM_SPEC.text_hidden, [2])
    trainable = [*model.model.language_model.parameters(), *probes.parameters()]
    optimizer = torch.optim.Adam(trainable, lr=3e-3)
    layers = model.model.language_model.layers
    before = [layer.self_attn.q_proj.weight.detach().clone() for layer in layers]
    losses = []
    model.train()
    for _ in range(15):
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], output_hidden_states=True, use_cache=False)
        loss, _ = probes(output.hidden_states, batch["answer_positions"], batch["referent"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    changed = [not torch.equal(b, layer.self_attn.q_proj.weight) for b, layer in zip(before, layers)]
    assert changed == [True, True, False, False]  # probed after layer 2 of 4
