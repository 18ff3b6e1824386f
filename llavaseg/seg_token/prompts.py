"""LISA's conversation texts for the ``[SEG]`` route (``utils/utils.py`` of dvlab-research/LISA, ``docs/lisa.md`` §5).

Why a module of its own: the templates decide what the fine-tuned model sees, so training and both inference
protocols must draw them from one place. Training picks a question template at random from LISA's lists (short
phrase queries vs. long sentence queries) and an answer from LISA's answer list; evaluation uses LISA's fixed
validation templates (``ValDataset``), which are members of those lists.

A :class:`TemplateSet` holds one such family of texts. ``LISA`` is LISA's, verbatim. ``TINY_WORLD`` says the same
things in the tiny world's 89-word vocabulary: LISA's words ("Please", "segment", "mask", "Sure", "It") are
``<unk>`` to the tiny MLLM, so with LISA's texts the language-model loss starts at 11-15 nats per token and its
clipped gradient starves the mask path (``docs/tinyworld.md``). A ``[SEG]`` model records which set it was trained
with, and inference uses that set.

The chat template (``USER: <image>\\n... ASSISTANT: ...``) is the processor's, so the ``<image>\\n`` prefix LISA
writes by hand is added by ``apply_chat_template`` and does not appear in the strings below.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

SEG_TOKEN = "[SEG]"

SHORT_QUESTIONS: tuple[str, ...] = (
    "Can you segment the {class_name} in this image?",
    "Please segment the {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
    "What is {class_name} in this image? Please output segmentation mask.",
)
"""LISA's ``SHORT_QUESTION_LIST`` (phrase queries), without the leading ``<image>\\n``."""

LONG_QUESTIONS: tuple[str, ...] = (
    "{sent} Please respond with segmentation mask.",
    "{sent} Please output segmentation mask.",
)
"""LISA's ``LONG_QUESTION_LIST`` (sentence queries), without the leading ``<image>\\n``."""

ANSWERS: tuple[str, ...] = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
)
"""LISA's ``ANSWER_LIST``: every training answer holds exactly one ``[SEG]``."""

VAL_SHORT = "What is {class_name} in this image? Please output segmentation mask."
VAL_LONG = "{sent} Please output segmentation mask."
"""LISA ``ValDataset`` prompts (its leading space after ``<image>\\n`` is a tokenisation detail we drop)."""

TEACHER_FORCED_ANSWER = "[SEG]."
"""LISA's ``validate()`` pre-fills the assistant turn with this text (``docs/lisa.md`` §5, LISA issue #145)."""


@dataclass(frozen=True)
class TemplateSet:
    """One family of ``[SEG]`` conversation texts: training questions and answers, validation questions, and
    the teacher-forced answer."""

    name: str
    short_questions: tuple[str, ...]
    long_questions: tuple[str, ...]
    answers: tuple[str, ...]
    val_short: str
    val_long: str
    teacher_forced_answer: str


LISA = TemplateSet("lisa", SHORT_QUESTIONS, LONG_QUESTIONS, ANSWERS, VAL_SHORT, VAL_LONG, TEACHER_FORCED_ANSWER)

TINY_WORLD = TemplateSet(
    "tiny-world",
    short_questions=("what is {class_name} in this image ?", "which object is {class_name} ?",
                     "where is {class_name} in this image ?", "refer to {class_name} ."),
    long_questions=("{sent} refer to the object .", "{sent} which object ?"),
    answers=("the object is [SEG] .", "this is [SEG] .", "the object that is [SEG] .", "[SEG] ."),
    val_short="what is {class_name} in this image ?",
    val_long="{sent} refer to the object .",
    teacher_forced_answer="[SEG] .",
)
"""LISA's templates in the tiny world's vocabulary, question for question (LISA's "Please output segmentation
mask." becomes "refer to the object ."; "Sure, it is [SEG]." becomes "this is [SEG] ."): a fix for the toy, not a
change of design: one ``[SEG]`` per answer, validation texts that are members of the training lists."""

TEMPLATE_SETS = {templates.name: templates for templates in (LISA, TINY_WORLD)}

AnswerStyle = Literal["lisa", "attributes-first"]
"""``lisa``: the answer is one of the set's answers (LISA puts any explanation *after* ``[SEG]``).
``attributes-first``: the model first writes the target's attributes (``color : red ; location : top left ; ...``,
the frozen MLLM's stage-2 format), then ``[SEG]``: an extension of LISA, not LISA (``seg-token-cot``)."""


def template_set(name: str) -> TemplateSet:
    if name not in TEMPLATE_SETS:
        raise ValueError(f"unknown [SEG] template set {name!r}; known: {sorted(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[name]


QueryStyle = Literal["auto", "short", "long"]

_SENTENCE_END = re.compile(r"[.?!]\s*$")


def looks_like_sentence(query: str, max_phrase_words: int = 9) -> bool:
    """Guess LISA's ``is_sentence`` flag for a bare query (the route is not told it).

    A query ending in ``.``, ``?`` or ``!``, or longer than ``max_phrase_words`` words, is treated as a sentence.
    On the tiny world phrases have at most 8 words and sentences at least 10, so the guess is exact there; on
    real data pass ``query_style`` to the route when the flag is known.
    """
    text = query.strip()
    return bool(_SENTENCE_END.search(text)) or len(text.split()) > max_phrase_words


def validation_request(query: str, is_sentence: bool, templates: TemplateSet = LISA) -> str:
    """The user text LISA's validation uses for ``query`` (without the image placeholder)."""
    query = query.strip()
    return templates.val_long.format(sent=query) if is_sentence else templates.val_short.format(class_name=query)


def training_request(query: str, is_sentence: bool, rng: random.Random, templates: TemplateSet = LISA) -> str:
    """A random LISA training question for ``query`` (long list for sentences, short list for phrases)."""
    query = query.strip()
    if is_sentence:
        return rng.choice(templates.long_questions).format(sent=query)
    return rng.choice(templates.short_questions).format(class_name=query)


def training_answer(rng: random.Random, templates: TemplateSet = LISA, style: AnswerStyle = "lisa",
                    attributes: str | None = None) -> str:
    """A training answer holding one ``[SEG]``: one of the set's answers, or (``attributes-first``) the
    target's attribute sentence followed by ``[SEG]``."""
    if style == "attributes-first":
        if not attributes:
            raise ValueError("an attributes-first answer needs the target's attributes")
        return f"{attributes} {SEG_TOKEN} ."
    return rng.choice(templates.answers)


def strip_seg(text: str) -> str:
    """The generated text without ``[SEG]`` tokens (what the route reports as its description)."""
    return re.sub(r"\s+", " ", text.replace(SEG_TOKEN, " ")).strip()
