"""Training-free route: the frozen MLLM describes the target, SAM proposes masks, open_clip picks one.

"MLLM describes, then a segmenter finds it" is a strong baseline in the literature (LLaVA + GroundingSAM,
Qwen2.5-VL + SAM2, LLM-Seg's zero-shot row): no component is trained for the task, so it measures how much
of reasoning segmentation the frozen parts already solve. Here:

1. **Stages** — the same two chat turns as the LLaVASeg route (:func:`~llavaseg.routes.llavaseg.run_stages`):
   a simple description ("circle") and its attributes ("color: red", "location: top left", ...).
2. **Proposals** — SAM is prompted with a regular ``grid x grid`` lattice of single foreground points
   (``FrozenSAM.predict_points``, multimask output: three masks per point, all points in one decoder batch).
   Masks whose predicted IoU is below ``min_iou`` or whose area is outside ``[min_area, max_area]`` (fractions
   of the image) are dropped; the rest are de-duplicated greedily by predicted IoU with a mask-IoU
   threshold (mask NMS, ``nms_iou``). This is a small re-implementation of what ``SamAutomaticMaskGenerator``
   does, because the generator's defaults (crop layers, 32x32 points, stability score on 1024-px models)
   assume the published SAM and a per-point Python loop; the wrapper already batches prompts.
3. **Scoring** — each proposal is shown to the frozen open_clip image tower as a *view*: by default the whole
   frame with every pixel outside the proposal painted grey (``view="frame"``), which keeps the object's
   position visible so a location phrase can be scored; ``view="box"`` crops to the proposal's box instead
   (the usual choice for real photographs, where location phrases are not meaningful to CLIP). The view's
   embedding is compared by cosine similarity with the description and with every attribute phrase (the
   same texts the LLaVASeg route embeds). The combined score is a weighted mean of those similarities:
   the description has weight ``description_weight`` (default 1) and each attribute phrase weight 1, so with
   four attributes the description contributes 1/5 — attributes carry most of the disambiguation, which is
   the premise of LLaVASeg. The route reports this combined score as ``SegmentationResult.score``.
4. **Selection** — the best proposal is the mask. If the query asks for several objects (a plural noun, "all",
   "every", "both", ...), the union of all proposals whose score is within ``relative_threshold`` of the
   best (``score >= best - relative_threshold * (best - median)``) is returned instead.

``dialogue_model()`` returns the frozen MLLM, untouched. Options come from ``RouteContext.options``:
``grid``, ``min_iou``, ``nms_iou``, ``min_area``, ``max_area``, ``view``, ``description_weight``,
``relative_threshold``, ``multi``.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from llavaseg.attributes import Attributes
from llavaseg.errors import InputError
from llavaseg.images import image_digest
from llavaseg.method.stages import StageOutputs, run_stages
from llavaseg.models.mllm import FrozenMLLM
from llavaseg.models.sam import FrozenSAM
from llavaseg.models.text_encoder import FrozenTextEncoder
from llavaseg.prompting import PromptSet
from llavaseg.results import SegmentationResult
from llavaseg.timing import StageTimer
from llavaseg.views import proposal_view

__all__ = [
    "TrainingFreeOptions",
    "Proposals",
    "point_grid",
    "mask_iou_matrix",
    "dedupe_masks",
    "propose_masks",
    "scoring_phrases",
    "combined_scores",
    "wants_several",
    "select_masks",
    "TrainingFreeRoute",
    "build",
]

# ------------------------------------------------------------------------------------------------- options


class TrainingFreeOptions(BaseModel):
    """Knobs of the route, read from ``RouteContext.options`` (unknown keys belong to other routes)."""

    model_config = ConfigDict(frozen=True)

    grid: int = Field(16, ge=1, le=64, description="points per side of the prompt lattice")
    points_per_batch: int = Field(64, ge=1, description="point prompts decoded at once (bounds memory)")
    min_iou: float = Field(0.6, ge=0.0, le=1.0, description="minimum SAM predicted IoU of a proposal")
    nms_iou: float = Field(0.7, gt=0.0, le=1.0, description="mask IoU above which a proposal is a duplicate")
    min_area: float = Field(0.0005, ge=0.0, le=1.0, description="minimum proposal area, fraction of the image")
    max_area: float = Field(0.6, gt=0.0, le=1.0, description="maximum proposal area, fraction of the image")
    view: str = Field("frame", pattern="^(frame|box)$", description="what CLIP sees of a proposal")
    description_weight: float = Field(1.0, ge=0.0, description="weight of the description vs 1 per attribute")
    relative_threshold: float = Field(0.5, ge=0.0, le=1.0, description="union rule: share of best-median gap")
    multi: str = Field("auto", pattern="^(auto|always|never)$", description="when to return a union")

    @classmethod
    def from_context(cls, options: dict[str, object]) -> TrainingFreeOptions:
        known = {k: v for k, v in options.items() if k in cls.model_fields}
        try:
            return cls(**known)
        except ValueError as exc:
            first = str(exc).splitlines()
            raise InputError(f"bad training-free route option: {' '.join(first[1:3]).strip()}") from None


# ----------------------------------------------------------------------------------------------- proposals


class Proposals(BaseModel):
    """De-duplicated SAM masks for one image, best predicted IoU first."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    masks: np.ndarray  # K x H x W bool
    sam_iou: np.ndarray  # K float: SAM's predicted IoU
    points: np.ndarray  # K x 2 (x, y): the prompt that produced each mask


def point_grid(height: int, width: int, per_side: int) -> np.ndarray:
    """``per_side**2 x 2`` (x, y) cell centres of a regular lattice, as SamAutomaticMaskGenerator places them."""
    offsets = (np.arange(per_side) + 0.5) / per_side
    xs, ys = np.meshgrid(offsets * width, offsets * height)
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def mask_iou_matrix(masks: np.ndarray, others: np.ndarray | None = None) -> np.ndarray:
    """Pairwise IoU of boolean masks ``K x H x W`` (and ``L x H x W``): ``K x L``; two empty masks give 0."""
    a = torch.from_numpy(np.ascontiguousarray(masks)).reshape(len(masks), -1).float()
    b = a if others is None else torch.from_numpy(np.ascontiguousarray(others)).reshape(len(others), -1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return (inter / union.clamp(min=1.0)).numpy()


def dedupe_masks(masks: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy mask NMS: indices of kept masks, best score first; a mask overlapping a kept one by more than
    ``iou_threshold`` (mask IoU, not box IoU: shapes on a grid have overlapping boxes) is dropped."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    if len(order) == 0:
        return order
    ious = mask_iou_matrix(masks[order])
    kept: list[int] = []
    for rank in range(len(order)):
        if all(ious[rank, k] <= iou_threshold for k in kept):
            kept.append(rank)
    return order[kept]


@torch.inference_mode()
def propose_masks(sam: FrozenSAM, image: np.ndarray, options: TrainingFreeOptions) -> Proposals:
    """Prompt SAM with a point lattice (3 masks per point), filter by predicted IoU and area, de-duplicate.

    If no mask passes the IoU filter the best few by predicted IoU are kept anyway (the route must answer),
    only empty masks are never proposed.
    """
    h, w = image.shape[:2]
    points = point_grid(h, w, options.grid)
    lo, hi = options.min_area * h * w, options.max_area * h * w
    masks, ious, origins = [], [], []
    fallback: tuple[list, list, list] = ([], [], [])
    for start in range(0, len(points), options.points_per_batch):
        chunk = points[start: start + options.points_per_batch]
        chunk_masks, chunk_iou = sam.predict_points(image, chunk[:, None, :], np.ones((len(chunk), 1), np.int64),
                                                    multimask_output=True)
        flat_masks = chunk_masks.reshape(-1, h, w)
        flat_iou = chunk_iou.reshape(-1)
        flat_points = np.repeat(chunk, chunk_masks.shape[1], axis=0)
        area = flat_masks.reshape(len(flat_masks), -1).sum(1)
        sized = (area >= max(lo, 1)) & (area <= hi)
        good = sized & (flat_iou >= options.min_iou)
        masks.append(flat_masks[good])
        ious.append(flat_iou[good])
        origins.append(flat_points[good])
        if not good.any() and sized.any():  # remember the best of the rest, in case nothing passes at all
            best = np.argsort(-np.where(sized, flat_iou, -np.inf))[: min(4, int(sized.sum()))]
            fallback[0].append(flat_masks[best])
            fallback[1].append(flat_iou[best])
            fallback[2].append(flat_points[best])
    all_masks = np.concatenate(masks) if masks else np.zeros((0, h, w), bool)
    if len(all_masks) == 0 and fallback[0]:
        masks, ious, origins = fallback
        all_masks = np.concatenate(masks)
    all_iou = np.concatenate(ious) if ious else np.zeros(0, np.float32)
    all_points = np.concatenate(origins) if origins else np.zeros((0, 2), np.float32)
    keep = dedupe_masks(all_masks, all_iou, options.nms_iou)
    return Proposals(masks=all_masks[keep], sam_iou=all_iou[keep].astype(np.float32), points=all_points[keep])


# ------------------------------------------------------------------------------------------------- scoring


def scoring_phrases(description: str, attributes: Attributes, description_weight: float = 1.0
                    ) -> tuple[list[str], np.ndarray]:
    """The texts scored against each proposal — the description, then one phrase per attribute, exactly what
    the LLaVASeg route embeds — and their weights (``description_weight`` for the description, 1 for each
    attribute phrase)."""
    phrases = [description, *attributes.phrases()]
    weights = np.ones(len(phrases), dtype=np.float32)
    weights[0] = description_weight
    return phrases, weights


def combined_scores(view_embeddings: torch.Tensor, phrase_embeddings: torch.Tensor, weights: np.ndarray
                    ) -> np.ndarray:
    """Weighted mean over phrases of the cosine similarity between each proposal view and each phrase."""
    sims = (view_embeddings @ phrase_embeddings.T).numpy()  # K x P, both sides L2-normalised
    w = np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    return (sims @ w / w.sum()).astype(np.float32)


_SEVERAL_WORDS = re.compile(r"\b(all|every|each|both|several|many|multiple|two|three|four|five)\b")
_NOT_PLURAL = {"this", "his", "its", "is", "was", "has", "does", "yes", "us", "as", "less", "glass", "grass",
               "class", "bus", "gas", "plus", "minus", "across", "always", "perhaps", "whereas"}


def wants_several(query: str, description: str) -> bool:
    """Does the query ask for several objects? Quantifiers in the query ("all", "every", "both", a number),
    or a plural noun in the stage-1 *description* (the query itself may mention plurals that are only
    context, e.g. "the one most shapes share"; the description names just the target)."""
    if _SEVERAL_WORDS.search(query.lower()):
        return True
    for word in re.findall(r"[a-z]+", description.lower()):
        if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")) and word not in _NOT_PLURAL:
            return True
    return False


def select_masks(scores: np.ndarray, several: bool, relative_threshold: float) -> np.ndarray:
    """Indices of the chosen proposals: the best one, or (``several``) every proposal whose score is at least
    ``best - relative_threshold * (best - median)``."""
    if len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    best = int(np.argmax(scores))
    if not several or len(scores) == 1:
        return np.array([best])
    cut = scores[best] - relative_threshold * (scores[best] - float(np.median(scores)))
    chosen = np.nonzero(scores >= cut)[0]
    return chosen[np.argsort(-scores[chosen], kind="stable")]


# --------------------------------------------------------------------------------------------------- route


class TrainingFreeRoute:
    """Frozen MLLM (two chat turns) + frozen SAM point-grid proposals + frozen open_clip ranking. No training."""

    name = "training-free"

    def __init__(self, mllm: FrozenMLLM, sam: FrozenSAM, clip: FrozenTextEncoder, prompts: PromptSet, *,
                 options: TrainingFreeOptions | None = None, with_answer: bool = True, cache_size: int = 64) -> None:
        self.mllm, self.sam, self.clip, self.prompts = mllm, sam, clip, prompts
        self.options = options or TrainingFreeOptions()
        self.with_answer = with_answer
        # Proposals and their CLIP view embeddings depend on the image only (the models and options are fixed
        # for this route), so every further query on an image reuses them: the costly part of this route.
        self._per_image: OrderedDict[str, tuple[Proposals, torch.Tensor]] = OrderedDict()
        self.cache_size = cache_size

    def _image_work(self, images: list[np.ndarray], timer: StageTimer) -> list[tuple[Proposals, torch.Tensor]]:
        """Proposals and view embeddings of each image, computed once per distinct image (views of all new
        images encoded in batches of 256)."""
        keys = [image_digest(image) for image in images]
        new = [i for i, key in enumerate(keys) if key not in self._per_image and keys.index(key) == i]
        if new:
            with timer.stage("sam_encoder"):
                self.sam.encode_batch([images[i] for i in new])
            with timer.stage("sam_proposals"):
                proposals = {i: propose_masks(self.sam, images[i], self.options) for i in new}
            with timer.stage("clip_scoring"):
                views = [proposal_view(images[i], mask, self.options.view) for i in new for mask in proposals[i].masks]
                embedded = (torch.cat([self.clip.encode_images(views[j: j + 256]) for j in range(0, len(views), 256)])
                            if views else torch.zeros((0, self.clip.dim)))
            offset = 0
            for i in new:
                count = len(proposals[i].masks)
                self._per_image[keys[i]] = (proposals[i], embedded[offset: offset + count])
                offset += count
            while len(self._per_image) > self.cache_size:
                self._per_image.popitem(last=False)
        for key in keys:
            self._per_image.move_to_end(key)
        return [self._per_image[key] for key in keys]

    def dialogue_model(self) -> FrozenMLLM:
        return self.mllm

    def __call__(self, images: list[np.ndarray], queries: list[str]) -> list[SegmentationResult]:
        timer = StageTimer()
        calls_before = self.mllm.row_calls
        stages = run_stages(self.mllm, self.prompts, images, queries, timer)
        answers: list[str | None] = [None] * len(images)
        if self.with_answer:
            with timer.stage("mllm_answer"):
                answers = list(self.mllm.answer(images, queries))
        results = self.segment_with_stages(images, queries, stages, answers=answers, timer=timer)
        calls = f"{(self.mllm.row_calls - calls_before) / max(len(images), 1):g}"
        for result in results:
            result.raw_outputs["mllm_calls"] = calls
        return results

    def segment_with_stages(self, images: list[np.ndarray], queries: list[str], stages: list[StageOutputs], *,
                            answers: list[str | None] | None = None, timer: StageTimer | None = None
                            ) -> list[SegmentationResult]:
        """Steps 2-4 for given stage outputs (also how an oracle run feeds ground-truth descriptions)."""
        timer = timer or StageTimer()
        answers = answers or [None] * len(images)
        opts = self.options
        work = self._image_work(images, timer)
        with timer.stage("clip_scoring"):
            phrase_lists = [scoring_phrases(s.description, s.attributes, opts.description_weight) for s in stages]
            flat = self.clip.encode_text([p for phrases, _ in phrase_lists for p in phrases])
        per_item = timer.per_item(len(images))
        results, t_off = [], 0
        for index, (image, stage, (props, emb)) in enumerate(zip(images, stages, work)):
            phrases, weights = phrase_lists[index]
            text = flat[t_off: t_off + len(phrases)]
            t_off += len(phrases)
            scores = combined_scores(emb, text, weights) if len(props.masks) else np.zeros(0, np.float32)
            several = opts.multi == "always" or (opts.multi == "auto" and wants_several(queries[index],
                                                                                           stage.description))
            chosen = select_masks(scores, several, opts.relative_threshold)
            mask = (props.masks[chosen].any(axis=0) if len(chosen) else np.zeros(image.shape[:2], dtype=bool))
            ranking = np.argsort(-scores, kind="stable")[:10]
            summary = [{"point": [round(float(v), 1) for v in props.points[k]],
                        "sam_iou": round(float(props.sam_iou[k]), 4),
                        "clip_score": round(float(scores[k]), 4), "area": int(props.masks[k].sum()),
                        "chosen": bool(k in chosen)} for k in ranking]
            raw = {"reason": stage.reason_output, "attributes": stage.attributes_output,
                   "proposals": json.dumps({"n": int(len(props.masks)), "several": several, "top": summary})}
            if self.with_answer:
                raw["answer"] = answers[index] or ""
            results.append(SegmentationResult(
                route=self.name, query=queries[index], mask=mask,
                score=float(scores[chosen[0]]) if len(chosen) else 0.0,
                description=stage.description, attributes=stage.attributes, attribute_parse=stage.attribute_parse,
                used_attributes=bool(stage.attributes), answer=answers[index],
                prompts={"reason": stage.reason_prompt, "attributes": stage.attributes_prompt,
                         **({"answer": queries[index]} if self.with_answer else {})},
                raw_outputs=raw, timings=per_item))
        return results


def build(context) -> TrainingFreeRoute:
    """Registry entry (see ``llavaseg.routes.registry``): shares the preset's frozen MLLM, SAM and open_clip."""
    parts = context.components
    return TrainingFreeRoute(parts.mllm, parts.sam, parts.text_encoder, context.prompts,
                             options=TrainingFreeOptions.from_context(context.options),
                             with_answer=context.with_answer)
