"""Referring queries (ReasonSeg-style) and ordinary dialogue about tiny-world scenes.

Queries are built for the scene's focus object and must identify it *uniquely*. Uniqueness is not taken on
trust from the generator: every candidate text is re-read by :func:`resolve_query`, a small interpreter of
the closed query grammar below that works on the scene's own facts, and only texts resolving to exactly the
target survive. The same interpreter lets tests (and anyone debugging a model) check any text.

Grammar (lower case, space separated, words from :data:`~llavaseg.tinyworld.vocab.VOCAB`)::

    NP   := "the" ["only"] ["smallest"|"largest"] [SIZE] [COLOR] (SHAPE|"shape") ["in the" LOCATION]
    TEXT := NP
          | NP "that is not" (COLOR | SIZE | "a" SHAPE)
          | NP "that has the same" ("colour"|"shape"|"size") "as" NP
          | NP ("to the left of"|"to the right of"|"above"|"below") NP
          | NP "whose colour is the one most shapes share"
          | NP "between" NP "and" NP

Semantics: attributes filter; "only" requires exactly one match; "smallest"/"largest" keep the matches of the
smaller/larger size class and presuppose that both classes occur among the matches (two size classes, so the
contrast is always visible); "left of" means same grid row, smaller column ("above": same column, smaller
row); "between" means the grid cell midway between the two references; the majority colour must be strictly
the most frequent one. A reference NP that does not pick out exactly one object makes the text refer to nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from llavaseg.tinyworld.scenes import Scene, SceneObject
from llavaseg.tinyworld.vocab import (
    COLORS,
    LOCATIONS,
    NUMBER_WORDS,
    SHAPE_PLURALS,
    SHAPES,
    SIZES,
)

__all__ = [
    "TargetQuery",
    "DialogueItem",
    "QueryError",
    "make_target_queries",
    "make_dialogue",
    "resolve_query",
    "target_attributes",
    "SHORT_FAMILIES",
    "SENTENCE_FAMILIES",
]

SHORT_FAMILIES: tuple[str, ...] = ("attributes", "location", "only", "superlative", "negation")
SENTENCE_FAMILIES: tuple[str, ...] = ("same_colour", "same_shape", "relation", "majority", "between")

_RELATIONS = {" to the left of ": "left", " to the right of ": "right", " above ": "above", " below ": "below"}
_MAJORITY = " whose colour is the one most shapes share"
_P_SENTENCE = 0.5


class QueryError(ValueError):
    """A text outside the tiny-world query grammar."""


class TargetQuery(BaseModel):
    """One referring text for a scene's target, with what the MLLM stage should extract from it.

    ``description`` is deliberately only the shape name ("circle"): in the LLaVASeg pipeline the simple
    description is ambiguous and the ``attributes`` (colour, location, size, shape) disambiguate.
    """

    model_config = ConfigDict(frozen=True)

    text: str
    is_sentence: bool
    target_index: int
    description: str
    attributes: dict[str, str]
    family: str


class DialogueItem(BaseModel):
    """An ordinary question about a scene with its short exact answer (keeps the MLLM a chat model).

    ``target_index`` is the object the answer is about, when there is exactly one (``None`` for counting and
    existence questions, or "nothing"); training probes use it, the written ``dialogue.jsonl`` does not.
    """

    model_config = ConfigDict(frozen=True)

    question: str
    answer: str
    target_index: int | None = None


def target_attributes(obj: SceneObject) -> dict[str, str]:
    """The attribute record of an object (its :meth:`~llavaseg.tinyworld.scenes.SceneObject.attributes`)."""
    return obj.attributes()


# ------------------------------------------------------------------------------------------- interpreter


@dataclass
class _NP:
    only: bool = False
    superlative: str | None = None
    size: str | None = None
    color: str | None = None
    noun: str = "shape"
    location: str | None = None


def _parse_np(text: str) -> _NP:
    words = text.split()
    if not words or words[0] != "the":
        raise QueryError(f"expected a noun phrase starting with 'the', got {text!r}")
    i = 1
    np_ = _NP()
    if i < len(words) and words[i] == "only":
        np_.only, i = True, i + 1
    if i < len(words) and words[i] in ("smallest", "largest"):
        np_.superlative, i = words[i], i + 1
    if i < len(words) and words[i] in SIZES:
        np_.size, i = words[i], i + 1
    if i < len(words) and words[i] in COLORS:
        np_.color, i = words[i], i + 1
    if i >= len(words) or words[i] not in (*SHAPES, "shape"):
        raise QueryError(f"expected a shape noun in {text!r}")
    np_.noun, i = words[i], i + 1
    if i < len(words):
        if words[i : i + 2] != ["in", "the"] or " ".join(words[i + 2 :]) not in LOCATIONS:
            raise QueryError(f"cannot parse {' '.join(words[i:])!r} in {text!r}")
        np_.location = " ".join(words[i + 2 :])
    return np_


def _resolve_np(scene: Scene, text: str, memo: dict[str, list[int]] | None = None) -> list[int]:
    """Objects an NP refers to. "only" with != 1 match, or a superlative without contrast, refers to nothing.

    ``memo`` caches results per text for one scene (generation resolves the same NPs many times).
    """
    if memo is not None:
        if text not in memo:
            memo[text] = _resolve_np(scene, text)
        return memo[text]
    np_ = _parse_np(text)
    hits = [
        i
        for i, o in enumerate(scene.objects)
        if (np_.size is None or o.size == np_.size)
        and (np_.color is None or o.color == np_.color)
        and (np_.noun == "shape" or o.shape == np_.noun)
        and (np_.location is None or o.location == np_.location)
    ]
    if np_.superlative is not None:
        present = {scene.objects[i].size for i in hits}
        if present != set(SIZES):  # "the smallest circle" presupposes circles of both size classes
            return []
        keep = "small" if np_.superlative == "smallest" else "large"
        hits = [i for i in hits if scene.objects[i].size == keep]
    if np_.only and len(hits) != 1:
        return []
    return hits


def _the_one(scene: Scene, text: str, memo: dict[str, list[int]] | None) -> int | None:
    hits = _resolve_np(scene, text, memo)
    return hits[0] if len(hits) == 1 else None


def _split_once(text: str, sep: str) -> tuple[str, str]:
    head, _, tail = text.partition(sep)
    if not head or not tail:
        raise QueryError(f"cannot parse {text!r}")
    return head, tail


def _resolve_same(scene: Scene, text: str, memo: dict[str, list[int]] | None) -> list[int]:
    """``<np> that has the same <colour|shape|size> as <np>``."""
    objs = scene.objects
    head_text, tail = _split_once(text, " that has the same ")
    attr, ref_text = _split_once(tail, " as ")
    if attr not in ("colour", "shape", "size"):
        raise QueryError(f"cannot compare by {attr!r} in {text!r}")
    ref = _the_one(scene, ref_text, memo)
    if ref is None:
        return []
    key = {"colour": "color", "shape": "shape", "size": "size"}[attr]
    want = getattr(objs[ref], key)
    return [i for i in _resolve_np(scene, head_text, memo) if i != ref and getattr(objs[i], key) == want]


def _resolve_negation(scene: Scene, text: str, memo: dict[str, list[int]] | None) -> list[int]:
    """``<np> that is not <colour|size|a shape>``."""
    objs = scene.objects
    head_text, neg = _split_once(text, " that is not ")
    head = _resolve_np(scene, head_text, memo)
    if neg in COLORS:
        return [i for i in head if objs[i].color != neg]
    if neg in SIZES:
        return [i for i in head if objs[i].size != neg]
    if neg.startswith("a ") and neg[2:] in SHAPES:
        return [i for i in head if objs[i].shape != neg[2:]]
    raise QueryError(f"cannot negate {neg!r} in {text!r}")


def _resolve_relation(scene: Scene, text: str, sep: str, rel: str, memo: dict[str, list[int]] | None) -> list[int]:
    """``<np> <to the left of|to the right of|above|below> <np>``: same row or column, on that side."""
    objs = scene.objects
    head_text, ref_text = _split_once(text, sep)
    ref = _the_one(scene, ref_text, memo)
    if ref is None:
        return []
    rr, rc = objs[ref].cell
    out = []
    for i in _resolve_np(scene, head_text, memo):
        r, c = objs[i].cell
        if (rel == "left" and r == rr and c < rc) or (rel == "right" and r == rr and c > rc):
            out.append(i)
        elif (rel == "above" and c == rc and r < rr) or (rel == "below" and c == rc and r > rr):
            out.append(i)
    return out


def _resolve_between(scene: Scene, text: str, memo: dict[str, list[int]] | None) -> list[int]:
    """``<np> between <np> and <np>``: the cell exactly half way between two cells two apart."""
    objs = scene.objects
    head_text, tail = _split_once(text, " between ")
    a_text, b_text = _split_once(tail, " and ")
    a, b = _the_one(scene, a_text, memo), _the_one(scene, b_text, memo)
    if a is None or b is None or a == b:
        return []
    (ra, ca), (rb, cb) = objs[a].cell, objs[b].cell
    if (ra - rb) % 2 or (ca - cb) % 2 or max(abs(ra - rb), abs(ca - cb)) != 2:
        return []
    mid = ((ra + rb) // 2, (ca + cb) // 2)
    return [i for i in _resolve_np(scene, head_text, memo) if objs[i].cell == mid]


def resolve_query(scene: Scene, text: str, memo: dict[str, list[int]] | None = None) -> list[int]:
    """Indices of the objects ``text`` refers to in ``scene`` (sorted; empty when nothing fits).

    Raises :class:`QueryError` for text outside the grammar in the module docstring. ``memo`` (a dict
    owned by the caller, for one scene only) caches noun-phrase lookups across calls.
    """
    text = " ".join(text.split())
    objs = scene.objects
    if text.endswith(_MAJORITY):
        head = _resolve_np(scene, text[: -len(_MAJORITY)], memo)
        counts = Counter(o.color for o in objs).most_common()
        if len(counts) > 1 and counts[0][1] == counts[1][1]:
            return []
        return [i for i in head if objs[i].color == counts[0][0]]
    if " that has the same " in text:
        return _resolve_same(scene, text, memo)
    if " that is not " in text:
        return _resolve_negation(scene, text, memo)
    for sep, rel in _RELATIONS.items():
        if sep in text:
            return _resolve_relation(scene, text, sep, rel, memo)
    if " between " in text:
        return _resolve_between(scene, text, memo)
    return list(_resolve_np(scene, text, memo))


# --------------------------------------------------------------------------------------------- generation


def _plain_nps(o: SceneObject, *, with_shape: bool = True, with_color: bool = True) -> list[str]:
    """Noun phrases built from the object's own attributes (not necessarily unique), "the shape" included."""
    out = []
    for size in (None, o.size):
        for color in (None, o.color) if with_color else (None,):
            for noun in ("shape", o.shape) if with_shape else ("shape",):
                out.append(" ".join(w for w in ("the", size, color, noun) if w))
    return out


def _location_nps(o: SceneObject, *, with_shape: bool = True, with_color: bool = True) -> list[str]:
    out = []
    for color in (None, o.color) if with_color else (None,):
        for noun in ("shape", o.shape) if with_shape else ("shape",):
            out.append(" ".join(w for w in ("the", color, noun, "in the", o.location) if w))
    return out


def _unique_refs(
    scene: Scene, idx: int, memo: dict[str, list[int]], *, with_shape: bool = True, with_color: bool = True
) -> list[str]:
    """Plain and location NPs that pick out object ``idx`` alone (to name a reference object)."""
    o = scene.objects[idx]
    cands = _plain_nps(o, with_shape=with_shape, with_color=with_color)
    cands += _location_nps(o, with_shape=with_shape, with_color=with_color)
    return [t for t in cands if _resolve_np(scene, t, memo) == [idx]]


def _short_candidates(scene: Scene, t: int, memo: dict[str, list[int]], fam: dict[str, list[str]]) -> None:
    """Phrase families: plain attributes, location, "only", superlative, negation."""
    objs = scene.objects
    o = objs[t]
    heads = _plain_nps(o)
    ambiguous_heads = [h for h in heads if len(_resolve_np(scene, h, memo)) > 1]
    fam["attributes"] = [h for h in heads if h != "the shape" and _resolve_np(scene, h, memo) == [t]]
    fam["location"] = [h for h in _location_nps(o) if _resolve_np(scene, h, memo) == [t]]
    for h in heads:
        if h != "the shape":
            fam["only"].append(h.replace("the ", "the only ", 1))
    sup = "smallest" if o.size == "small" else "largest"
    for h in _plain_nps(o):
        words = h.split()
        if o.size in words:
            continue
        base_hits = _resolve_np(scene, h, memo)
        if len(base_hits) >= 2:
            fam["superlative"].append(h.replace("the ", f"the {sup} ", 1))
    for h in ambiguous_heads:
        others = [objs[i] for i in _resolve_np(scene, h, memo) if i != t]
        negs = {c.color for c in others if c.color != o.color}
        negs |= {f"a {c.shape}" for c in others if c.shape != o.shape}
        negs |= {c.size for c in others if c.size != o.size}
        fam["negation"] += [f"{h} that is not {n}" for n in sorted(negs)]


def _comparison_candidates(scene: Scene, t: int, memo: dict[str, list[int]], fam: dict[str, list[str]]) -> None:
    """Sentence families that name a second object: same colour / shape, and spatial relations."""
    objs = scene.objects
    o = objs[t]
    for attr, key in (("colour", "color"), ("shape", "shape")):
        family = "same_colour" if attr == "colour" else "same_shape"
        for r, ref in enumerate(objs):
            if r == t or getattr(ref, key) != getattr(o, key):
                continue
            # The reference is named without the compared attribute, so the answer needs a look at it.
            refs = _unique_refs(scene, r, memo, with_color=attr != "colour", with_shape=attr != "shape")
            h_opts = _plain_nps(o, with_color=attr != "colour", with_shape=attr != "shape")
            fam[family] += [f"{h} that has the same {attr} as {rt}" for h in h_opts for rt in refs]
    heads = _plain_nps(o)
    for r, ref in enumerate(objs):
        if r == t:
            continue
        (rr, rc), (tr, tc) = ref.cell, o.cell
        rel = None
        if rr == tr:
            rel = " to the right of " if tc > rc else " to the left of "
        elif rc == tc:
            rel = " below " if tr > rr else " above "
        if rel is not None:
            fam["relation"] += [f"{h}{rel}{rt}" for h in heads for rt in _unique_refs(scene, r, memo)]


def _counting_candidates(scene: Scene, t: int, memo: dict[str, list[int]], fam: dict[str, list[str]]) -> None:
    """Sentence families that reason over the whole scene: majority colour, between two objects."""
    objs = scene.objects
    o = objs[t]
    fam["majority"] = [f"{h}{_MAJORITY}" for h in _plain_nps(o, with_color=False)]
    for a in range(len(objs)):
        for b in range(a + 1, len(objs)):
            if t in (a, b):
                continue
            (ra, ca), (rb, cb) = objs[a].cell, objs[b].cell
            if ((ra + rb) / 2, (ca + cb) / 2) != o.cell or max(abs(ra - rb), abs(ca - cb)) != 2:
                continue
            for ta in _unique_refs(scene, a, memo)[:3]:
                for tb in _unique_refs(scene, b, memo)[:3]:
                    fam["between"] += [f"{h} between {ta} and {tb}" for h in ("the shape", f"the {o.shape}")]


def _candidates(scene: Scene, t: int) -> dict[str, list[str]]:
    """Every generated text per family that resolves to exactly the target ``t``."""
    memo: dict[str, list[int]] = {}
    fam: dict[str, list[str]] = {f: [] for f in (*SHORT_FAMILIES, *SENTENCE_FAMILIES)}
    _short_candidates(scene, t, memo, fam)
    _comparison_candidates(scene, t, memo, fam)
    _counting_candidates(scene, t, memo, fam)
    return {f: [x for x in texts if resolve_query(scene, x, memo) == [t]] for f, texts in fam.items()}


def make_target_queries(scene: Scene, rng: np.random.Generator) -> list[TargetQuery]:
    """1-3 texts that all identify ``scene.focus`` uniquely, from distinct families where possible.

    All texts of one image share ``is_sentence`` (ReasonSeg stores the flag per image). Sentence
    families are chosen half of the time when the layout allows one; "location" always works as a fallback
    because a grid cell holds at most one object.
    """
    t = scene.focus_index
    cands = {f: v for f, v in _candidates(scene, t).items() if v}
    sentence_fams = [f for f in SENTENCE_FAMILIES if f in cands]
    is_sentence = bool(sentence_fams) and bool(rng.random() < _P_SENTENCE)
    fams = sentence_fams if is_sentence else [f for f in SHORT_FAMILIES if f in cands]
    k = int(rng.integers(1, 4))
    order = [fams[int(i)] for i in rng.permutation(len(fams))]
    picked: list[tuple[str, str]] = []
    while len(picked) < k:
        progress = False
        for f in order:
            pool = [x for x in cands[f] if x not in {p[1] for p in picked}]
            if pool and len(picked) < k:
                picked.append((f, pool[int(rng.integers(len(pool)))]))
                progress = True
        if not progress:
            break
    o = scene.objects[t]
    return [
        TargetQuery(
            text=text,
            is_sentence=is_sentence,
            target_index=t,
            description=o.shape,
            attributes=target_attributes(o),
            family=f,
        )
        for f, text in picked
    ]


# ----------------------------------------------------------------------------------------------- dialogue


def _count_word(n: int) -> str:
    return NUMBER_WORDS[n]


def _name(o: SceneObject) -> str:
    return f"{o.color} {o.shape}"


def _a(phrase: str) -> str:
    """English indefinite article for a phrase ("an orange circle")."""
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def make_dialogue(scene: Scene, rng: np.random.Generator, n_items: int = 5) -> list[DialogueItem]:
    """``n_items`` distinct question/answer pairs of varied kinds, answers short and exact (number words).

    Kinds: counting by shape or colour, colour / shape at a location, what lies left/right/above/below a
    uniquely named object ("nothing" when empty), existence ("yes"/"no", balanced), where an object is, and
    its size.
    """
    objs = scene.objects
    names = Counter(_name(o) for o in objs)
    unique = [o for o in objs if names[_name(o)] == 1]
    pool: list[DialogueItem] = []

    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    pool.append(DialogueItem(
        question=f"how many {SHAPE_PLURALS[shape]} are there ?",
        answer=_count_word(sum(o.shape == shape for o in objs)),
    ))
    color = COLORS[int(rng.integers(len(COLORS)))]
    pool.append(DialogueItem(
        question=f"how many {color} shapes are there ?", answer=_count_word(sum(o.color == color for o in objs))
    ))
    i = int(rng.integers(len(objs)))
    pool.append(DialogueItem(question=f"what colour is the shape in the {objs[i].location} ?", answer=objs[i].color,
                             target_index=i))
    i = int(rng.integers(len(objs)))
    pool.append(DialogueItem(question=f"what shape is in the {objs[i].location} ?", answer=objs[i].shape,
                             target_index=i))
    if rng.random() < 0.5:
        c, s = _name(objs[int(rng.integers(len(objs)))]).split()
    else:
        c, s = COLORS[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))]
    pool.append(DialogueItem(question=f"is there {_a(f'{c} {s}')} ?", answer="yes" if names[f"{c} {s}"] else "no"))
    if unique:
        ref = unique[int(rng.integers(len(unique)))]
        rel_words = ["to the left of", "to the right of", "above", "below"]
        rel = rel_words[int(rng.integers(4))]
        hits = resolve_query(scene, f"the shape {rel} the {_name(ref)}")
        if len(hits) <= 1:
            answer = _a(_name(objs[hits[0]])) if hits else "nothing"
            pool.append(DialogueItem(question=f"what is {rel} the {_name(ref)} ?", answer=answer,
                                     target_index=hits[0] if hits else None))
        ref = unique[int(rng.integers(len(unique)))]
        pool.append(DialogueItem(question=f"where is the {_name(ref)} ?", answer=ref.location,
                                 target_index=objs.index(ref)))
        ref = unique[int(rng.integers(len(unique)))]
        pool.append(DialogueItem(question=f"what size is the {_name(ref)} ?", answer=ref.size,
                                 target_index=objs.index(ref)))
    picks = rng.permutation(len(pool))[:n_items]
    return [pool[int(i)] for i in sorted(picks)]
