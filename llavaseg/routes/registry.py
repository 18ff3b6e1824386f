"""Route registry: name -> how to build the route, what it trains, and what it is (one line for tables).

Routes live in their own modules (one file each) and are imported only when asked for, so a route's extra
dependencies (peft for ``seg-token``) cost nothing to users of the others. An entry also says which trained
parts the route needs, so a missing part is refused from the component spec alone, before any model loads.
A user can register a route of their own with a plain ``"module:function"`` string (it then needs nothing).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace

from llavaseg.errors import InputError, UntrainedError
from llavaseg.models.components import Components
from llavaseg.models.presets import Preset
from llavaseg.prompting import PromptSet
from llavaseg.routes.base import Route

__all__ = ["RouteEntry", "ROUTES", "RouteContext", "route_names", "route_entry", "route_needs", "check_route_names",
           "route_untrained", "build_route"]


@dataclass(frozen=True)
class RouteEntry:
    """``target`` is ``"module:function"`` (the function takes a :class:`RouteContext`); ``needs`` names the
    trained parts (``adapters``, ``seg_token``); ``summary`` is the one line tables and records show."""

    target: str
    needs: tuple[str, ...] = ()
    summary: str = ""


ROUTES: dict[str, RouteEntry | str] = {
    "llavaseg": RouteEntry(
        "llavaseg.routes.llavaseg:build", ("adapters",),
        "frozen MLLM reasons in text in two chat turns (description, attributes) -> frozen text encoder -> "
        "trained adapters -> frozen SAM; only the adapters train, the MLLM's dialogue is untouched"),
    "llavaseg-noattr": RouteEntry(
        "llavaseg.routes.llavaseg:build_without_attributes", ("adapters",),
        "ablation of llavaseg: the same trained adapters prompted with the stage-1 description only"),
    "llavaseg-oracle": RouteEntry(
        "llavaseg.routes.llavaseg:build_with_reference_stages", ("adapters",),
        "llavaseg with ground-truth stage outputs in place of the MLLM's (measures the adapters alone)"),
    "llavaseg-verify": RouteEntry(
        "llavaseg.routes.verify:build", ("adapters",),
        "llavaseg with several stage-2 answers (greedy, schema-constrained, and beam-search alternatives); the same "
        "frozen MLLM checks the first candidate mask on a highlighted view, and the others when it doubts it; "
        "nothing more is trained"),
    "seg-token": RouteEntry(
        "llavaseg.routes.seg_token:build", ("seg_token",),
        "LISA: a fine-tuned copy of the MLLM (LoRA) answers with [SEG] at once, no reasoning in text; the token's "
        "hidden state prompts a fine-tuned SAM decoder; the MLLM's dialogue changes"),
    "seg-token-cot": RouteEntry(
        "llavaseg.routes.seg_token:build_cot", ("seg_token_cot",),
        "extension of LISA (not LISA): the fine-tuned MLLM copy first writes the target's attributes in text, then "
        "[SEG]; the same reasoning as llavaseg, paid for with the MLLM's dialogue"),
    "training-free": RouteEntry(
        "llavaseg.routes.training_free:build", (),
        "nothing trained: the frozen MLLM's two stages, SAM point-grid proposals ranked by frozen CLIP"),
}


def route_names() -> list[str]:
    """Every registered route, in registration order."""
    return list(ROUTES)


def route_entry(name: str) -> RouteEntry:
    if name not in ROUTES:
        raise InputError(f"unknown route {name!r}; available: {', '.join(ROUTES)}")
    entry = ROUTES[name]
    return entry if isinstance(entry, RouteEntry) else RouteEntry(entry)


def check_route_names(names: list[str]) -> list[str]:
    """The names, de-duplicated; an unknown one is a one-line error naming the available routes."""
    for name in names:
        route_entry(name)
    return list(dict.fromkeys(names))


def route_needs(names: list[str]) -> dict[str, tuple[str, ...]]:
    """Trained parts each named route needs (for :func:`~llavaseg.models.components.check_spec`)."""
    return {name: route_entry(name).needs for name in check_route_names(names)}


def route_untrained(name: str, untrained: tuple[str, ...] | list[str]) -> list[str]:
    """Which of the random parts a route's results depend on (the frozen models, and its own trained parts)."""
    relevant = {"mllm", "sam", "clip", *route_entry(name).needs}
    return [part for part in untrained if part in relevant]


@dataclass
class RouteContext:
    """Everything a route may build itself from: the shared frozen components, prompts and the preset."""

    components: Components
    prompts: PromptSet
    preset: Preset | None = None
    device: str = "cpu"
    with_answer: bool = True
    options: dict[str, object] = field(default_factory=dict)  # route-specific, e.g. seg_token_model=Path


def build_route(name: str, context: RouteContext) -> Route:
    entry = route_entry(name)
    if "adapters" in entry.needs and context.components.adapters is None:
        raise UntrainedError(f"route {name} needs trained adapters and none were given; train them with "
                             "llavaseg-train (then --adapters DIR), or allow untrained parts for a plumbing run")
    defaults = context.preset.route_defaults.get(name, {}) if context.preset is not None else {}
    if defaults:
        context = replace(context, options={**defaults, **context.options})
    module_name, function_name = entry.target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise InputError(f"route {name!r} is not available in this version of llavaseg") from None
        raise
    return getattr(module, function_name)(context)
