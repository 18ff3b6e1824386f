"""Stages 1 and 2 of the method: the frozen MLLM reasons about the query, then lists the target's attributes.

Stage 2 continues stage 1's conversation (and its KV cache), so the MLLM answers about the description it just
gave. :class:`GroundTruthStageSource` supplies the same :class:`StageOutputs` from a split's ground-truth stages
instead, so the oracle route and training on annotations go through exactly the code inference uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from llavaseg.attributes import Attributes, ParseMethod, parse_attributes
from llavaseg.data.annotations import GroundTruthStages, StageRecord
from llavaseg.errors import InputError
from llavaseg.images import image_digest
from llavaseg.models.mllm import Conversation, FrozenMLLM
from llavaseg.prompting import PromptSet
from llavaseg.timing import StageTimer

__all__ = ["StageOutputs", "ReasonStage", "reason_stage", "run_stages", "ground_truth_stage_outputs",
           "GroundTruthStageSource"]


class StageOutputs(BaseModel):
    """What the frozen MLLM said for one query in the two chain-of-thought stages, and how it was read."""

    reason_prompt: str
    reason_output: str
    description: str
    attributes_prompt: str
    attributes_output: str
    attributes: Attributes
    attribute_parse: ParseMethod


@dataclass
class ReasonStage:
    """Stage 1 for a batch, and the stage-2 questions it leads to (the conversation continues from here)."""

    reason_prompts: list[str]
    raw_descriptions: list[str]
    descriptions: list[str]
    attribute_prompts: list[str]
    conversation: Conversation


def reason_stage(mllm: FrozenMLLM, prompts: PromptSet, images: list[np.ndarray], queries: list[str],
                 timer: StageTimer) -> ReasonStage:
    """Stage 1 (the description) for a batch and the rendered stage-2 prompts; shared by every route that asks."""
    reason_prompts = [prompts.render("reason", query=query) for query in queries]
    with timer.stage("mllm_reason"):
        raw_descriptions, conversation = mllm.begin(images, reason_prompts)
    # An empty description would leave stage 2 nothing to ask about: the query stands in for it.
    descriptions = [raw.strip() or query for raw, query in zip(raw_descriptions, queries)]
    attribute_prompts = [prompts.render("attributes", description=d, query=q) for d, q in zip(descriptions, queries)]
    return ReasonStage(reason_prompts, raw_descriptions, descriptions, attribute_prompts, conversation)


def run_stages(mllm: FrozenMLLM, prompts: PromptSet, images: list[np.ndarray], queries: list[str],
               timer: StageTimer | None = None) -> list[StageOutputs]:
    """Both chat turns for a batch; stage 2 continues stage 1's conversation (and its KV cache)."""
    timer = timer or StageTimer()
    first = reason_stage(mllm, prompts, images, queries, timer)
    reason_prompts, raw_descriptions, descriptions, attribute_prompts, conversation = (
        first.reason_prompts, first.raw_descriptions, first.descriptions, first.attribute_prompts,
        first.conversation)
    with timer.stage("mllm_attributes"):
        raw_attributes = mllm.follow_up(conversation, attribute_prompts)
    outputs = []
    for index, raw in enumerate(raw_attributes):
        parsed = parse_attributes(raw)
        outputs.append(StageOutputs(
            reason_prompt=reason_prompts[index], reason_output=raw_descriptions[index],
            description=descriptions[index], attributes_prompt=attribute_prompts[index],
            attributes_output=raw, attributes=parsed.attributes, attribute_parse=parsed.method))
    return outputs


def ground_truth_stage_outputs(prompts: PromptSet, query: str, record: StageRecord) -> StageOutputs:
    """The stage outputs a perfect MLLM would give: the record's description and attributes, verbatim."""
    attribute_text = " ; ".join(f"{k} : {v}" for k, v in record.attributes.items())
    return StageOutputs(
        reason_prompt=prompts.render("reason", query=query), reason_output=record.description,
        description=record.description,
        attributes_prompt=prompts.render("attributes", description=record.description, query=query),
        attributes_output=attribute_text, attributes=Attributes(**record.attributes), attribute_parse="reference")


class GroundTruthStageSource:
    """Ground-truth stages of a ReasonSeg-format split, keyed by (image content, query text).

    Why content: a route is called with pixels and texts only, and images are matched by the same content hash
    every per-image cache uses, so the route's call signature stays that of every other route.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        from llavaseg.data.reasonseg import ReasonSegDataset

        dataset = ReasonSegDataset(root, split)
        stages = GroundTruthStages.for_dataset(dataset)
        self.records: dict[tuple[str, str], StageRecord] = {}
        digests: dict[str, str] = {}
        for query in dataset.queries():
            if query.sample_id not in digests:
                digests[query.sample_id] = image_digest(query.load_image())
            self.records[(digests[query.sample_id], query.text)] = stages.lookup(query)
        self.source = stages.source

    def stage_outputs(self, prompts: PromptSet, images: list[np.ndarray], queries: list[str]) -> list[StageOutputs]:
        outputs = []
        for image, query in zip(images, queries):
            record = self.records.get((image_digest(image), query))
            if record is None:
                raise InputError(f"{self.source}: no ground-truth stages for query {query!r} on this image")
            outputs.append(ground_truth_stage_outputs(prompts, query, record))
        return outputs
