"""Several stage-2 answers per query, and the candidates they give: what self-consistency votes over and what
the verify route checks.

Stage 1 runs once (greedy). Stage 2 continues each conversation several times from a fork of it: once greedily
and ``samples`` times by seeded sampling at ``temperature``, optionally constrained to an attribute schema
(:mod:`llavaseg.method.constrained`). The distinct parsed attribute sets are the candidates: the per-key
majority of those answers first when voting (self-consistency), else the greedy answer, then the other sets by
how many answers gave them; then the ``beams`` most likely answers (beam search) that are not there yet. A
tiny MLLM samples almost nothing but its greedy answer; beams still name the other objects that fit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from llavaseg.attributes import Attributes, parse_attributes
from llavaseg.method.stages import reason_stage
from llavaseg.models.mllm import Decoding, FrozenMLLM
from llavaseg.prompting import PromptSet
from llavaseg.timing import StageTimer

__all__ = ["StageCandidates", "sample_stage_candidates", "majority_attributes"]


@dataclass
class StageCandidates:
    """One query's stage outputs: its description and its distinct attribute sets, best-voted first."""

    reason_prompt: str
    description: str
    attributes_prompt: str
    answers: list[str]  # raw stage-2 answers: greedy first, then the samples, then the beams
    attribute_sets: list[Attributes] = field(default_factory=list)
    votes: list[int] = field(default_factory=list)  # answers among greedy + samples that gave each set


def _key(attributes: Attributes) -> tuple[tuple[str, str], ...]:
    return tuple(attributes.items())


def majority_attributes(parsed: list[Attributes]) -> Attributes:
    """Per key, the value most answers gave (ties: the earliest answer's value; a key no answer gave is left out)."""
    chosen: dict[str, str] = {}
    keys = list(dict.fromkeys(key for attributes in parsed for key, _ in attributes.items()))
    for key in keys:
        values = [dict(attributes.items()).get(key) for attributes in parsed]
        counts = Counter(value for value in values if value)
        if counts:
            best = max(counts.values())
            chosen[key] = next(value for value in values if value and counts[value] == best)
    return Attributes(**chosen)


def _ordered(parsed: list[Attributes], vote: bool) -> tuple[list[Attributes], list[int]]:
    """Distinct attribute sets: the head is the per-key majority (``vote``) or the greedy answer, then the others
    by how many answers gave them (ties: first appearance)."""
    counts = Counter(_key(attributes) for attributes in parsed)
    first: dict[tuple, tuple[int, Attributes]] = {}
    for index, attributes in enumerate(parsed):
        first.setdefault(_key(attributes), (index, attributes))
    head = majority_attributes(parsed) if vote else parsed[0]
    rest = sorted((entry for key, entry in first.items() if key != _key(head)),
                  key=lambda entry: (-counts[_key(entry[1])], entry[0]))
    sets = [head, *(attributes for _, attributes in rest)]
    return sets, [counts.get(_key(attributes), 0) for attributes in sets]


def sample_stage_candidates(mllm: FrozenMLLM, prompts: PromptSet, images: list[np.ndarray], queries: list[str], *,
                            samples: int = 0, temperature: float = 1.0, seed: int = 0, constraint=None,
                            vote: bool = False, beams: int = 0, timer: StageTimer | None = None
                            ) -> list[StageCandidates]:
    """Stage 1 once, stage 2 greedily and ``samples`` times; candidates per query (see the module docstring)."""
    timer = timer or StageTimer()
    first = reason_stage(mllm, prompts, images, queries, timer)
    reason_prompts, descriptions, attribute_prompts, conversation = (
        first.reason_prompts, first.descriptions, first.attribute_prompts, first.conversation)
    forks = [mllm.fork(conversation) for _ in range(samples)]
    beam_answers = [[] for _ in queries]
    if beams > 1:
        with timer.stage("mllm_beams"):
            beam_answers = mllm.follow_up_beams(conversation, attribute_prompts, beams, constraint=constraint)
    with timer.stage("mllm_attributes"):
        rounds = [mllm.follow_up(conversation, attribute_prompts, decoding=Decoding(constraint=constraint))]
        for index, fork in enumerate(forks):
            decoding = Decoding(sample=True, temperature=temperature, seed=seed + index, constraint=constraint)
            rounds.append(mllm.follow_up(fork, attribute_prompts, decoding=decoding))
    out = []
    for row, query in enumerate(queries):
        answers = [answers_of_round[row] for answers_of_round in rounds]
        sets, votes = _ordered([parse_attributes(answer).attributes for answer in answers], vote)
        for beam in beam_answers[row]:
            parsed = parse_attributes(beam).attributes
            if _key(parsed) not in {_key(known) for known in sets}:
                sets.append(parsed)
                votes.append(0)
        out.append(StageCandidates(reason_prompts[row], descriptions[row], attribute_prompts[row],
                                   answers + list(beam_answers[row]), sets, votes))
    return out
