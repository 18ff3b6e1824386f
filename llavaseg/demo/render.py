"""What a page shows of a result, as plain text and Markdown (no Gradio here: the wording is testable alone).

A surprising mask is explained by the text that caused it, so the page shows everything a
:class:`~llavaseg.results.SegmentationResult` carries: the MLLM's ordinary answer, the description and the
parsed attributes (with how they parsed), each stage's rendered prompt and verbatim reply, per-stage
timings, and the caveats (a toy preset, random parts).
"""

from __future__ import annotations

import re

import numpy as np

from llavaseg.results import SegmentationResult

__all__ = ["attributes_view", "comparison_markdown", "header_markdown", "mask_iou", "prompts_markdown",
           "summary_markdown", "timings_markdown"]


def _fence(text: str) -> str:
    """``text`` in a code fence longer than any backtick run inside it (prompts may hold backticks)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}text\n{text}\n{ticks}"


def _cell(text: object) -> str:
    """One Markdown table cell: pipes escaped and line breaks flattened, so a reply cannot break the table."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def attributes_view(result: SegmentationResult) -> dict[str, object]:
    """The parsed attributes, and how they were parsed and used (the route may fall back to the description)."""
    return {"attributes": dict(result.attributes.items()), "parsed_by": result.attribute_parse,
            "used_by_the_route": result.used_attributes}


def summary_markdown(result: SegmentationResult) -> str:
    """Route, mask size and confidence, plus the result's own caveats (untrained parts, notices)."""
    lines = [(f"**Route** `{result.route}` · mask {int(result.mask.sum())} px of {result.mask.size} · "
              f"score {result.score:.3f}")]
    if result.untrained:
        lines.append(f"⚠️ Random weights in: {', '.join(result.untrained)} (the mask is plumbing only).")
    lines += [f"⚠️ {notice}" for notice in result.notices]
    return "\n\n".join(lines)


def prompts_markdown(result: SegmentationResult) -> str:
    """Each stage's rendered prompt and the MLLM's verbatim reply, in stage order."""
    stages = list(dict.fromkeys([*result.prompts, *result.raw_outputs]))
    if not stages:
        return "_This route renders no prompt._"
    parts = []
    for stage in stages:
        parts.append(f"#### {stage}")
        if stage in result.prompts:
            parts.append("Prompt:\n\n" + _fence(result.prompts[stage]))
        if stage in result.raw_outputs:
            parts.append("Reply:\n\n" + _fence(result.raw_outputs[stage]))
    return "\n\n".join(parts)


def timings_markdown(result: SegmentationResult) -> str:
    """Wall time per stage and in total, in milliseconds."""
    if not result.timings:
        return "_No timings recorded._"
    rows = [f"| {_cell(stage)} | {seconds * 1000:.1f} |" for stage, seconds in result.timings.items()]
    total = sum(result.timings.values()) * 1000
    return "\n".join(["| stage | ms |", "| --- | ---: |", *rows, f"| **total** | **{total:.1f}** |"])


def mask_iou(first: np.ndarray, second: np.ndarray) -> float:
    """Intersection over union of two masks (1.0 when both are empty: they agree)."""
    union = np.logical_or(first, second).sum()
    return 1.0 if union == 0 else float(np.logical_and(first, second).sum() / union)


def comparison_markdown(first: SegmentationResult, second: SegmentationResult) -> str:
    """Two routes' results on one query, field by field, and how much their masks agree."""
    def row(name: str, a: object, b: object) -> str:
        return f"| {name} | {_cell(a)} | {_cell(b)} |"

    attrs = [", ".join(f"{k}: {v}" for k, v in r.attributes.items()) or "—" for r in (first, second)]
    rows = [f"| | `{first.route}` | `{second.route}` |", "| --- | --- | --- |",
            row("answer", first.answer or "—", second.answer or "—"),
            row("description", first.description or "—", second.description or "—"),
            row("attributes", *attrs),
            row("mask px", int(first.mask.sum()), int(second.mask.sum())),
            row("score", f"{first.score:.3f}", f"{second.score:.3f}"),
            row("total ms", f"{sum(first.timings.values()) * 1000:.1f}", f"{sum(second.timings.values()) * 1000:.1f}")]
    return "\n".join(rows) + f"\n\nMask IoU between the two routes: **{mask_iou(first.mask, second.mask):.3f}**"


def header_markdown(label: str, notices: tuple[str, ...] | list[str], untrained: list[str],
                    unavailable: dict[str, str]) -> str:
    """The page's top: what it serves, and the caveats a visitor must see before trusting a mask."""
    lines = ["# LLaVASeg: reasoning segmentation with a frozen multimodal LLM",
             (f"Models: **{label}**. Upload an image or pick an example (every tab works on that image), type a "
              "query, pick a route.")]
    if notices:
        lines.append("> ⚠️ **Toy models.** " + " ".join(notices))
    if untrained:
        lines.append(f"> ⚠️ **Random weights** in {', '.join(untrained)}: masks and answers are noise (plumbing "
                     "only).")
    for route, why in unavailable.items():
        lines.append(f"- route `{route}` is not offered: {why}")
    return "\n\n".join(lines)
