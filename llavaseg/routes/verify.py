"""``llavaseg-verify``: the LLaVASeg route that checks its mask with the same frozen MLLM, and retries.

Per query: stage 1 once; stage 2 greedily, ``samples`` times by seeded sampling and by beam search (optionally
constrained to an attribute schema, optionally ordered by a self-consistency vote):
:mod:`llavaseg.method.candidates`. Each distinct attribute set gives a candidate mask through the same adapters
and frozen segmenter (the description alone is the last candidate). The frozen MLLM is then shown the first
candidate as the image with that region highlighted and the rest dimmed (:func:`llavaseg.views.highlight_view`),
with the ``verify`` prompt. If its probability of "yes" reaches ``threshold`` it is kept (one check); otherwise
every other candidate is checked and the most probable one replaces it only if it is more probable by ``margin``:
a check that errs now and then must not overturn a first answer that is usually right (measured in
``docs/tinyworld.md``). Nothing is trained beyond the adapters; the chat answer is the frozen MLLM's own, as in
``llavaseg``.

Options (``RouteContext.options``): ``verify`` (default true), ``samples`` (0: seeded stage-2 samples for the
vote, each query drawn independently of its batch; on tiny-world train the vote did not help, measured in
``docs/tinyworld.md``), ``temperature`` (1.0),
``vote`` (true), ``beams`` (4: beam-search alternatives, the candidates a confident small MLLM lacks),
``constrained`` (true when an attribute schema is known: the ``attribute_schema`` option, a dict of key ->
values, which the tiny-world preset sets), ``threshold`` (0.4), ``margin`` (0.4),
``max_candidates`` (6), ``seed`` (0). ``raw_outputs`` records the candidates, their votes and "yes"
probabilities, and ``mllm_calls`` (conversation turns sent to the MLLM for the query).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from llavaseg.attributes import Attributes
from llavaseg.errors import InputError
from llavaseg.method.candidates import StageCandidates, sample_stage_candidates
from llavaseg.method.constrained import attribute_constraint
from llavaseg.method.segment import adapter_mask_logits, encode_phrases, text_phrases
from llavaseg.results import SegmentationResult
from llavaseg.timing import StageTimer
from llavaseg.views import highlight_view


class VerifyRoute:
    """Candidates from several stage-2 answers, each checked by the frozen MLLM on a highlighted view."""

    def __init__(self, mllm, sam, text_encoder, adapters, prompts, *, verify: bool = True, samples: int = 0,
                 temperature: float = 1.0, vote: bool = True, beams: int = 4,
                 schema: dict[str, list[str]] | None = None,
                 threshold: float = 0.4, margin: float = 0.4, max_candidates: int = 6, seed: int = 0,
                 with_answer: bool = True, name: str = "llavaseg-verify") -> None:
        if samples < 0 or max_candidates < 1 or not 0.0 <= threshold <= 1.0 or not 0.0 <= margin <= 1.0:
            raise InputError("verify route: samples >= 0, max_candidates >= 1, 0 <= threshold, margin <= 1 required")
        self.mllm, self.sam, self.text_encoder, self.adapters = mllm, sam, text_encoder, adapters.eval()
        self.prompts, self.name, self.with_answer = prompts, name, with_answer
        self.verify, self.samples, self.temperature, self.vote, self.beams = verify, samples, temperature, vote, beams
        self.threshold, self.margin, self.max_candidates, self.seed = threshold, margin, max_candidates, seed
        self.constraint = attribute_constraint(mllm.tokenizer, schema) if schema else None

    def dialogue_model(self):
        return self.mllm

    def _masks(self, images: list[np.ndarray], attribute_lists: list[list[Attributes | None]],
               descriptions: list[str]) -> list[list[tuple[np.ndarray, float]]]:
        """Every candidate's mask and predicted IoU (``None`` attributes = the description alone), one batch."""
        rows = [(i, attributes) for i, lists in enumerate(attribute_lists) for attributes in lists]
        max_tokens = self.adapters.config.max_text_tokens
        phrases = [text_phrases(descriptions[i], attributes or Attributes(), attributes is not None, max_tokens)
                   for i, attributes in rows]
        text, text_mask = encode_phrases(self.text_encoder, phrases)
        features = self.sam.encode_batch(images)
        with torch.inference_mode():
            low, iou = adapter_mask_logits(self.adapters, self.sam, [features[i] for i, _ in rows], text, text_mask)
        out: list[list[tuple[np.ndarray, float]]] = [[] for _ in images]
        for row, (i, _) in enumerate(rows):
            mask = (self.sam.upscale(low[row: row + 1], features[i])[0, 0] > self.sam.mask_threshold).cpu().numpy()
            out[i].append((mask, float(iou[row, 0])))
        return out

    def _yes(self, images: list[np.ndarray], queries: list[str], masks: list[list[tuple[np.ndarray, float]]],
             rows: list[int], position: int) -> list[float]:
        views = [highlight_view(images[i], masks[i][position][0]) for i in rows]
        checks = [self.prompts.render("verify", query=queries[i]) for i in rows]
        return [float(p) for p in self.mllm.choice_probabilities(views, checks, ("yes", "no"))[:, 0]]

    def _check(self, images: list[np.ndarray], queries: list[str], masks: list[list[tuple[np.ndarray, float]]]
               ) -> tuple[list[int], list[list[float]]]:
        """The kept candidate per query and the "yes" probabilities checked (one batched call per position)."""
        probabilities = [[p] for p in self._yes(images, queries, masks, list(range(len(images))), 0)]
        doubtful = [i for i in range(len(images)) if probabilities[i][0] < self.threshold]
        for position in range(1, max((len(masks[i]) for i in doubtful), default=0)):
            rows = [i for i in doubtful if position < len(masks[i])]
            for i, p in zip(rows, self._yes(images, queries, masks, rows, position)):
                probabilities[i].append(p)
        kept = []
        for i, p in enumerate(probabilities):
            best = int(np.argmax(p))
            kept.append(best if p[best] - p[0] >= self.margin else 0)
        return kept, probabilities

    def __call__(self, images: list[np.ndarray], queries: list[str]) -> list[SegmentationResult]:
        timer = StageTimer()
        calls_before = self.mllm.row_calls
        stages = sample_stage_candidates(self.mllm, self.prompts, images, queries, samples=self.samples,
                                         temperature=self.temperature, seed=self.seed, constraint=self.constraint,
                                         vote=self.vote, beams=self.beams, timer=timer)
        with timer.stage("candidate_masks"):
            lists = [[*s.attribute_sets[: self.max_candidates - 1], None] for s in stages]
            masks = self._masks(images, lists, [s.description for s in stages])
        if self.verify:
            with timer.stage("mllm_verify"):
                kept, probabilities = self._check(images, queries, masks)
        else:
            kept, probabilities = [0] * len(images), [[] for _ in images]
        answers: list[str | None] = [None] * len(images)
        if self.with_answer:
            with timer.stage("mllm_answer"):
                answers = list(self.mllm.answer(images, queries))
        calls = (self.mllm.row_calls - calls_before) / max(len(images), 1)
        per_item = timer.per_item(len(images))
        return [self._result(query, stage, lists[i], masks[i], kept[i], probabilities[i], answers[i], calls, per_item)
                for i, (query, stage) in enumerate(zip(queries, stages))]

    def _result(self, query: str, stage: StageCandidates, attribute_sets: list[Attributes | None],
                masks: list[tuple[np.ndarray, float]], kept: int, probabilities: list[float], answer: str | None,
                calls: float, timings: dict[str, float]) -> SegmentationResult:
        attributes = attribute_sets[kept] or Attributes()
        candidates = [{"attributes": dict(a.items()) if a is not None else None,
                       "votes": stage.votes[j] if a is not None and j < len(stage.votes) else 0,
                       "p_yes": probabilities[j] if j < len(probabilities) else None}
                      for j, a in enumerate(attribute_sets)]
        return SegmentationResult(
            route=self.name, query=query, mask=masks[kept][0], score=masks[kept][1], description=stage.description,
            attributes=attributes, attribute_parse="key_value" if attribute_sets[kept] is not None else "none",
            used_attributes=attribute_sets[kept] is not None, answer=answer,
            prompts={"reason": stage.reason_prompt, "attributes": stage.attributes_prompt,
                     **({"answer": query} if self.with_answer else {})},
            raw_outputs={"attributes": stage.answers[0], "samples": json.dumps(stage.answers[1:]),
                         "candidates": json.dumps(candidates), "kept": str(kept), "mllm_calls": f"{calls:g}",
                         **({"answer": answer or ""} if self.with_answer else {})},
            timings=timings)


def _schema(context) -> dict[str, list[str]] | None:
    """The ``attribute_schema`` option (a dict, or its JSON text); presets may set it (the tiny world's does)."""
    schema = context.options.get("attribute_schema")
    return json.loads(schema) if isinstance(schema, str) else schema


def _flag(value: object, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def build(context) -> VerifyRoute:
    """Registry entry (see ``llavaseg.routes.registry``)."""
    parts, options = context.components, context.options
    schema = _schema(context) if _flag(options.get("constrained"), True) else None
    return VerifyRoute(parts.mllm, parts.sam, parts.text_encoder, parts.adapters, context.prompts,
                       verify=_flag(options.get("verify"), True), samples=int(options.get("samples", 0)),
                       temperature=float(options.get("temperature", 1.0)), vote=_flag(options.get("vote"), True),
                       beams=int(options.get("beams", 4)),
                       schema=schema, threshold=float(options.get("threshold", 0.4)),
                       margin=float(options.get("margin", 0.4)),
                       max_candidates=int(options.get("max_candidates", 6)), seed=int(options.get("seed", 0)),
                       with_answer=context.with_answer, name=str(options.get("name", "llavaseg-verify")))
