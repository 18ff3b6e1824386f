"""Region questions for the tiny-world MLLM: what a real MLLM already does and the ``llavaseg-verify`` route needs.

A real MLLM can look at an image with one region highlighted and say whether that is the object a query means,
or what colour it is. The tiny MLLM learns it in a third recipe stage (``region``): chats on a *highlighted view*
of a scene (:func:`llavaseg.views.highlight_view`: one object as drawn, the rest dimmed toward grey), asking the
``verify`` prompt about a query (``yes`` when the query's target is highlighted, ``no`` for another object,
preferring one the query could be confused with) and what colour and shape the highlighted object has, mixed
with the stage and dialogue chats of the ``tune`` stage so those abilities are kept.

The stage may start from an already trained model (``init_from``, e.g. the shipped one): the vocabulary then
grows by the new prompt's words, and :func:`remap_vocabulary` carries every known word's embedding and
output row over by the word itself, so nothing the model knew moves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llavaseg.data.reasonseg import polygons_to_mask
from llavaseg.prompting import PromptSet
from llavaseg.tinyworld.queries import TargetQuery
from llavaseg.tinyworld.scenes import Scene
from llavaseg.views import highlight_view

__all__ = ["REGION_QUESTIONS", "object_mask", "highlighted_object", "highlighted_other", "region_turns",
           "region_view", "remap_vocabulary", "evaluate_region"]

REGION_QUESTIONS = (("what color is the highlighted object ?", "color"),
                    ("what shape is the highlighted object ?", "shape"))


def object_mask(scene: Scene, index: int, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of object ``index`` drawn as the data set draws its ground truth."""
    polygon = [{"label": "target", "points": scene.objects[index].polygon}]
    return polygons_to_mask(polygon, *shape) == 1


def _distractors(scene: Scene, query: TargetQuery) -> tuple[list[int], list[int]]:
    """The objects other than the query's target, and those of them sharing its shape."""
    others = [i for i in range(len(scene.objects)) if i != query.target_index]
    target_shape = scene.objects[query.target_index].shape
    return others, [i for i in others if scene.objects[i].shape == target_shape]


def highlighted_object(scene: Scene, query: TargetQuery, rng: np.random.Generator) -> int:
    """The target half of the time; otherwise another object, one sharing the target's shape when there is one
    (the candidates a wrong stage-2 location leads the adapters to)."""
    others, confusable = _distractors(scene, query)
    if not others or rng.random() < 0.5:
        return query.target_index
    pool = confusable if confusable and rng.random() < 0.75 else others
    return int(pool[int(rng.integers(len(pool)))])


def region_turns(prompts: PromptSet, scene: Scene, query: TargetQuery, index: int) -> list[tuple[str, str]]:
    """The chat on the view with object ``index`` highlighted: verify, then its colour and shape."""
    obj = scene.objects[index]
    return [(prompts.render("verify", query=query.text), "yes" if index == query.target_index else "no"),
            *[(question, getattr(obj, key)) for question, key in REGION_QUESTIONS]]


def region_view(image: np.ndarray, scene: Scene, index: int) -> np.ndarray:
    return highlight_view(image, object_mask(scene, index, image.shape[:2]))


def remap_vocabulary(old_model: Any, old_tokenizer: Any, new_model: Any, new_tokenizer: Any) -> Any:
    """``new_model`` with every weight of ``old_model``; input embeddings and LM-head rows mapped word by word
    (a word new to the vocabulary keeps ``new_model``'s seeded initial row)."""
    old_vocab, new_vocab = old_tokenizer.get_vocab(), new_tokenizer.get_vocab()
    state = {k: v for k, v in old_model.state_dict().items()}
    new_state = new_model.state_dict()
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        rows = new_state[key].clone()
        for word, new_id in new_vocab.items():
            if word in old_vocab:
                rows[new_id] = state[key][old_vocab[word]]
        state[key] = rows
    missing = set(new_state) - set(state)
    if missing:
        raise ValueError(f"the old model lacks {sorted(missing)[:3]}: not the same architecture")
    new_model.load_state_dict(state)
    return new_model


@torch.inference_mode()
def evaluate_region(mllm: Any, prompts: PromptSet, split: str = "val", seed: int = 0, count: int | None = None,
                    batch_size: int = 32) -> dict[str, float]:
    """The region chats as trained (``FrozenMLLM.converse``, each turn continuing the model's own answers): verify
    accuracy with the target highlighted (``yes``) and with another object highlighted (``no``, one the query
    could be confused with when there is one), then the colour and shape answers about that object."""
    from llavaseg.tinyworld.generate import iter_scenes

    rng = np.random.default_rng([seed, 17])
    chats: list[tuple[np.ndarray, list[tuple[str, str]]]] = []
    for scene, image, queries, _ in iter_scenes(split, seed, count):
        array = np.asarray(image)
        for query in queries:
            others, _ = _distractors(scene, query)
            for index in [query.target_index, *([highlighted_other(scene, query, rng)] if others else [])]:
                chats.append((region_view(array, scene, index), region_turns(prompts, scene, query, index)))
    hits: dict[str, list[int]] = {}
    kinds = ("verify", *(key for _, key in REGION_QUESTIONS))
    for start in range(0, len(chats), batch_size):
        chunk = chats[start: start + batch_size]
        replies = mllm.converse([view for view, _ in chunk], [[q for q, _ in turns] for _, turns in chunk])
        for (_, turns), answers in zip(chunk, replies):
            for kind, (_, want), got in zip(kinds, turns, answers):
                name = f"verify_{want}" if kind == "verify" else kind
                hits.setdefault(name, []).append(got.strip() == want)
    return {f"region_{kind}_accuracy": float(np.mean(values)) for kind, values in sorted(hits.items())}


def highlighted_other(scene: Scene, query: TargetQuery, rng: np.random.Generator) -> int:
    """Another object than the target, one sharing its shape when there is one (for the ``no`` case)."""
    others, same = _distractors(scene, query)
    pool = same or others
    return int(pool[int(rng.integers(len(pool)))])
