"""``Segmenter``: the public entry point. Picks a route, normalises inputs, returns results.

    >>> from llavaseg import Segmenter
    >>> segmenter = Segmenter.from_preset("tiny-world")
    >>> result = segmenter("scene.png", "the shape that has the same colour as the square")
    >>> result.mask.shape, result.description, result.attributes, result.answer
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, overload

import numpy as np

from llavaseg.errors import InputError
from llavaseg.images import ImageLike, check_query, load_image
from llavaseg.models.adapters import MultiScaleAdapters
from llavaseg.models.mllm import FrozenMLLM, Quantization
from llavaseg.models.presets import PRESETS, Components, Preset, build_components
from llavaseg.models.sam import FrozenSAM
from llavaseg.models.text_encoder import FrozenTextEncoder
from llavaseg.prompting import PromptSet
from llavaseg.results import SegmentationResult
from llavaseg.routes.base import Route
from llavaseg.routes.registry import ROUTES, RouteContext, build_route


class Segmenter:
    """Reasoning segmentation with a frozen MLLM. Call it with an image (path, PIL or numpy) and a query,
    or with lists of them (batched); results are :class:`SegmentationResult`."""

    def __init__(self, mllm: FrozenMLLM, sam: FrozenSAM, text_encoder: FrozenTextEncoder,
                 adapters: MultiScaleAdapters, *, prompts_dir: str | Path | None = None, route: str = "llavaseg",
                 with_answer: bool = True, batch_size: int = 8, preset: Preset | None = None,
                 route_options: dict[str, object] | None = None) -> None:
        self.mllm, self.sam, self.text_encoder, self.adapters = mllm, sam, text_encoder, adapters
        self.prompts = PromptSet.load(prompts_dir)
        self.batch_size = batch_size
        self.context = RouteContext(Components(mllm, sam, text_encoder, adapters), self.prompts, preset=preset,
                                    device=str(sam.device), with_answer=with_answer, options=dict(route_options or {}))
        self.route: Route = build_route(route, self.context)

    def with_route(self, route: str, **options: object) -> Segmenter:
        """A segmenter sharing these (frozen) models but using another route, e.g. for side-by-side runs."""
        clone = object.__new__(Segmenter)
        clone.__dict__.update(self.__dict__)
        clone.context = RouteContext(self.context.components, self.prompts, preset=self.context.preset,
                                     device=self.context.device, with_answer=self.context.with_answer,
                                     options={**self.context.options, **options})
        clone.route = build_route(route, clone.context)
        return clone

    @classmethod
    def from_preset(cls, name: str, *, route: str = "llavaseg", device: str = "cpu", dtype: str | None = "auto",
                    quantization: Quantization = None, prompts_dir: str | Path | None = None,
                    adapters: str | Path | None = None, mllm: str | None = None,
                    sam_checkpoint: str | None = None, clip_pretrained: str | None = None,
                    with_answer: bool = True, batch_size: int = 8,
                    route_options: dict[str, object] | None = None) -> Segmenter:
        """Build a preset (see ``llavaseg.models.presets.PRESETS``); keyword arguments override its sources."""
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
        if route not in ROUTES:  # before any model loads: a typo must not cost the loading time
            raise InputError(f"unknown route {route!r}; available: {', '.join(ROUTES)}")
        parts = build_components(PRESETS[name], device=device, dtype=dtype, quantization=quantization, mllm=mllm,
                                 sam_checkpoint=sam_checkpoint, clip_pretrained=clip_pretrained, adapters=adapters)
        return cls(parts.mllm, parts.sam, parts.text_encoder, parts.adapters, prompts_dir=prompts_dir, route=route,
                   with_answer=with_answer, batch_size=batch_size, preset=PRESETS[name],
                   route_options=route_options)

    @overload
    def __call__(self, image: ImageLike, query: str) -> SegmentationResult: ...
    @overload
    def __call__(self, image: Sequence[ImageLike], query: Sequence[str]) -> list[SegmentationResult]: ...

    def __call__(self, image, query):
        """Segment. A single image with a list of queries, or a list of images with one query, broadcasts."""
        single = not isinstance(image, (list, tuple)) and not isinstance(query, (list, tuple))
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        queries = list(query) if isinstance(query, (list, tuple)) else [query]
        if len(images) == 1 and len(queries) > 1:
            images = images * len(queries)
        if len(queries) == 1 and len(images) > 1:
            queries = queries * len(images)
        if len(images) != len(queries):
            raise InputError(f"{len(images)} images but {len(queries)} queries")
        if not images:
            return []
        queries = [check_query(q) for q in queries]
        loaded: dict[int, np.ndarray] = {}
        arrays = []
        for item in images:  # the same object passed many times is loaded once
            if id(item) not in loaded:
                loaded[id(item)] = load_image(item)
            arrays.append(loaded[id(item)])
        results: list[SegmentationResult] = []
        for start in range(0, len(arrays), self.batch_size):
            results += self.route(arrays[start: start + self.batch_size], queries[start: start + self.batch_size])
        return results[0] if single else results
