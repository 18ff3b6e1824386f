"""Dialogue preservation: does a route still chat like the base MLLM it was built from?

LLaVASeg's claim against LISA is that a frozen MLLM keeps its ordinary dialogue ability while LISA's
fine-tuning (LoRA + ``<SEG>`` token) degrades it. This module *measures* that instead of assuming it: every
route's :meth:`~llavaseg.routes.base.Route.dialogue_model` answers held-out questions (greedy decoding), the
preset's base MLLM answers the same questions, and the two are compared with SQuAD's answer metrics:

* **agreement** with the base: exact-match rate and mean token F1 of route answer vs base answer. A frozen
  route (LLaVASeg) is the same model, so it must come out at exactly 1.0; a fine-tuned one drifts below;
* **accuracy** against the reference answers of the dialogue file (exact match + token F1), for the routes
  and for the base itself.

Normalisation is SQuAD v1.1's ``normalize_answer``: lower-case, drop punctuation, drop the articles
``a``/``an``/``the``, collapse whitespace. Token F1 is computed on the normalised whitespace tokens with
multiset overlap; if either side has no token, F1 is 1.0 when both are empty and 0.0 otherwise.

A question a model failed to answer (exception) scores 0 on every metric for that model, so errors never
raise a score; a question the *base* failed on is left out of the agreement averages (nothing to agree with).

Answers are stored per model in ``dialogue-<name>.jsonl`` and reused on resume (base answers are computed
once per run folder and shared by every route). Questions are processed in fixed chunks of the item list,
so the base and each route see identical batches (identical padding) and a frozen route's agreement is
exactly 1.0 even in float arithmetic.
"""

from __future__ import annotations

import re
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from llavaseg.bench.jsonl import append_jsonl, read_jsonl
from llavaseg.data.annotations import DialogueRecord, read_records
from llavaseg.errors import InputError
from llavaseg.images import load_image

__all__ = [
    "normalize_answer",
    "answer_tokens",
    "exact_match",
    "token_f1",
    "DialogueItem",
    "DialogueAnswer",
    "DialogueMetrics",
    "load_dialogue",
    "collect_answers",
    "dialogue_metrics",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)

AnswerFn = Callable[[list[np.ndarray], list[str]], list[str]]


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, strip punctuation, remove articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 of two answers (multiset overlap of normalised tokens)."""
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class DialogueItem(BaseModel):
    """One held-out question about one image, with its reference answer."""

    model_config = ConfigDict(frozen=True)

    index: int
    image: str
    question: str
    answer: str


class DialogueAnswer(BaseModel):
    """One model's answer to item ``index`` (one line of ``dialogue-<name>.jsonl``)."""

    model_config = ConfigDict(frozen=True)

    index: int
    question: str
    answer: str | None = None
    error: str | None = None
    seconds: float = 0.0


class DialogueMetrics(BaseModel):
    """Agreement with the base MLLM and accuracy against references; fractions in [0, 1]."""

    model_config = ConfigDict(frozen=True)

    n_items: int
    n_errors: int = 0
    n_compared: int = 0
    agreement_em: float | None = None
    agreement_f1: float | None = None
    reference_em: float | None = None
    reference_f1: float | None = None


def _resolve_image(raw: str, base_dir: Path, where: str) -> Path:
    """Image paths are relative to the dialogue file; a bare name (the tiny world's) gets its suffix found."""
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if path.is_file():
        return path
    for suffix in (".png", ".jpg", ".jpeg"):
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    raise InputError(f"{where}: image {raw!r} not found (looked for {path})")


def load_dialogue(path: Path, *, max_images: int | None = None) -> list[DialogueItem]:
    """Read a dialogue JSONL file (:class:`~llavaseg.data.annotations.DialogueRecord` per line).

    ``max_images`` keeps the items of the first N distinct images only (``--limit`` applies to dialogue
    too, so a quick run stays quick). Images are resolved now, so a broken file fails before any model runs.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"dialogue file not found: {path}")
    items: list[DialogueItem] = []
    seen_images: list[str] = []
    for number, record in enumerate(read_records(path, DialogueRecord), start=1):
        if record.image not in seen_images:
            if max_images is not None and len(seen_images) >= max_images:
                continue
            seen_images.append(record.image)
        image = _resolve_image(record.image, path.parent, f"{path}: record {number}")
        items.append(DialogueItem(index=len(items), image=str(image), question=record.question, answer=record.answer))
    if not items:
        raise InputError(f"dialogue file {path} has no items")
    return items


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


Outcome = tuple[str | None, str | None, float]


def _answer_chunk(answer_fn: AnswerFn, images: list[np.ndarray], questions: list[str]) -> list[Outcome]:
    """``(answer, error, seconds)`` per question; a failing batch is retried item by item to isolate errors."""
    start = time.perf_counter()
    try:
        answers = list(answer_fn(images, questions))
        if len(answers) != len(questions):
            raise RuntimeError(f"{len(answers)} answers for {len(questions)} questions")
        per = (time.perf_counter() - start) / len(questions)
        return [(str(a), None, per) for a in answers]
    except Exception:  # noqa: BLE001 - isolate the failing item(s) below
        pass
    out: list[Outcome] = []
    for image, question in zip(images, questions):
        start = time.perf_counter()
        try:
            answer = list(answer_fn([image], [question]))
            if len(answer) != 1:
                raise RuntimeError(f"{len(answer)} answers for 1 question")
            out.append((str(answer[0]), None, time.perf_counter() - start))
        except Exception as exc:  # noqa: BLE001 - a failing question is recorded, the run goes on
            out.append((None, _one_line(exc), time.perf_counter() - start))
    return out


def collect_answers(answer_fn: AnswerFn, items: Sequence[DialogueItem], store: Path, *, batch_size: int,
                    desc: str) -> dict[int, DialogueAnswer]:
    """Answers of one model to every item, computing only those missing from ``store`` (then appended).

    Items are chunked by position (``items[k*B:(k+1)*B]``), and a chunk with any missing answer is run whole,
    so every model sees the same batches whatever was done before.
    """
    done = {a.index: a for a in read_jsonl(store, DialogueAnswer)}
    for item in items:
        if item.index in done and done[item.index].question != item.question:
            raise InputError(f"{store}: item {item.index} has another question; use a new --out")
    chunks = [list(items[i: i + batch_size]) for i in range(0, len(items), batch_size)]
    todo = [chunk for chunk in chunks if any(item.index not in done for item in chunk)]
    with tqdm(total=sum(len(c) for c in todo), desc=desc, unit="q", leave=False) as bar:
        for chunk in todo:
            loaded: dict[str, np.ndarray] = {}
            for item in chunk:
                if item.image not in loaded:
                    loaded[item.image] = load_image(item.image)
            outputs = _answer_chunk(answer_fn, [loaded[i.image] for i in chunk], [i.question for i in chunk])
            new = [DialogueAnswer(index=item.index, question=item.question, answer=answer, error=error,
                                  seconds=seconds)
                   for item, (answer, error, seconds) in zip(chunk, outputs) if item.index not in done]
            append_jsonl(store, new)
            done.update({a.index: a for a in new})
            bar.update(len(chunk))
    return {item.index: done[item.index] for item in items}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def dialogue_metrics(items: Sequence[DialogueItem], answers: dict[int, DialogueAnswer],
                     base: dict[int, DialogueAnswer] | None) -> DialogueMetrics:
    """Score ``answers`` against the references and (if given) against the ``base`` model's answers."""
    ref_em, ref_f1, agree_em, agree_f1 = [], [], [], []
    errors = 0
    for item in items:
        mine = answers[item.index]
        if mine.error is not None or mine.answer is None:
            errors += 1
        text = mine.answer if mine.error is None and mine.answer is not None else None
        ref_em.append(exact_match(text, item.answer) if text is not None else 0.0)
        ref_f1.append(token_f1(text, item.answer) if text is not None else 0.0)
        if base is not None:
            theirs = base[item.index]
            if theirs.error is not None or theirs.answer is None:
                continue  # nothing to agree with
            agree_em.append(exact_match(text, theirs.answer) if text is not None else 0.0)
            agree_f1.append(token_f1(text, theirs.answer) if text is not None else 0.0)
    return DialogueMetrics(
        n_items=len(items), n_errors=errors, n_compared=len(agree_em),
        agreement_em=_mean(agree_em), agreement_f1=_mean(agree_f1),
        reference_em=_mean(ref_em), reference_f1=_mean(ref_f1),
    )
