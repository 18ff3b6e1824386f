"""The attribute parser reads JSON, key: value and prose answers, and never raises on anything."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from llavaseg.attributes import Attributes, parse_attributes


def test_key_value_answer_of_the_tiny_world_format():
    parsed = parse_attributes("color : red ; location : top left ; size : large ; shape : circle")
    assert parsed.method == "key_value"
    assert parsed.attributes.items() == [("color", "red"), ("location", "top left"), ("size", "large"),
                                         ("shape", "circle")]


def test_json_inside_chatter_with_aliases_and_extra_keys():
    parsed = parse_attributes('Sure! Here you go: {"Colour": "Red", "texture": "striped", "n": 3} Hope it helps.')
    assert parsed.method == "json"
    assert parsed.attributes.color == "Red"
    assert parsed.attributes.texture == "striped"  # extra keys kept as fields
    assert parsed.attributes.phrases() == ["color: Red", "texture: striped", "n: 3"]


def test_comma_separated_pairs_and_bullets():
    parsed = parse_attributes("- colour: blue, position: bottom right\n- Shape = square")
    assert parsed.method == "key_value"
    assert dict(parsed.attributes.items()) == {"color": "blue", "location": "bottom right", "shape": "square"}


def test_prose_falls_back_to_known_words():
    parsed = parse_attributes("It is a big yellow triangle near the upper left of the picture.")
    assert parsed.method == "prose"
    assert dict(parsed.attributes.items()) == {"color": "yellow", "location": "upper left", "size": "big",
                                               "shape": "triangle"}


def test_nothing_parsable_is_recorded_as_none():
    parsed = parse_attributes("I cannot tell.")
    assert parsed.method == "none"
    assert not parsed.attributes
    assert parsed.attributes.phrases() == []


def test_keys_that_would_shadow_methods_are_dropped():
    parsed = parse_attributes("items: 3; model_dump: x; json: y; color: red")
    assert dict(parsed.attributes.items()) == {"color": "red"}
    assert callable(parsed.attributes.items)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_string_parses_without_raising(text):
    parsed = parse_attributes(text)
    assert parsed.method in ("json", "key_value", "prose", "none")
    assert isinstance(parsed.attributes, Attributes)
    assert all(isinstance(p, str) and p for p in parsed.attributes.phrases())
    assert bool(parsed.attributes) == (parsed.method != "none")


_values = st.text(alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Nd"), max_codepoint=0x7F),
                  min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["color", "location", "size", "shape", "texture", "material"]), _values,
                       min_size=1))
def test_json_objects_round_trip(data):
    parsed = parse_attributes("answer: " + json.dumps(data))
    assert parsed.method == "json"
    assert dict(parsed.attributes.items()) == data


def test_attribute_keys_are_the_declared_fields_and_the_tiny_world_uses_them() -> None:
    from llavaseg.attributes import ATTRIBUTE_KEYS, Attributes
    from llavaseg.recipes.train_clip import HEAD_ORDER
    from llavaseg.tinyworld.vocab import ATTRIBUTE_VALUES

    assert tuple(Attributes.model_fields) == ATTRIBUTE_KEYS == ("color", "location", "size", "shape")
    assert tuple(ATTRIBUTE_VALUES) == ATTRIBUTE_KEYS and sorted(HEAD_ORDER) == sorted(ATTRIBUTE_KEYS)
