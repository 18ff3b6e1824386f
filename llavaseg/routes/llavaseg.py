"""The LLaVASeg route: frozen MLLM reasons (two chat turns) -> frozen text encoder -> adapters -> frozen SAM.

1. *Reason*: the MLLM turns the query into a simple target description (``prompts/reason.txt``).
2. *Attributes*: in the same conversation it lists the target's visual attributes (``prompts/attributes.txt``),
   parsed into :class:`~llavaseg.attributes.Attributes`; if nothing parses, the description is used alone.
3. *Prompt SAM*: description and attribute phrases are embedded by the frozen open_clip text tower; the
   multi-scale adapters read them and the frozen SAM features and emit prompt embeddings for SAM's decoder.
Separately the MLLM answers the query as an ordinary chat turn: that answer is the base model's, unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from llavaseg.attributes import Attributes, ParseMethod, parse_attributes
from llavaseg.errors import InputError
from llavaseg.models.adapters import MultiScaleAdapters
from llavaseg.models.mllm import FrozenMLLM
from llavaseg.models.sam import FrozenSAM, SamImageFeatures
from llavaseg.models.text_encoder import FrozenTextEncoder
from llavaseg.prompting import PromptSet
from llavaseg.results import SegmentationResult
from llavaseg.routes.base import StageTimer


class StageOutputs(BaseModel):
    """What the frozen MLLM said for one query in the two chain-of-thought stages, and how it was read."""

    reason_prompt: str
    reason_output: str
    description: str
    attributes_prompt: str
    attributes_output: str
    attributes: Attributes
    attribute_parse: ParseMethod


def run_stages(mllm: FrozenMLLM, prompts: PromptSet, images: list[np.ndarray], queries: list[str],
               timer: StageTimer | None = None) -> list[StageOutputs]:
    """Both chat turns for a batch; stage 2 continues stage 1's conversation (and its KV cache)."""
    timer = timer or StageTimer()
    reason_prompts = [prompts.render("reason", query=query) for query in queries]
    with timer.stage("mllm_reason"):
        raw_descriptions, conversation = mllm.begin(images, reason_prompts)
    # An empty description would leave stage 2 nothing to ask about: the query stands in for it.
    descriptions = [raw.strip() or query for raw, query in zip(raw_descriptions, queries)]
    attribute_prompts = [prompts.render("attributes", description=d, query=q) for d, q in zip(descriptions, queries)]
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


class ReferenceStages:
    """Ground-truth stage outputs of a ReasonSeg-format split (its ``stages.jsonl``), keyed by image and query.

    Why: the oracle route feeds these to the text encoder, adapters and SAM in place of the MLLM's answers, so
    a benchmark separates the two halves of the method: how well the frozen MLLM reasons (route ``llavaseg``)
    and how well the adapters segment what a correct description names (route ``llavaseg-oracle``). Images are
    matched by content hash, the same key every per-image cache uses, so the route's call signature is unchanged.
    """

    def __init__(self, root: str | Path, split: str) -> None:
        from llavaseg.cache import TeacherStages
        from llavaseg.data.reasonseg import ReasonSegDataset
        from llavaseg.images import image_digest

        dataset = ReasonSegDataset(root, split)
        teacher = TeacherStages.for_dataset(dataset)
        self.records: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
        digests: dict[str, str] = {}
        for query in dataset.queries():
            if query.sample_id not in digests:
                digests[query.sample_id] = image_digest(query.load_image())
            self.records[(digests[query.sample_id], query.text)] = teacher.lookup(query)
        self.source = teacher.source

    def stage_outputs(self, prompts: PromptSet, images: list[np.ndarray], queries: list[str]) -> list[StageOutputs]:
        from llavaseg.images import image_digest

        outputs = []
        for image, query in zip(images, queries):
            key = (image_digest(image), query)
            if key not in self.records:
                raise InputError(f"{self.source}: no ground-truth stages for query {query!r} on this image")
            description, attributes = self.records[key]
            attribute_text = " ; ".join(f"{k} : {v}" for k, v in attributes.items())
            outputs.append(StageOutputs(
                reason_prompt=prompts.render("reason", query=query), reason_output=description,
                description=description,
                attributes_prompt=prompts.render("attributes", description=description, query=query),
                attributes_output=attribute_text, attributes=Attributes(**attributes), attribute_parse="reference"))
        return outputs


def text_phrases(description: str, attributes: Attributes, use_attributes: bool, max_tokens: int) -> list[str]:
    """What the text encoder embeds for one query: the description first, then one phrase per attribute."""
    phrases = [description]
    if use_attributes:
        phrases += attributes.phrases()
    return phrases[:max_tokens]


def encode_phrases(encoder: FrozenTextEncoder, phrase_lists: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed ragged phrase lists into ``B x T x D`` with a ``B x T`` validity mask."""
    width = max(len(phrases) for phrases in phrase_lists)
    flat = encoder.encode_text([phrase for phrases in phrase_lists for phrase in phrases])
    text = torch.zeros((len(phrase_lists), width, flat.shape[-1]))
    mask = torch.zeros((len(phrase_lists), width), dtype=torch.bool)
    offset = 0
    for row, phrases in enumerate(phrase_lists):
        text[row, : len(phrases)] = flat[offset: offset + len(phrases)]
        mask[row, : len(phrases)] = True
        offset += len(phrases)
    return text, mask


def adapter_mask_logits(adapters: MultiScaleAdapters, sam: FrozenSAM, features: list[SamImageFeatures],
                        text: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution mask logits (``B x 1 x 4g x 4g``) and predicted IoU (``B x 1``) for one prompt per image.

    Differentiable in the adapters' parameters (used unchanged by training).
    """
    device = sam.device
    levels = [torch.cat([f.levels[i] for f in features]).to(device) for i in range(len(features[0].levels))]
    embedding = torch.cat([f.embedding for f in features]).to(device)
    sparse, dense_delta = adapters(text.to(device), text_mask.to(device), levels, embedding)
    dense = sam.no_mask_dense(len(features))
    if dense_delta is not None:
        dense = dense + dense_delta
    # SAM's decoder takes one image embedding with any number of prompt rows: decode all queries on the same
    # image in one call, and loop over distinct images.
    groups: dict[int, list[int]] = {}
    for index, feature in enumerate(features):
        groups.setdefault(id(feature), []).append(index)
    logits: list[torch.Tensor | None] = [None] * len(features)
    ious: list[torch.Tensor | None] = [None] * len(features)
    for rows in groups.values():
        low, iou = sam.decode(features[rows[0]], sparse[rows], dense[rows], multimask_output=False)
        for position, row in enumerate(rows):
            logits[row], ious[row] = low[position: position + 1], iou[position: position + 1]
    return torch.cat(logits), torch.cat(ious)


class LLaVASegRoute:
    """Frozen MLLM + frozen text encoder + trainable adapters + frozen SAM."""

    name = "llavaseg"

    def __init__(self, mllm: FrozenMLLM, sam: FrozenSAM, text_encoder: FrozenTextEncoder,
                 adapters: MultiScaleAdapters, prompts: PromptSet, *, use_attributes: bool = True,
                 with_answer: bool = True, reference: ReferenceStages | None = None) -> None:
        self.mllm = mllm
        self.sam = sam
        self.text_encoder = text_encoder
        self.adapters = adapters.eval()
        self.prompts = prompts
        self.use_attributes = use_attributes
        self.with_answer = with_answer
        self.reference = reference
        if not use_attributes:
            self.name = "llavaseg-noattr"
        if reference is not None:
            self.name = "llavaseg-oracle"

    def dialogue_model(self) -> FrozenMLLM:
        return self.mllm

    def __call__(self, images: list[np.ndarray], queries: list[str]) -> list[SegmentationResult]:
        timer = StageTimer()
        if self.reference is not None:
            stages = self.reference.stage_outputs(self.prompts, images, queries)
        else:
            stages = run_stages(self.mllm, self.prompts, images, queries, timer)
        answers: list[str | None] = [None] * len(images)
        if self.with_answer:
            with timer.stage("mllm_answer"):
                answers = list(self.mllm.answer(images, queries))
        phrase_lists = [text_phrases(s.description, s.attributes, self.use_attributes,
                                     self.adapters.config.max_text_tokens) for s in stages]
        with timer.stage("text_encoder"):
            text, text_mask = encode_phrases(self.text_encoder, phrase_lists)
        with timer.stage("sam_encoder"):
            features = self.sam.encode_batch(images)
        with timer.stage("adapters_decoder"), torch.inference_mode():
            low_res, ious = adapter_mask_logits(self.adapters, self.sam, features, text, text_mask)
            masks = [(self.sam.upscale(low_res[i: i + 1], f)[0, 0] > self.sam.sam.mask_threshold).cpu().numpy()
                     for i, f in enumerate(features)]
        per_item = timer.per_item(len(images))
        results = []
        for index, stage in enumerate(stages):
            results.append(SegmentationResult(
                route=self.name, query=queries[index], mask=masks[index], score=float(ious[index, 0]),
                description=stage.description, attributes=stage.attributes, attribute_parse=stage.attribute_parse,
                used_attributes=self.use_attributes and bool(stage.attributes), answer=answers[index],
                prompts={"reason": stage.reason_prompt, "attributes": stage.attributes_prompt,
                         **({"answer": queries[index]} if self.with_answer else {})},
                raw_outputs={"reason": stage.reason_output, "attributes": stage.attributes_output,
                             **({"answer": answers[index] or ""} if self.with_answer else {})},
                timings=per_item,
            ))
        return results


def build(context) -> LLaVASegRoute:
    """Registry entry (see ``llavaseg.routes.registry``)."""
    parts = context.components
    return LLaVASegRoute(parts.mllm, parts.sam, parts.text_encoder, parts.adapters, context.prompts,
                         with_answer=context.with_answer)


def build_without_attributes(context) -> LLaVASegRoute:
    """The attribute-free ablation: same models and adapters, description only."""
    parts = context.components
    return LLaVASegRoute(parts.mllm, parts.sam, parts.text_encoder, parts.adapters, context.prompts,
                         use_attributes=False, with_answer=context.with_answer)


def build_with_reference_stages(context) -> LLaVASegRoute:
    """The oracle: ground-truth description and attributes (``stages.jsonl``) instead of the MLLM's answers.

    Needs ``context.options["reference_data"] = (root, split)`` of a split that has ``stages.jsonl`` (the
    tiny world's do); ``llavaseg-bench reasonseg`` sets it. The chat answer still comes from the frozen MLLM.
    """
    reference = context.options.get("reference_data")
    if reference is None:
        raise InputError("route llavaseg-oracle needs a data split with ground-truth stages (stages.jsonl)")
    parts = context.components
    return LLaVASegRoute(parts.mllm, parts.sam, parts.text_encoder, parts.adapters, context.prompts,
                         with_answer=context.with_answer, reference=ReferenceStages(*reference))
