"""The LLaVASeg route: frozen MLLM reasons (two chat turns) -> frozen text encoder -> adapters -> frozen SAM.

1. *Reason*: the MLLM turns the query into a simple target description (``prompts/reason.txt``).
2. *Attributes*: in the same conversation it lists the target's visual attributes (``prompts/attributes.txt``),
   parsed into :class:`~llavaseg.attributes.Attributes`; if nothing parses, the description is used alone.
3. *Prompt SAM*: description and attribute phrases are embedded by the frozen open_clip text tower; the
   multi-scale adapters read them and the frozen SAM features and emit prompt embeddings for SAM's decoder.
Separately the MLLM answers the query as an ordinary chat turn: that answer is the base model's, unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from llavaseg.errors import InputError
from llavaseg.method.segment import adapter_mask_logits, encode_phrases, text_phrases
from llavaseg.method.stages import GroundTruthStageSource, run_stages
from llavaseg.models.adapters import MultiScaleAdapters
from llavaseg.models.mllm import FrozenMLLM
from llavaseg.models.sam import FrozenSAM
from llavaseg.models.text_encoder import FrozenTextEncoder
from llavaseg.prompting import PromptSet
from llavaseg.results import SegmentationResult
from llavaseg.timing import StageTimer


class LLaVASegRoute:
    """Frozen MLLM + frozen text encoder + trainable adapters + frozen SAM."""

    name = "llavaseg"

    def __init__(self, mllm: FrozenMLLM, sam: FrozenSAM, text_encoder: FrozenTextEncoder,
                 adapters: MultiScaleAdapters, prompts: PromptSet, *, use_attributes: bool = True,
                 with_answer: bool = True, reference: GroundTruthStageSource | None = None) -> None:
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
        calls_before = self.mllm.row_calls
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
            masks = [(self.sam.upscale(low_res[i: i + 1], f)[0, 0] > self.sam.mask_threshold).cpu().numpy()
                     for i, f in enumerate(features)]
        per_item = timer.per_item(len(images))
        calls = f"{(self.mllm.row_calls - calls_before) / max(len(images), 1):g}"
        results = []
        for index, stage in enumerate(stages):
            results.append(SegmentationResult(
                route=self.name, query=queries[index], mask=masks[index], score=float(ious[index, 0]),
                description=stage.description, attributes=stage.attributes, attribute_parse=stage.attribute_parse,
                used_attributes=self.use_attributes and bool(stage.attributes), answer=answers[index],
                prompts={"reason": stage.reason_prompt, "attributes": stage.attributes_prompt,
                         **({"answer": queries[index]} if self.with_answer else {})},
                raw_outputs={"reason": stage.reason_output, "attributes": stage.attributes_output, "mllm_calls": calls,
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
                         with_answer=context.with_answer, reference=GroundTruthStageSource(*reference))
