"""Route registry: name -> the function that builds the route from shared components.

Routes live in their own modules (one file each) and are imported only when asked for, so a route's extra
dependencies (peft for ``seg-token``) cost nothing to users of the others.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from llavaseg.errors import InputError
from llavaseg.models.presets import Components, Preset
from llavaseg.prompting import PromptSet
from llavaseg.routes.base import Route

# name -> "module:function"; each function takes a RouteContext and returns a Route.
ROUTES: dict[str, str] = {
    "llavaseg": "llavaseg.routes.llavaseg:build",
    "llavaseg-noattr": "llavaseg.routes.llavaseg:build_without_attributes",
    "llavaseg-oracle": "llavaseg.routes.llavaseg:build_with_reference_stages",
    "seg-token": "llavaseg.routes.seg_token:build",
    "training-free": "llavaseg.routes.training_free:build",
}


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
    if name not in ROUTES:
        raise InputError(f"unknown route {name!r}; available: {', '.join(ROUTES)}")
    module_name, function_name = ROUTES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise InputError(f"route {name!r} is not available in this version of llavaseg") from None
        raise
    return getattr(module, function_name)(context)
