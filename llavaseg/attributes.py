"""Typed visual attributes and a parser that never crashes on what an MLLM actually says.

Stage 2 asks the MLLM for the target's visual attributes. Real models answer in JSON, in ``key: value``
lines, or in a sentence; small models answer in fragments. :func:`parse_attributes` tries those forms in that
order and always returns a result that records which form worked (``method``), so a caller can tell a clean
parse from a fallback to the description alone (``method == "none"``).
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

ATTRIBUTE_KEYS: tuple[str, ...] = ("color", "location", "size", "shape")
"""The attributes every stage-2 answer is read for (the declared fields of :class:`Attributes`, in this order);
the one place in the project that names them."""

ParseMethod = Literal["json", "key_value", "prose", "none", "reference"]
"""How attributes were read; ``reference`` = taken from ground-truth stage annotations (the oracle route)."""

# Aliases an MLLM may use for the same attribute; keys are normalised to the right-hand names.
KEY_ALIASES = {"colour": "color", "colours": "color", "colors": "color", "position": "location",
               "place": "location", "where": "location", "form": "shape", "scale": "size"}

# Closed word lists used only for the prose fallback (JSON and key: value accept any key and value).
COLOR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "black", "white",
               "gray", "grey", "cyan", "magenta", "violet", "beige", "gold", "silver")
SIZE_WORDS = ("tiny", "small", "medium", "large", "big", "huge")
SHAPE_WORDS = ("circle", "square", "triangle", "diamond", "rectangle", "star", "oval", "round", "ring")
LOCATION_PHRASES = ("top left", "top right", "bottom left", "bottom right", "upper left", "upper right",
                    "lower left", "lower right", "top", "bottom", "left", "right", "center", "centre",
                    "middle")


class Attributes(BaseModel):
    """Visual attributes of the target. The common ones are fields; any other key the template asks for
    (texture, material, ...) is kept as an extra field, so ``Attributes(texture="striped").texture`` works."""

    model_config = ConfigDict(extra="allow")

    color: str | None = None
    location: str | None = None
    size: str | None = None
    shape: str | None = None

    def items(self) -> list[tuple[str, str]]:
        """Non-empty (key, value) pairs, declared fields first, in a stable order."""
        pairs = [(key, value) for key, value in self.model_dump().items() if isinstance(value, str) and value]
        return pairs

    def phrases(self) -> list[str]:
        """One short phrase per attribute ("color: red"): what the text encoder embeds."""
        return [f"{key}: {value}" for key, value in self.items()]

    def __bool__(self) -> bool:
        return bool(self.items())



class ParsedAttributes(BaseModel):
    """The parse of one stage-2 answer: the attributes and which input form they were read from."""

    attributes: Attributes
    method: ParseMethod


_KEY_RE = re.compile(r"[^a-z0-9_]+")


def _normalise_key(key: str) -> str | None:
    key = _KEY_RE.sub("_", key.strip().lower()).strip("_")
    if not key or key[0].isdigit() or len(key) > 40:
        return None
    return KEY_ALIASES.get(key, key)


def _normalise_value(value: object) -> str | None:
    if isinstance(value, list | tuple):
        value = " ".join(str(v) for v in value)
    if value is None or isinstance(value, dict):
        return None
    text = re.sub(r"\s+", " ", str(value)).strip(" \t.,;:\"'`")
    return text or None


def _usable_key(key: str) -> bool:
    """A key may become a field unless it would shadow a method or pydantic internals (``items``, ``json``...)."""
    return key in Attributes.model_fields or not (hasattr(Attributes, key) or key.startswith("model_"))


def _build(pairs: list[tuple[str, object]]) -> Attributes:
    values: dict[str, str] = {}
    for raw_key, raw_value in pairs:
        key, value = _normalise_key(raw_key), _normalise_value(raw_value)
        if key and value and key not in values and _usable_key(key):
            values[key] = value
    return Attributes(**values)


def _from_json(text: str) -> Attributes | None:
    start = text.find("{")
    while start != -1:
        depth = 0
        for end in range(start, len(text)):
            if text[end] == "{":
                depth += 1
            elif text[end] == "}":
                depth -= 1
                if depth == 0:
                    try:
                        data = json.loads(text[start : end + 1])
                    except (ValueError, RecursionError):
                        break
                    if isinstance(data, dict):
                        attributes = _build(list(data.items()))
                        if attributes:
                            return attributes
                    break
        start = text.find("{", start + 1)
    return None


_PAIR_RE = re.compile(r"^\s*[-*•]?\s*([A-Za-z][A-Za-z _-]{0,30}?)\s*[:=]\s*(.+?)\s*$")


def _from_key_value(text: str) -> Attributes | None:
    segments = re.split(r"[;\n]|,(?=\s*[A-Za-z][A-Za-z _-]{0,30}\s*[:=])", text)
    pairs = []
    for segment in segments:
        match = _PAIR_RE.match(segment)
        if match:
            pairs.append((match.group(1), match.group(2)))
    attributes = _build(pairs)
    return attributes or None


def _first_word(text: str, words: tuple[str, ...]) -> str | None:
    for word in words:
        if re.search(rf"\b{re.escape(word)}\b", text):
            return word
    return None


def _from_prose(text: str) -> Attributes | None:
    lowered = text.lower()
    found = {
        "color": _first_word(lowered, COLOR_WORDS),
        "location": _first_word(lowered, LOCATION_PHRASES),
        "size": _first_word(lowered, SIZE_WORDS),
        "shape": _first_word(lowered, SHAPE_WORDS),
    }
    attributes = Attributes(**{key: value for key, value in found.items() if value})
    return attributes or None


def parse_attributes(text: str) -> ParsedAttributes:
    """Read attributes from an MLLM answer in JSON, ``key: value`` or prose form; never raises.

    The forms are tried from most to least explicit, so a JSON answer that also contains prose is read as JSON.
    """
    if not isinstance(text, str):
        return ParsedAttributes(attributes=Attributes(), method="none")
    for method, reader in (("json", _from_json), ("key_value", _from_key_value), ("prose", _from_prose)):
        attributes = reader(text)
        if attributes:
            return ParsedAttributes(attributes=attributes, method=method)
    return ParsedAttributes(attributes=Attributes(), method="none")
