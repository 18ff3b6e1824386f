"""The models behind the web demo: built once per process, one segmenter per route, requests one at a time.

A page may ask for any route in any order, and two routes side by side; building the frozen models again for
each would multiply the memory and the first-request wait. So :class:`DemoSession` builds the components on
the first request that needs them (as the benchmark's ``shared_components`` does, without importing it: the
demo stands below the commands and the benchmark), and a :class:`~llavaseg.Segmenter` per route *over those
same components* the first time that route is asked for. Every model call holds one lock: the frozen models
keep per-image caches and a conversation's key/value cache, and two requests interleaving on them (Gradio
runs handlers in worker threads) would be a race, while the queue in front makes waiting visible.

Nothing here imports Gradio, so the session, its checks and its files are usable (and testable) without it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llavaseg.errors import InputError, LlavasegError
from llavaseg.images import check_query, load_image
from llavaseg.models.components import Components, ComponentSpec, build_components, check_spec
from llavaseg.models.mllm import FrozenMLLM, Quantization
from llavaseg.models.presets import Preset
from llavaseg.overlay import mask_image, overlay
from llavaseg.pipeline import check_pipeline_identities, read_pipeline
from llavaseg.results import SegmentationResult
from llavaseg.routes.registry import route_names, route_needs
from llavaseg.segmenter import Segmenter

__all__ = ["DEMO_ROUTES", "DemoConfig", "DemoSession", "SavedResult", "image_path", "read_upload"]

DEMO_ROUTES = ("llavaseg", "llavaseg-verify", "llavaseg-noattr", "seg-token", "seg-token-cot", "training-free")
"""Routes a page can pick: those that run on a user's image alone (``llavaseg-oracle`` needs ground truth)."""

KEPT_RESULTS = 200
"""Result folders (mask PNG, JSON) kept on disk; older ones are removed so a long-running demo stays small
(Gradio keeps its own copy of what it served)."""


@dataclass(frozen=True)
class DemoConfig:
    """What the demo serves: the component spec (preset, pipeline or flags), whether random parts may run,
    and how to load. ``label`` names the source on the page; ``notices`` are its caveats (a toy preset).
    ``pipeline``: the folder the spec was read from, unchanged by flags; its frozen models' identities are then
    checked once built, as :meth:`Segmenter.from_pretrained` does."""

    spec: ComponentSpec
    label: str
    allow_untrained: bool = False
    preset: Preset | None = None
    notices: tuple[str, ...] = ()
    device: str = "cpu"
    dtype: str | None = "auto"
    quantization: Quantization = None
    prompts_dir: Path | None = None
    pipeline: Path | None = None


@dataclass
class SavedResult:
    """A result and the files a page offers for download (paths inside the session's work folder)."""

    result: SegmentationResult
    overlay: np.ndarray
    overlay_png: Path
    mask_png: Path
    result_json: Path


def image_path(payload: object) -> str | None:
    """The file behind an image input's raw value: a path string, or Gradio's file payload (a dict with
    ``path``). Raw values, because Gradio's own image decoding fails on a non-image with a bare error, while
    :func:`~llavaseg.images.load_image` names the problem in one line."""
    if payload is None or payload == "":
        return None
    if isinstance(payload, (str, Path)):
        return str(payload)
    if isinstance(payload, dict) and payload.get("path"):
        return str(payload["path"])
    raise InputError(f"unsupported image value {type(payload).__name__}; upload an image file")


def read_upload(payload: object) -> np.ndarray:
    """An uploaded image as RGB pixels, or an :class:`InputError` saying why not (none, not an image, too
    large...). The message names the file as the visitor uploaded it, not the server's copy of it."""
    path = image_path(payload)
    if path is None:
        raise InputError("no image: upload one or pick an example")
    try:
        return load_image(path)
    except InputError as error:
        shown = payload.get("orig_name") if isinstance(payload, dict) else None
        raise InputError(str(error).replace(path, repr(shown or Path(path).name))) from None


class DemoSession:
    """The frozen components (built lazily, once), one :class:`Segmenter` per route over them, and the
    folder where results are written for download."""

    def __init__(self, config: DemoConfig, workdir: Path | None = None) -> None:
        self.config = config
        self._workdir = Path(workdir) if workdir is not None else None
        self._own_workdir = workdir is None
        self._components: Components | None = None
        self._segmenters: dict[str, Segmenter] = {}
        self._results: deque[Path] = deque()
        self.lock = threading.RLock()
        check_spec(config.spec, allow_untrained=config.allow_untrained)  # bad sources fail before serving

    @property
    def workdir(self) -> Path:
        """Where results and example scenes are written: the given folder, or a temporary one made on first
        use (so a session that never served leaves nothing behind)."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="llavaseg-demo-"))
        return self._workdir

    # ---------------------------------------------------------------------------------------------- routes
    def route_problems(self) -> dict[str, str]:
        """Why each demo route cannot run with these components (a missing trained part), from the spec
        alone: the page offers only the others and says why these are missing."""
        problems: dict[str, str] = {}
        for name in DEMO_ROUTES:
            if name not in route_names():
                problems[name] = f"route {name} is not registered"
                continue
            try:
                check_spec(self.config.spec, needs=route_needs([name]), allow_untrained=self.config.allow_untrained)
            except LlavasegError as error:
                problems[name] = str(error).splitlines()[0]
        return problems

    def routes(self) -> list[str]:
        """The demo routes that can run, in :data:`DEMO_ROUTES` order."""
        problems = self.route_problems()
        return [name for name in DEMO_ROUTES if name not in problems]

    def untrained(self) -> list[str]:
        """Parts that will be random weights (said on the page: their masks are plumbing, not results)."""
        spec, allow = self.config.spec, self.config.allow_untrained
        parts = list(check_spec(spec, allow_untrained=allow))
        if allow:
            parts += [part for part in ("adapters", "seg_token") if getattr(spec, part) is None]
        return parts

    @property
    def loaded(self) -> bool:
        """Whether the frozen models are already in memory (the first request says it is loading them)."""
        return self._components is not None

    def components(self) -> Components:
        """The frozen models, built on first use and then shared by every route and the chat."""
        with self.lock:
            if self._components is None:
                config = self.config
                untrained = check_spec(config.spec, allow_untrained=config.allow_untrained)
                parts = build_components(config.spec, device=config.device, dtype=config.dtype,
                                         quantization=config.quantization, untrained=untrained,
                                         allow_untrained=config.allow_untrained, notices=config.notices)
                if config.pipeline is not None:
                    manifest, _ = read_pipeline(config.pipeline)
                    check_pipeline_identities(manifest, parts, config.pipeline)
                self._components = parts
            return self._components

    def segmenter(self, route: str) -> Segmenter:
        """The segmenter of ``route``, built the first time it is asked for, over the shared components."""
        if route not in DEMO_ROUTES:
            raise InputError(f"unknown route {route!r}; pick one of {', '.join(self.routes())}")
        with self.lock:
            if route not in self._segmenters:
                check_spec(self.config.spec, needs=route_needs([route]), allow_untrained=self.config.allow_untrained)
                self._segmenters[route] = Segmenter(components=self.components(), prompts_dir=self.config.prompts_dir,
                                                    route=route, batch_size=1, preset=self.config.preset)
            return self._segmenters[route]

    @property
    def mllm(self) -> FrozenMLLM:
        """The frozen MLLM the chat talks to (the same object every route's stages use)."""
        return self.components().mllm

    # ---------------------------------------------------------------------------------------------- running
    def segment(self, image: np.ndarray, query: str, route: str, *, keep: bool = False) -> SavedResult:
        """Run ``route`` on one image and query, and write the mask PNG and the result JSON for download."""
        query = check_query(query)
        with self.lock:
            result = self.segmenter(route)(image, query)
        return self.save(result, image, keep=keep)

    def save(self, result: SegmentationResult, image: np.ndarray, *, keep: bool = False) -> SavedResult:
        """Write ``result``'s overlay, mask and JSON into a fresh folder (names a browser's download keeps).
        ``keep``: never pruned, for files a chat history still shows."""
        folder = self.workdir / ("chat" if keep else "results") / uuid.uuid4().hex
        folder.mkdir(parents=True)
        overlay_png, mask_png, result_json = folder / "overlay.png", folder / "mask.png", folder / "result.json"
        tinted = overlay(image, result.mask)
        tinted.save(overlay_png, format="PNG")
        mask_image(result.mask).save(mask_png, format="PNG")
        result_json.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
        if not keep:
            self._remember(folder)
        return SavedResult(result, np.asarray(tinted), overlay_png, mask_png, result_json)

    def save_json(self, payload: dict[str, object], name: str) -> Path:
        """Write a JSON document (e.g. two routes' results) for download."""
        folder = self.workdir / "results" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        path = folder / name
        path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        self._remember(folder)
        return path

    def _remember(self, folder: Path) -> None:
        self._results.append(folder)
        while len(self._results) > KEPT_RESULTS:
            shutil.rmtree(self._results.popleft(), ignore_errors=True)

    def preload(self, route: str | None = None) -> None:
        """Build the models (and ``route``'s segmenter) now, so a broken checkpoint fails before serving."""
        self.components()
        if route is not None:
            self.segmenter(route)

    def close(self) -> None:
        """Remove the work folder the session created (results and example scenes)."""
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


@dataclass
class Example:
    """One example of the page: an image file and a query about it."""

    image: Path
    query: str
    label: str = field(default="")


def tiny_world_examples(folder: Path, count: int = 3) -> list[Example]:
    """The shipped sample scene and ``count`` freshly generated tiny-world val scenes (written into
    ``folder``), each with one of its ground-truth queries: examples that work offline on the default
    preset."""
    from llavaseg.tinyworld import SAMPLE_QUERY, sample_scene
    from llavaseg.tinyworld.generate import iter_scenes, scene_name

    examples = [Example(sample_scene(), SAMPLE_QUERY, "shipped sample scene")]
    folder.mkdir(parents=True, exist_ok=True)
    for index, (_, image, queries, _) in enumerate(iter_scenes("val", seed=0, count=count)):
        path = folder / f"{scene_name('val', index)}.png"
        image.save(path, format="PNG")
        examples.append(Example(path, queries[0].text, f"generated {scene_name('val', index)}"))
    return examples
