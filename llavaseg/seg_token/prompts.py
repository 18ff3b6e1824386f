"""LISA's conversation texts for the ``[SEG]`` route (``utils/utils.py`` of dvlab-research/LISA, ``docs/lisa.md`` §5).

Why a module of its own: the templates decide what the fine-tuned model sees, so training and both inference
protocols must draw them from one place. Training picks a question template at random from LISA's lists (short
phrase queries vs. long sentence queries) and an answer from LISA's answer list; evaluation uses LISA's fixed
validation templates (``ValDataset``), which are members of those lists.

The chat template (``USER: <image>\\n... ASSISTANT: ...``) is the processor's, so the ``<image>\\n`` prefix LISA
writes by hand is added by ``apply_chat_template`` and does not appear in the strings below.
"""

from __future__ import annotations

import random
import re
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


def validation_request(query: str, is_sentence: bool) -> str:
    """The user text LISA's validation uses for ``query`` (without the image placeholder)."""
    query = query.strip()
    return VAL_LONG.format(sent=query) if is_sentence else VAL_SHORT.format(class_name=query)


def training_request(query: str, is_sentence: bool, rng: random.Random) -> str:
    """A random LISA training question for ``query`` (long list for sentences, short list for phrases)."""
    query = query.strip()
    if is_sentence:
        return rng.choice(LONG_QUESTIONS).format(sent=query)
    return rng.choice(SHORT_QUESTIONS).format(class_name=query)


def training_answer(rng: random.Random) -> str:
    """A random LISA answer, holding one ``[SEG]``."""
    return rng.choice(ANSWERS)


def strip_seg(text: str) -> str:
    """The generated text without ``[SEG]`` tokens (what the route reports as its description)."""
    return re.sub(r"\s+", " ", text.replace(SEG_TOKEN, " ")).strip()
