"""Shared pieces of the tiny-world MLLM recipe: architecture, vocabulary, chat encoding, targets, evaluation.

The tiny-world MLLM is a real ``LlavaForConditionalGeneration`` trained from scratch on generated scenes and then
shipped frozen. Training must reproduce, token for token, what :class:`~llavaseg.models.mllm.FrozenMLLM` feeds
the model at inference (the llava-1.5 chat template, the stage-2 turn continuing stage 1's ids, answers closed
by ``</s>``), so the encoding lives here and is checked against the processor in ``tests/test_tiny_mllm.py``.

Why the architecture looks the way it does: scenes are a 3x3 grid of cells on a 128 px image. At
``image_size=96`` and ``patch_size=16`` every grid cell is exactly 2x2 ViT patches (36 image tokens), so each
object covers a few patches and the shared patch embedding sees it at several offsets (the coarser layout
that was tried first is in ``docs/tinyworld.md``). The vision side is first taught to put, into *every*
projected token, the presence, colour, shape and
size of the object of its grid cell and the cell's index (throwaway heads, :func:`cell_targets`), so the language
model only has to *read and reason*, not see.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from llavaseg.attributes import ATTRIBUTE_KEYS
from llavaseg.method.stages import run_stages
from llavaseg.models.tiny_llava import TinyLlavaSpec, build_tiny_llava, words_of
from llavaseg.prompting import PromptSet
from llavaseg.tinyworld.queries import DialogueItem, TargetQuery
from llavaseg.tinyworld.scenes import Scene
from llavaseg.tinyworld.vocab import COLORS, GRID, SHAPES, SIZES, VOCAB

__all__ = [
    "TINY_WORLD_MLLM_SPEC",
    "ATTRIBUTE_KEYS",
    "AUX_CLASSES",
    "IGNORE",
    "mllm_words",
    "build_tiny_world_mllm",
    "pixel_values",
    "ChatEncoder",
    "format_attributes",
    "reason_turns",
    "dialogue_turns",
    "cell_targets",
    "object_targets",
    "answer_positions",
    "evaluate_mllm",
]

TINY_WORLD_MLLM_SPEC = TinyLlavaSpec(
    image_size=96,  # 128 px scenes resized so that each of the 3x3 grid cells is exactly 2x2 patches of 16 px
    patch_size=16,
    vision_hidden=128,
    vision_layers=3,
    vision_heads=4,
    text_hidden=128,
    text_layers=4,
    text_heads=4,
    text_intermediate=384,
    max_positions=256,  # the longest conversation (two stage turns, or five dialogue turns) is < 150 tokens
)


IGNORE = -100
"""Label of positions without a loss (prompt tokens, padding, attributes of empty cells)."""

AUX_CLASSES: dict[str, int] = {"present": 2, "color": len(COLORS), "shape": len(SHAPES), "size": len(SIZES),
                               "cell": GRID * GRID}
"""Per-image-token targets of the throwaway alignment heads (column order of :func:`cell_targets`)."""


def mllm_words(prompts: PromptSet) -> list[str]:
    """The closed vocabulary: every tiny-world word plus the words of the prompt templates, sorted.

    Sorted so the token ids do not depend on set iteration order (reproducible weights). Placeholder names
    (``{query}``) are not words the model ever sees, so braces are removed first.
    """
    template_text = " ".join(t.text for t in prompts.templates.values())
    for stage_spec_name in ("query", "description"):
        template_text = template_text.replace("{" + stage_spec_name + "}", " ")
    return sorted(set(VOCAB) | set(words_of([template_text])))


def build_tiny_world_mllm(prompts: PromptSet, seed: int = 0, spec: TinyLlavaSpec = TINY_WORLD_MLLM_SPEC) -> Any:
    """A randomly initialised tiny-world LLaVA and its processor (``build_tiny_llava`` with our spec/vocab)."""
    return build_tiny_llava(mllm_words(prompts), spec, seed=seed)


def pixel_values(processor: Any, images: Sequence[np.ndarray | Image.Image]) -> torch.Tensor:
    """The processor's own image preprocessing, batched (one call per batch, not per image).

    Read-only arrays (``np.asarray`` of a PIL image) are copied first: torch warns on wrapping them, and the
    processor's output is the same either way."""
    images = [np.array(im) if isinstance(im, np.ndarray) and not im.flags.writeable else im for im in images]
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def format_attributes(attributes: dict[str, str]) -> str:
    """The stage-2 target answer: ``color : red ; location : top left ; size : large ; shape : circle``."""
    return " ; ".join(f"{key} : {attributes[key]}" for key in ATTRIBUTE_KEYS)


def reason_turns(prompts: PromptSet, query: TargetQuery) -> list[tuple[str, str]]:
    """The two chain-of-thought turns (prompt, answer) exactly as the LLaVASeg route renders them."""
    return [
        (prompts.render("reason", query=query.text), query.description),
        (prompts.render("attributes", description=query.description, query=query.text),
         format_attributes(query.attributes)),
    ]


def dialogue_turns(items: Iterable[DialogueItem]) -> list[tuple[str, str]]:
    """Ordinary chat turns (question, short answer); several per conversation to use each image more."""
    return [(item.question, item.answer) for item in items]


class ChatEncoder:
    """Token ids and loss labels of a conversation, laid out exactly as ``FrozenMLLM`` builds it.

    ``FrozenMLLM`` tokenises the first user turn rendered with the generation prompt (image placeholder
    expanded by the processor), appends each answer's ids plus ``</s>``, then the template text up to the next
    generation prompt. For a word-level tokenizer this equals tokenising the full rendered chat, which the
    tests check. Labels are the answer tokens and their closing ``</s>``; everything else is ``IGNORE``.
    """

    def __init__(self, processor: Any, num_image_tokens: int) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.num_image_tokens = num_image_tokens
        self.eos = self.tokenizer.eos_token_id
        self._cache: dict[str, list[int]] = {}

    def messages(self, turns: Sequence[tuple[str, str | None]]) -> list[dict[str, Any]]:
        """Chat messages as ``FrozenMLLM.render_chat`` builds them (image in the first user turn only)."""
        messages: list[dict[str, Any]] = []
        for index, (prompt, answer) in enumerate(turns):
            content: list[dict[str, str]] = [{"type": "text", "text": prompt}]
            if index == 0:
                content.insert(0, {"type": "image"})
            messages.append({"role": "user", "content": content})
            if answer is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return messages

    def render(self, turns: Sequence[tuple[str, str | None]], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(self.messages(turns), add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            expanded = text.replace(self.image_token, self.image_token * self.num_image_tokens)
            self._cache[text] = self.tokenizer(expanded, add_special_tokens=False)["input_ids"]
            if len(self._cache) > 20000:  # query texts are nearly unique; keep only the fixed prompt pieces
                self._cache.clear()
        return self._cache[text]

    def encode(self, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """(input ids, labels) of a complete conversation of ``turns``."""
        sentinel = "\u2063ANSWER\u2063"
        ids: list[int] = []
        labels: list[int] = []
        for index, (_, answer) in enumerate(turns):
            # The text between the previous answer (or the start) and this answer: render the chat so far with a
            # sentinel answer and cut, like FrozenMLLM's continuation text.
            text = self.render([*[(p, sentinel) for p, _ in turns[:index]], (turns[index][0], None)],
                               add_generation_prompt=True)
            piece = text.split(sentinel)[-1] if index else text
            if index:
                eos_text = self.tokenizer.eos_token
                stripped = piece.lstrip(" ")
                if not stripped.startswith(eos_text):
                    raise ValueError("chat template does not close answers with </s>; the encoding assumes it")
                piece = stripped[len(eos_text):]
            prompt_ids = self._ids(piece)
            answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos]
            ids += prompt_ids + answer_ids
            labels += [IGNORE] * len(prompt_ids) + answer_ids
        return ids, labels


def cell_targets(scene: Scene, tokens_per_side: int = GRID) -> np.ndarray:
    """``int64 (tokens_per_side**2, 5)`` targets per image token (row-major patches): present, colour, shape,
    size and cell index of the grid cell the patch lies in.

    Every patch of a cell gets the cell's object, so any of its tokens can answer for the object (the vision
    transformer's attention has to gather the object from the cell's patches). Empty cells have ``IGNORE`` for
    colour, shape and size; the cell index is always known, so each token carries its own location and the
    language model need not decode positions from token order.
    """
    per_cell = np.full((GRID * GRID, len(AUX_CLASSES)), IGNORE, dtype=np.int64)
    per_cell[:, 0] = 0
    per_cell[:, 4] = np.arange(GRID * GRID)
    for obj in scene.objects:
        cell = obj.cell[0] * GRID + obj.cell[1]
        per_cell[cell, :4] = (1, COLORS.index(obj.color), SHAPES.index(obj.shape), SIZES.index(obj.size))
    rows = np.arange(tokens_per_side) * GRID // tokens_per_side
    token_cells = (rows[:, None] * GRID + rows[None, :]).reshape(-1)
    return per_cell[token_cells]


def object_targets(scene: Scene, index: int) -> np.ndarray:
    """``int64 (5,)`` targets of object ``index`` in :func:`cell_targets`' columns: what a probe on the language
    model's hidden state must read off once the query is resolved. ``present`` is ``IGNORE`` (always true)."""
    obj = scene.objects[index]
    return np.array([IGNORE, COLORS.index(obj.color), SHAPES.index(obj.shape), SIZES.index(obj.size),
                     obj.cell[0] * GRID + obj.cell[1]], dtype=np.int64)


def answer_positions(labels: Sequence[int]) -> list[int]:
    """Positions whose next token opens an answer, one per turn, from :meth:`ChatEncoder.encode`'s labels.

    Each answer (its tokens and ``</s>``) is one contiguous labelled run, so a run starts wherever a label
    follows an ``IGNORE``; the position *before* it is where the model decides the answer.
    """
    return [i - 1 for i in range(1, len(labels)) if labels[i] != IGNORE and labels[i - 1] == IGNORE]


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class _StageTally:
    """Running counts of stage-1 and stage-2 correctness over queries (overall, per key, per family)."""

    def __init__(self) -> None:
        self.n = self.stage1 = self.keys = self.full = self.parsed = 0
        self.per_key = dict.fromkeys(ATTRIBUTE_KEYS, 0)
        self.per_family: dict[str, list[int]] = {}
        self.examples: list[dict[str, str]] = []

    def add(self, query: TargetQuery, description: str, answer: str, attributes: Any, method: str) -> None:
        hits = [getattr(attributes, key) == query.attributes[key] for key in ATTRIBUTE_KEYS]
        self.n += 1
        self.parsed += method == "key_value"
        self.stage1 += description == query.description
        self.keys += sum(hits)
        self.full += all(hits)
        for key, hit in zip(ATTRIBUTE_KEYS, hits):
            self.per_key[key] += hit
        family = self.per_family.setdefault(query.family, [0, 0, 0])
        family[0] += 1
        family[1] += description == query.description
        family[2] += all(hits)
        if not all(hits) and len(self.examples) < 12:
            self.examples.append({"query": query.text, "stage1": description, "stage2": answer,
                                  "want": format_attributes(query.attributes)})

    def summary(self) -> dict[str, Any]:
        n = max(self.n, 1)
        return {
            "stage1_exact_match": self.stage1 / n,
            "attribute_accuracy": self.keys / (n * len(ATTRIBUTE_KEYS)),
            "attribute_full_set_accuracy": self.full / n,
            "attribute_key_value_parse_rate": self.parsed / n,
            "attribute_accuracy_per_key": {key: value / n for key, value in self.per_key.items()},
            "per_family": {f: {"n": v[0], "stage1": v[1] / v[0], "full_set": v[2] / v[0]}
                           for f, v in sorted(self.per_family.items())},
        }


def evaluate_mllm(mllm: Any, prompts: PromptSet, split: str = "val", seed: int = 0, count: int | None = None,
                  batch_size: int = 32) -> dict[str, Any]:
    """Greedy generation through the route's own :func:`~llavaseg.method.stages.run_stages`.

    Stage 1 exact match (vs. the shape-name description), per-(query, key) attribute accuracy and fully correct
    attribute sets (stage 2 continues the chat with the model's *own* stage-1 answer), and exact match on the
    split's dialogue items.
    """
    from llavaseg.tinyworld.generate import iter_scenes

    start = time.perf_counter()
    queries: list[tuple[np.ndarray, TargetQuery]] = []
    dialogue: list[tuple[np.ndarray, DialogueItem]] = []
    for _, image, target_queries, items in iter_scenes(split, seed, count):
        array = np.asarray(image)
        queries += [(array, q) for q in target_queries]
        dialogue += [(array, d) for d in items]
    tally = _StageTally()
    for batch in _batches(queries, batch_size):
        stages = run_stages(mllm, prompts, [image for image, _ in batch], [q.text for _, q in batch])
        for (_, query), stage in zip(batch, stages):
            tally.add(query, stage.description, stage.attributes_output, stage.attributes, stage.attribute_parse)
    dialogue_hits = 0
    for batch in _batches(dialogue, batch_size):
        answers = mllm.answer([image for image, _ in batch], [d.question for _, d in batch])
        dialogue_hits += sum(a.strip() == d.answer for a, (_, d) in zip(answers, batch))
    return {"split": split, "data_seed": seed, "queries": len(queries), **tally.summary(),
            "dialogue_items": len(dialogue), "dialogue_exact_match": dialogue_hits / max(len(dialogue), 1),
            "eval_seconds": round(time.perf_counter() - start, 1), "errors": tally.examples}
