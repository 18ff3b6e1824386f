"""The LISA-style ``[SEG]``-token route: the rival the frozen LLaVASeg route is judged against.

A fine-tuned copy of the MLLM answers a segmentation request; the last-layer hidden state that predicts each
``[SEG]`` it emits is projected to a SAM prompt and decoded by a fine-tuned copy of SAM's mask decoder (over
the shared, frozen SAM image encoder). See :mod:`llavaseg.seg_token` for the mechanics and training.

Route options (``RouteContext.options`` / ``Segmenter.with_route("seg-token", **options)``):

* ``seg_token_model``: a directory saved by :func:`~llavaseg.seg_token.checkpoint.save_seg_token_model`
  (default: the components' ``seg_token`` source, ``--seg-token DIR``; the tiny-world preset ships one). Without
  one the route refuses, unless untrained parts are allowed (``tiny`` preset, ``--allow-untrained``): then an
  untrained model (LoRA at init, random projection) runs, for plumbing only, and results say so.
* ``lisa_checkpoint`` + ``vision_tower``: a published LISA checkpoint directory and the local CLIP vision tower
  it was trained with (see :mod:`llavaseg.seg_token.lisa_checkpoint`); a LISA folder given as ``--seg-token`` is
  recognised by its ``config.json`` (``out_dim``) and needs ``--vision-tower``.
* ``teacher_forced`` (bool, default False): LISA's ``validate()`` protocol (assistant turn pre-filled with
  ``"[SEG]."``) instead of greedy generation. Both are documented in :mod:`llavaseg.seg_token.inference`.
* ``query_style``: ``auto`` (default; guess phrase vs. sentence), ``short`` or ``long`` LISA template.
* ``max_new_tokens`` (default 32, LISA's ``evaluate()``).

Results: ``mask`` is the union of the masks of all generated ``[SEG]`` (empty if none); ``raw_outputs`` holds
the generated text, the protocol and ``seg_count``; ``description`` is the generated text without ``[SEG]``;
``answer`` is this route's own chat answer to the bare query from the fine-tuned LLM (``dialogue_model()``),
which is what dialogue preservation compares with the base MLLM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llavaseg.errors import InputError, UnsupportedError, UntrainedError
from llavaseg.models.mllm import FrozenMLLM
from llavaseg.models.sources import parse_source
from llavaseg.results import SegmentationResult
from llavaseg.seg_token.inference import predict
from llavaseg.seg_token.model import SegTokenModel
from llavaseg.seg_token.prompts import strip_seg
from llavaseg.timing import StageTimer


class SegTokenRoute:
    """``[SEG]``-token segmentation with its own fine-tuned MLLM copy (the shared frozen models stay untouched)."""

    def __init__(self, model: SegTokenModel, *, teacher_forced: bool = False, query_style: str = "auto",
                 max_new_tokens: int = 32, with_answer: bool = True, name: str = "seg-token") -> None:
        self.name = name
        if query_style not in ("auto", "short", "long"):
            raise InputError(f"query_style must be auto, short or long, got {query_style!r}")
        self.model = model.eval()
        self.teacher_forced = teacher_forced
        self.query_style = query_style
        self.max_new_tokens = max_new_tokens
        self.with_answer = with_answer

    @property
    def protocol(self) -> str:
        return "teacher-forced" if self.teacher_forced else "generate"

    def dialogue_model(self) -> FrozenMLLM:
        return self.model.dialogue_model()

    def __call__(self, images: list[np.ndarray], queries: list[str]) -> list[SegmentationResult]:
        timer = StageTimer()
        with timer.stage("seg_token"):
            predictions = predict(self.model, images, queries, protocol=self.protocol,  # type: ignore[arg-type]
                                  style=self.query_style, max_new_tokens=self.max_new_tokens)  # type: ignore[arg-type]
        answers: list[str | None] = [None] * len(images)
        calls = 1.0  # the [SEG] model's own generation (or teacher-forced pass) per query
        if self.with_answer:
            with timer.stage("mllm_answer"):
                answers = list(self.dialogue_model().answer(images, queries))
            calls += 1.0
        per_item = timer.per_item(len(images))
        results = []
        for index, prediction in enumerate(predictions):
            count = prediction.masks.shape[0]
            results.append(SegmentationResult(
                route=self.name, query=queries[index], mask=prediction.union,
                score=float(np.mean(prediction.scores)) if count else 0.0,
                description=strip_seg(prediction.text), answer=answers[index],
                prompts={"segment": prediction.prompt, **({"answer": queries[index]} if self.with_answer else {})},
                raw_outputs={"segment": prediction.text, "protocol": self.protocol, "seg_count": str(count),
                             "mllm_calls": f"{calls:g}",
                             **({"answer": answers[index] or ""} if self.with_answer else {})},
                timings=per_item,
            ))
        return results


def _flag(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _is_lisa_release(path: Path) -> bool:
    config = path / "config.json"
    return not (path / "seg_token.json").is_file() and config.is_file() and '"out_dim"' in config.read_text()


def resolve_model(context, part: str = "seg_token") -> SegTokenModel:
    """The route's ``[SEG]`` model: the ``lisa_checkpoint``/``seg_token_model`` option, else the components'
    ``seg_token`` (or ``seg_token_cot``) source (ours, or a LISA release folder with its ``vision_tower``), else an
    untrained one when untrained parts are allowed."""
    from llavaseg.seg_token.checkpoint import load_seg_token_model
    from llavaseg.seg_token.model import create_seg_token_model

    parts = context.components
    options = context.options
    spec = parts.spec
    cot = part == "seg_token_cot"
    default = parts.seg_token_cot_source if cot else parts.seg_token_source
    source = options.get("lisa_checkpoint") or options.get("seg_token_model") or default
    vision_tower = options.get("vision_tower") or (spec.vision_tower if spec is not None else None)
    if source is None:
        if part not in parts.untrained:
            flag = "--seg-token-cot DIR" if cot else "--seg-token DIR"
            raise UntrainedError(f"route {'seg-token-cot' if cot else 'seg-token'} needs a trained [SEG] model and "
                                 f"none was given; train one with python -m llavaseg.recipes.train_seg_token (then "
                                 f"{flag}), or allow untrained parts for a plumbing run")
        return create_seg_token_model(parts.mllm, parts.sam, templates="tiny-world" if cot else "lisa",
                                      answer_style="attributes-first" if cot else "lisa")
    parsed = parse_source(str(source))
    path = parsed.path()
    if path is None or not path.is_dir():
        if parsed.shipped:
            raise UnsupportedError(f"the shipped [SEG] model {source} is missing from this install ({path}); "
                                   "train it with python -m llavaseg.recipes.train_seg_token")
        raise InputError(f"[SEG] model directory not found: {path}")
    if options.get("lisa_checkpoint") is not None or _is_lisa_release(path):
        from llavaseg.seg_token.lisa_checkpoint import load_lisa_checkpoint

        if vision_tower is None:
            raise InputError("a LISA checkpoint needs vision_tower=DIR (LISA checkpoints do not include CLIP)")
        return load_lisa_checkpoint(path, Path(str(vision_tower)), parts.sam)
    return load_seg_token_model(path, parts.mllm, parts.sam)


def build(context) -> SegTokenRoute:
    """Registry entry (see ``llavaseg.routes.registry``)."""
    options = context.options
    return SegTokenRoute(resolve_model(context), teacher_forced=_flag(options.get("teacher_forced", False)),
                         query_style=str(options.get("query_style", "auto")),
                         max_new_tokens=int(options.get("max_new_tokens", 32)), with_answer=context.with_answer)


def build_cot(context) -> SegTokenRoute:
    """Registry entry of ``seg-token-cot``: a ``[SEG]`` model that writes the target's attributes first, so it is
    evaluated by generation (teacher forcing would pre-fill LISA's bare answer)."""
    options = context.options
    model = resolve_model(context, "seg_token_cot")
    if model.config.answer_style != "attributes-first":
        raise InputError("route seg-token-cot needs a [SEG] model trained with --answer-style attributes-first; "
                         f"this one answers {model.config.answer_style!r} (use it with route seg-token)")
    return SegTokenRoute(model, query_style=str(options.get("query_style", "auto")),
                         max_new_tokens=int(options.get("max_new_tokens", 48)), with_answer=context.with_answer,
                         name="seg-token-cot")
