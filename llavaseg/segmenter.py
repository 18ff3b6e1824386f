"""``Segmenter``: the public entry point. Picks a route, normalises inputs, returns results.

    >>> from llavaseg import Segmenter, sample_scene
    >>> segmenter = Segmenter.from_preset("tiny-world")
    >>> result = segmenter(sample_scene(), "the small shape that has the same colour as the triangle")
    >>> result.mask.shape, result.description, result.attributes, result.answer

Three ways to build one, all checking every source before any model loads: ``from_preset(name, **overrides)``,
``from_components(mllm=..., sam=..., clip=..., adapters=...)`` and ``from_pretrained(DIR)`` (a folder written by
``save_pretrained``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence, overload

import numpy as np

from llavaseg.errors import InputError
from llavaseg.images import ImageLike, check_query, limit_query, load_image
from llavaseg.models.adapters import MultiScaleAdapters
from llavaseg.models.components import Components, ComponentSpec, build_components, check_spec
from llavaseg.models.mllm import FrozenMLLM, Quantization
from llavaseg.models.presets import Preset, get_preset
from llavaseg.models.sam import FrozenSAM
from llavaseg.models.text_encoder import FrozenTextEncoder
from llavaseg.pipeline import check_pipeline_identities, read_pipeline, save_pipeline
from llavaseg.prompting import PromptSet
from llavaseg.provenance import Provenance, text_digest
from llavaseg.results import SegmentationResult
from llavaseg.routes.base import Route
from llavaseg.routes.registry import RouteContext, build_route, route_needs, route_untrained

__all__ = ["Segmenter"]

logger = logging.getLogger(__name__)
_NOTICES_SHOWN: set[str] = set()


def _show_notices(notices: Sequence[str]) -> None:
    """Say each caveat once per process (a logged warning: stderr by default, silenced like any log)."""
    for notice in notices:
        if notice not in _NOTICES_SHOWN:
            _NOTICES_SHOWN.add(notice)
            logger.warning(notice)


class Segmenter:
    """Reasoning segmentation with a frozen MLLM. Call it with an image (path, PIL or numpy) and a query,
    or with lists of them (batched); results are :class:`SegmentationResult`."""

    def __init__(self, mllm: FrozenMLLM | None = None, sam: FrozenSAM | None = None,
                 text_encoder: FrozenTextEncoder | None = None, adapters: MultiScaleAdapters | None = None, *,
                 components: Components | None = None, prompts_dir: str | Path | None = None,
                 route: str = "llavaseg", with_answer: bool = True, batch_size: int = 8, preset: Preset | None = None,
                 route_options: dict[str, object] | None = None) -> None:
        if components is None:
            if mllm is None or sam is None or text_encoder is None:
                raise InputError("a Segmenter needs an MLLM, a SAM and a text encoder (or components=...)")
            components = Components(mllm, sam, text_encoder, adapters)
        self.components = components
        self.mllm, self.sam, self.text_encoder = components.mllm, components.sam, components.text_encoder
        self.adapters = components.adapters
        self.prompts = PromptSet.load(prompts_dir)
        self.batch_size = batch_size
        self.route_name = route
        self.context = RouteContext(components, self.prompts, preset=preset, device=str(self.sam.device),
                                    with_answer=with_answer, options=dict(route_options or {}))
        self.route: Route = build_route(route, self.context)
        _show_notices(components.notices)

    # --------------------------------------------------------------------------------------------- building
    @classmethod
    def from_components(cls, *, mllm: str, sam: str, clip: str, adapters: str | Path | None = None,
                        seg_token: str | Path | None = None, vision_tower: str | Path | None = None,
                        seg_token_cot: str | Path | None = None,
                        route: str = "llavaseg", allow_untrained: bool = False, device: str = "cpu",
                        dtype: str | None = "auto", quantization: Quantization = None,
                        prompts_dir: str | Path | None = None, with_answer: bool = True, batch_size: int = 8,
                        route_options: dict[str, object] | None = None, adapter_dim: int = 256,
                        adapter_heads: int = 8, adapter_scales: tuple[int, ...] = (8, 4, 2, 2, 1)) -> Segmenter:
        """Build from a source per component (see :mod:`llavaseg.models.components` for the forms)."""
        spec = ComponentSpec(mllm=mllm, sam=sam, clip=clip, adapters=_str(adapters), seg_token=_str(seg_token),
                             seg_token_cot=_str(seg_token_cot), vision_tower=_str(vision_tower),
                             adapter_dim=adapter_dim, adapter_heads=adapter_heads,
                             adapter_scales=adapter_scales)
        return cls.from_spec(spec, route=route, allow_untrained=allow_untrained, device=device, dtype=dtype,
                             quantization=quantization, prompts_dir=prompts_dir, with_answer=with_answer,
                             batch_size=batch_size, route_options=route_options)

    @classmethod
    def from_preset(cls, name: str, *, route: str = "llavaseg", device: str = "cpu", dtype: str | None = "auto",
                    quantization: Quantization = None, prompts_dir: str | Path | None = None,
                    mllm: str | None = None, sam: str | None = None, clip: str | None = None,
                    adapters: str | Path | None = None, seg_token: str | Path | None = None,
                    vision_tower: str | Path | None = None, seg_token_cot: str | Path | None = None,
                    allow_untrained: bool = False, sam_checkpoint: str | None = None, clip_pretrained: str | None = None,
                    with_answer: bool = True, batch_size: int = 8,
                    route_options: dict[str, object] | None = None) -> Segmenter:
        """Build a preset (``llavaseg.models.presets.PRESETS``); the keywords replace its sources.

        ``sam_checkpoint`` is another name for ``sam``; ``clip_pretrained`` gives weights (an open_clip tag or
        file) to the preset's open_clip model name.
        """
        preset = get_preset(name)
        clip = clip or _clip_with_weights(preset.clip, clip_pretrained)
        spec = preset.spec().with_sources(mllm=mllm, sam=sam or sam_checkpoint, clip=clip, adapters=_str(adapters),
                                          seg_token=_str(seg_token), vision_tower=_str(vision_tower),
                                          seg_token_cot=_str(seg_token_cot))
        return cls.from_spec(spec, route=route, allow_untrained=allow_untrained or preset.plumbing, device=device,
                             dtype=dtype, quantization=quantization, prompts_dir=prompts_dir, with_answer=with_answer,
                             batch_size=batch_size, route_options=route_options, preset=preset)

    @classmethod
    def from_spec(cls, spec: ComponentSpec, *, route: str = "llavaseg", allow_untrained: bool = False,
                  device: str = "cpu", dtype: str | None = "auto", quantization: Quantization = None,
                  prompts_dir: str | Path | None = None, with_answer: bool = True, batch_size: int = 8,
                  route_options: dict[str, object] | None = None, preset: Preset | None = None) -> Segmenter:
        """Check ``spec`` (and what ``route`` needs) without loading anything, then build."""
        untrained = check_spec(spec, needs=route_needs([route]), allow_untrained=allow_untrained)
        PromptSet.load(prompts_dir)  # a broken template fails before the models load
        notices = (preset.notice,) if preset is not None and preset.notice else ()
        parts = build_components(spec, device=device, dtype=dtype, quantization=quantization, untrained=untrained,
                                 allow_untrained=allow_untrained, notices=notices)
        return cls(components=parts, prompts_dir=prompts_dir, route=route, with_answer=with_answer,
                   batch_size=batch_size, preset=preset, route_options=route_options)

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, route: str | None = None, device: str = "cpu",
                        dtype: str | None = "auto", quantization: Quantization = None, with_answer: bool = True,
                        batch_size: int = 8, route_options: dict[str, object] | None = None) -> Segmenter:
        """Load a pipeline folder written by :meth:`save_pretrained` (its frozen models' identities checked)."""
        directory = Path(directory).expanduser()
        manifest, spec = read_pipeline(directory)
        route = route or manifest.route
        untrained = check_spec(spec, needs=route_needs([route]), allow_untrained=bool(manifest.untrained))
        parts = build_components(spec, device=device, dtype=dtype, quantization=quantization,
                                 untrained=tuple(dict.fromkeys((*manifest.untrained, *untrained))),
                                 allow_untrained=bool(manifest.untrained), notices=tuple(manifest.notices))
        check_pipeline_identities(manifest, parts, directory)
        return cls(components=parts, prompts_dir=directory / "prompts", route=route, with_answer=with_answer,
                   batch_size=batch_size, route_options=route_options)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write this pipeline as one folder (see :mod:`llavaseg.pipeline`); returns the manifest's path."""
        return save_pipeline(Path(directory).expanduser(), self.components, self.prompts, self.route_name)

    def with_route(self, route: str, **options: object) -> Segmenter:
        """A segmenter sharing these (frozen) models but using another route, e.g. for side-by-side runs."""
        clone = object.__new__(Segmenter)
        clone.__dict__.update(self.__dict__)
        clone.route_name = route
        clone.context = RouteContext(self.context.components, self.prompts, preset=self.context.preset,
                                     device=self.context.device, with_answer=self.context.with_answer,
                                     options={**self.context.options, **options})
        clone.route = build_route(route, clone.context)
        return clone

    # ------------------------------------------------------------------------------------------- provenance
    def provenance(self) -> Provenance:
        """What this segmenter's results are produced with (recorded in every result)."""
        parts = self.components
        spec = parts.spec
        components = {"mllm": {"source": spec.mllm if spec else parts.mllm.name, **parts.mllm.identity()},
                      "sam": {"source": spec.sam if spec else parts.sam.name, **parts.sam.identity()},
                      "clip": {"source": spec.clip if spec else parts.text_encoder.name,
                               **parts.text_encoder.identity()}}
        if parts.adapters is not None:
            components["adapters"] = {"source": (spec.adapters if spec else None) or "(in memory)",
                                      "weights": parts.adapters.fingerprint()}
        for part in ("seg_token", "seg_token_cot"):
            if spec is not None and getattr(spec, part):
                components[part] = {"source": getattr(spec, part)}
        return Provenance(route=self.route_name, components=components,
                          untrained=route_untrained(self.route_name, parts.untrained),
                          notices=list(parts.notices),
                          templates={stage: text_digest(t.text) for stage, t in self.prompts.templates.items()})

    # --------------------------------------------------------------------------------------------- calling
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
        limited = [limit_query(check_query(q)) for q in queries]
        queries = [text for text, _ in limited]
        loaded: dict[int, np.ndarray] = {}
        arrays = []
        for item in images:  # the same object passed many times is loaded once
            if id(item) not in loaded:
                loaded[id(item)] = load_image(item)
            arrays.append(loaded[id(item)])
        provenance = self.provenance()
        results: list[SegmentationResult] = []
        for start in range(0, len(arrays), self.batch_size):
            results += self.route(arrays[start: start + self.batch_size], queries[start: start + self.batch_size])
        for result, (_, cut) in zip(results, limited, strict=True):
            result.untrained, result.notices = list(provenance.untrained), list(provenance.notices)
            if cut is not None:
                result.notices.append(cut)
            result.provenance = provenance
        return results[0] if single else results


def _str(value: str | Path | None) -> str | None:
    return None if value is None else str(value)


def _clip_with_weights(clip: str, pretrained: str | None) -> str | None:
    """``NAME:WEIGHTS`` for a preset's open_clip model name; a preset whose text encoder is a folder refuses."""
    if pretrained is None:
        return None
    if clip.startswith(("local-dir:", "random:")) or ":" in clip:
        base = clip.split(":", 1)[1] if clip.startswith("random:") else None
        if base is None:
            raise InputError(f"clip_pretrained={pretrained!r} cannot apply to this preset's text encoder {clip!r}; "
                             "pass clip='NAME:TAG|FILE' instead")
        clip = base
    return f"{clip}:{pretrained}"
