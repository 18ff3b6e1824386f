"""Dialogue-preservation metrics (SQuAD normalisation, EM, token F1) and answer collection, by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from llavaseg.bench.dialogue import (
    DialogueAnswer,
    DialogueItem,
    collect_answers,
    dialogue_metrics,
    exact_match,
    load_dialogue,
    normalize_answer,
    token_f1,
)
from llavaseg.errors import InputError


def test_normalisation_is_squad():
    assert normalize_answer("The  Red, Square!") == "red square"
    assert normalize_answer("an apple and a pear") == "apple and pear"
    assert normalize_answer("theme") == "theme"  # articles only as whole words
    assert exact_match("A circle.", "circle") == 1.0
    assert exact_match("circles", "circle") == 0.0


def test_token_f1_by_hand():
    # pred tokens [red, square, left], ref [red, square]: overlap 2 -> P = 2/3, R = 1, F1 = 2PR/(P+R) = 0.8
    assert token_f1("the red square, left", "a red square") == pytest.approx(0.8)
    # multiset overlap: pred [two, two, circles], ref [two, circles] -> overlap 2, P = 2/3, R = 1 -> 0.8
    assert token_f1("two two circles", "two circles") == pytest.approx(0.8)
    assert token_f1("blue", "red") == 0.0
    assert token_f1("the", "") == 1.0  # both empty after normalisation
    assert token_f1("", "red") == 0.0


def _items() -> list[DialogueItem]:
    return [DialogueItem(index=i, image="x.png", question=f"q{i}", answer=a)
            for i, a in enumerate(["red", "two circles", "yes"])]


def test_metrics_hand_made_case():
    items = _items()
    base = {0: DialogueAnswer(index=0, question="q0", answer="red"),
            1: DialogueAnswer(index=1, question="q1", answer="two"),
            2: DialogueAnswer(index=2, question="q2", answer=None, error="boom")}
    route = {0: DialogueAnswer(index=0, question="q0", answer="Red."),
             1: DialogueAnswer(index=1, question="q1", answer="three circles"),
             2: DialogueAnswer(index=2, question="q2", answer="yes")}
    m = dialogue_metrics(items, route, base)
    # agreement only where the base answered (items 0, 1): EM [1, 0]; F1 [1, 0 ("three circles" vs "two")]
    assert m.n_compared == 2 and m.agreement_em == pytest.approx(0.5) and m.agreement_f1 == pytest.approx(0.5)
    # references: EM [1, 0, 1]; F1 [1, 0.5 (overlap "circles": P=R=1/2), 1] -> 2.5 / 3
    assert m.reference_em == pytest.approx(2 / 3) and m.reference_f1 == pytest.approx(2.5 / 3)
    assert m.n_items == 3 and m.n_errors == 0
    b = dialogue_metrics(items, base, None)
    # the base's own failure scores 0: EM [1, 0, 0], F1 [1, 2*(1*0.5)/(1.5)=2/3, 0]
    assert b.n_errors == 1 and b.agreement_em is None
    assert b.reference_em == pytest.approx(1 / 3) and b.reference_f1 == pytest.approx((1 + 2 / 3) / 3)


def test_a_failed_route_answer_never_agrees():
    items = _items()[:1]
    base = {0: DialogueAnswer(index=0, question="q0", answer="")}
    route = {0: DialogueAnswer(index=0, question="q0", answer=None, error="RuntimeError: x")}
    m = dialogue_metrics(items, route, base)
    assert m.agreement_em == 0.0 and m.agreement_f1 == 0.0 and m.n_errors == 1  # "" == "" would have been 1.0


def _dialogue_file(tmp_path, rows):
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (0, 200, 0)).save(tmp_path / "b.png")
    path = tmp_path / "dialogue.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_resolves_bare_names_and_limits_images(tmp_path):
    path = _dialogue_file(tmp_path, [
        {"image": "a", "question": "what colour ?", "answer": "red"},  # bare name: suffix found (tiny world)
        {"image": "b.png", "question": "what colour ?", "answer": "green"},
        {"image": "a", "question": "how many ?", "answer": "one"},
    ])
    items = load_dialogue(path)
    assert [i.index for i in items] == [0, 1, 2] and items[0].image == str(tmp_path / "a.png")
    first = load_dialogue(path, max_images=1)
    assert [i.question for i in first] == ["what colour ?", "how many ?"]  # every item of image a, none of b
    with pytest.raises(InputError, match="not found"):
        load_dialogue(_dialogue_file(tmp_path, [{"image": "zzz", "question": "q", "answer": "a"}]))
    with pytest.raises(InputError, match="'answer'"):
        load_dialogue(_dialogue_file(tmp_path, [{"image": "a", "question": "q"}]))


class _ScriptedChat:
    """Test double for a chat model: answers 'colour of pixel 0' and fails on one question; counts calls."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.calls: list[list[str]] = []

    def answer(self, images: list[np.ndarray], questions: list[str]) -> list[str]:
        self.calls.append(list(questions))
        if self.fail_on in questions:
            raise RuntimeError("scripted failure")
        return ["red" if image[0, 0, 0] > 100 else "green" for image in images]


def test_collect_isolates_failures_and_resumes(tmp_path):
    path = _dialogue_file(tmp_path, [
        {"image": "a", "question": "q0", "answer": "red"},
        {"image": "b", "question": "q1", "answer": "green"},
        {"image": "a", "question": "q2", "answer": "red"},
    ])
    items = load_dialogue(path)
    store = tmp_path / "dialogue-x.jsonl"
    chat = _ScriptedChat(fail_on="q1")
    answers = collect_answers(chat.answer, items, store, batch_size=2, desc="x")
    assert answers[0].answer == "red" and answers[1].error == "RuntimeError: scripted failure"
    assert answers[2].answer == "red"
    # chunk [q0, q1] fails whole, then item by item; chunk [q2] runs once
    assert chat.calls == [["q0", "q1"], ["q0"], ["q1"], ["q2"]]
    again = _ScriptedChat()
    assert collect_answers(again.answer, items, store, batch_size=2, desc="x") == answers
    assert again.calls == []  # everything came from the store
    assert dialogue_metrics(items, answers, None).reference_em == pytest.approx(2 / 3)
