"""The benchmark: every route on the same queries, scored by the shared evaluator, resumable.

The per-route loop is :mod:`llavaseg.bench.scoring`; this module checks the run (its folder, its component
sources, what each route needs), builds the components, runs the routes and the dialogue probe, and writes the
results. A route whose trained part is missing is skipped with the reason when routes were not named, and
refused when they were (unless untrained parts are allowed: then the results mark it).

Frozen components are built once per process (``_COMPONENTS``) and shared by every route: they are frozen,
so sharing cannot change a result, and a notebook or test session running several benchmarks pays the
model loading once.
"""

from __future__ import annotations

import logging
import resource
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from llavaseg.bench.config import (
    RunConfig,
    check_run_config,
    file_fingerprint,
    fingerprint,
    write_run_config,
)
from llavaseg.bench.dialogue import (
    DialogueItem,
    DialogueMetrics,
    collect_answers,
    dialogue_metrics,
    load_dialogue,
)
from llavaseg.bench.outputs import write_outputs
from llavaseg.bench.records import BenchRecord
from llavaseg.bench.report import (
    BenchResults,
    Environment,
    RouteSummary,
)
from llavaseg.bench.scoring import one_line, route_file, run_route
from llavaseg.bench.summaries import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_PERMUTATIONS,
    Statistics,
    compare_routes,
    route_metrics,
)
from llavaseg.data.annotations import STAGES_FILE
from llavaseg.distributed import World, world
from llavaseg.errors import InputError, LlavasegError, UntrainedError
from llavaseg.models.components import (
    Components,
    ComponentSpec,
    build_components,
    check_spec,
)
from llavaseg.models.presets import get_preset
from llavaseg.models.sources import parse_source
from llavaseg.provenance import Provenance, package_versions, text_digest
from llavaseg.routes.registry import (
    RouteContext,
    build_route,
    check_route_names,
    route_entry,
    route_names,
    route_needs,
    route_untrained,
)

__all__ = ["BenchSettings", "run_benchmark", "check_preset_files", "shared_components"]

logger = logging.getLogger(__name__)
_COMPONENTS: dict[tuple[str, str, bool], Components] = {}


@dataclass
class BenchSettings:
    """Everything a benchmark run needs besides its queries (the CLI fills it from its flags).

    ``spec`` replaces the preset's component sources (``--mllm``, ``--sam``, ... or a pipeline folder);
    ``allow_untrained`` lets routes run with random trainable parts (results then mark them)."""

    benchmark: str
    preset: str
    out_dir: Path
    data: str
    split: str
    routes: list[str] | None = None  # None: every registered route that can be built for the components
    spec: ComponentSpec | None = None
    allow_untrained: bool = False
    device: str = "cpu"
    batch_size: int = 8
    limit: int | None = None
    prompts_dir: Path | None = None
    first_text_only: bool = False
    dialogue: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)
    overlay_rows: int = 6
    lisa_compat: bool = False  # LISA's accumulation (and, for ReasonSeg, its first text per image)
    bootstrap: int = DEFAULT_BOOTSTRAP  # resamples behind the 95% intervals (0: none)
    permutations: int = DEFAULT_PERMUTATIONS  # sign-flip patterns behind the paired p-values
    seed: int = 0

    def statistics(self) -> Statistics:
        return Statistics(lisa_compat=self.lisa_compat, bootstrap=self.bootstrap, permutations=self.permutations,
                          seed=self.seed)


def check_preset_files(spec: ComponentSpec, name: str | None = None) -> None:
    """Fail early, and clearly, if the shipped weights (``pkg:`` sources) a spec names are not installed."""
    name = name or getattr(spec, "name", "custom")
    missing = []
    for spec in (spec.mllm, spec.sam, spec.clip, spec.adapters):
        source = parse_source(spec) if spec else None
        if source is not None and source.shipped and not source.path().exists():
            missing.append(str(source.path()))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputError(f"preset {name!r} needs shipped weights missing from this install "
                         f"({missing[0]}{more}); "
                         "use --preset tiny (random weights: plumbing only, meaningless scores)")


def _spec(settings: BenchSettings) -> ComponentSpec:
    return settings.spec or get_preset(settings.preset).spec()


def _allow_untrained(settings: BenchSettings) -> bool:
    return settings.allow_untrained or get_preset(settings.preset).plumbing


def shared_components(preset_name: str, device: str, spec: ComponentSpec | None = None,
                      allow_untrained: bool | None = None) -> Components:
    """The frozen components, built once per process and shared by every route and run."""
    preset = get_preset(preset_name)
    spec = spec or preset.spec()
    allow = preset.plumbing if allow_untrained is None else allow_untrained
    key = (spec.model_dump_json(), device, allow)
    if key not in _COMPONENTS:
        check_preset_files(spec, preset_name)
        untrained = check_spec(spec, allow_untrained=allow)
        notices = (preset.notice,) if preset.notice and spec == preset.spec() else ()
        try:
            _COMPONENTS[key] = build_components(spec, device=device, untrained=untrained, allow_untrained=allow,
                                                notices=notices)
        except LlavasegError as exc:
            raise type(exc)(f"cannot build preset {preset_name!r}: {exc}") from None
    return _COMPONENTS[key]


def _models_fingerprint(parts: Components) -> str:
    """Identity of the frozen models, the adapters and the generation length: results depend on all of them."""
    return fingerprint({"mllm": parts.mllm.identity(), "max_new_tokens": parts.mllm.max_new_tokens,
                        "sam": parts.sam.identity(), "text": parts.text_encoder.identity(),
                        "adapters": parts.adapters.fingerprint() if parts.adapters is not None else None,
                        "seg_token": parts.seg_token_source, "seg_token_cot": parts.seg_token_cot_source,
                        "untrained": list(parts.untrained)})


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _requested_routes(settings: BenchSettings) -> tuple[list[str], dict[str, str]]:
    """The routes to run and the ones skipped (with why): named routes whose trained part is missing are
    refused; unnamed (all registered) routes missing one are skipped, unless untrained parts are allowed."""
    get_preset(settings.preset)
    named = settings.routes is not None
    requested = check_route_names(list(settings.routes) if named else route_names())
    spec, allow = _spec(settings), _allow_untrained(settings)
    if named:
        check_spec(spec, needs=route_needs(requested), allow_untrained=allow)
        return requested, {}
    runnable, skipped = [], {}
    for name in requested:
        try:
            check_spec(spec, needs=route_needs([name]), allow_untrained=allow)
            runnable.append(name)
        except UntrainedError as exc:
            skipped[name] = str(exc)
            logger.warning("skipping route %s: %s", name, exc)
    if not runnable:
        raise UntrainedError(f"no route can run with these components ({'; '.join(skipped.values())})")
    return runnable, skipped


def _build_routes(settings: BenchSettings, requested: list[str], parts, prompts
                  ) -> tuple[dict[str, object], dict[str, str]]:
    """Every requested route that can be built; the others with the one-line reason they could not."""
    options: dict[str, object] = {}
    if settings.benchmark == "reasonseg" and (Path(settings.data) / settings.split / STAGES_FILE).is_file():
        options["reference_data"] = (settings.data, settings.split)  # enables route llavaseg-oracle
    context = RouteContext(parts, prompts, preset=get_preset(settings.preset), device=settings.device,
                           options=options)
    routes: dict[str, object] = {}
    skipped: dict[str, str] = {}
    for name in requested:
        try:
            routes[name] = build_route(name, context)
        except Exception as exc:  # noqa: BLE001 - a route that cannot be built is reported, not fatal
            skipped[name] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            logger.warning("skipping route %s: %s", name, skipped[name])
    if not routes:
        raise InputError(f"no route could be built for preset {settings.preset!r} "
                         f"({'; '.join(f'{k}: {v}' for k, v in skipped.items())})")
    return routes, skipped


def _score_routes(routes: dict[str, object], queries: list, settings: BenchSettings, place: World = World()
                  ) -> tuple[dict[str, list[BenchRecord]], dict[str, tuple[int, float, float | None]]]:
    """Per-query records of every route (resumed where already scored) and each route's cost figures."""
    import torch

    cuda = torch.device(settings.device).type == "cuda"
    per_route: dict[str, list[BenchRecord]] = {}
    costs: dict[str, tuple[int, float, float | None]] = {}
    for name, route in routes.items():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        store = route_file(Path(settings.out_dir), "queries", name)
        per_route[name], resumed = run_route(name, route, queries, store, settings.batch_size, place)
        costs[name] = (resumed, _peak_rss_mb(), torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
    return per_route, costs


def _probe_dialogue(routes: dict[str, object], base_answer, items: list[DialogueItem] | None,
                    settings: BenchSettings) -> tuple[DialogueMetrics | None, dict[str, DialogueMetrics]]:
    """Dialogue preservation: the base MLLM's answers, then each route's chat model against them."""
    if items is None:
        return None, {}
    out = Path(settings.out_dir)
    base = collect_answers(base_answer, items, out / "dialogue-base.jsonl", batch_size=settings.batch_size,
                           desc="dialogue: base")
    route_dialogue: dict[str, DialogueMetrics] = {}
    for name, route in routes.items():
        try:
            answer_fn = route.dialogue_model().answer
        except Exception as exc:  # noqa: BLE001 - a route without a chat model cannot be probed
            logger.warning("route %s: no dialogue model (%s)", name, one_line(exc))
            continue
        answers = collect_answers(answer_fn, items, route_file(out, "dialogue", name),
                                  batch_size=settings.batch_size, desc=f"dialogue: {name}")
        route_dialogue[name] = dialogue_metrics(items, answers, base)
    return dialogue_metrics(items, base, None), route_dialogue


def _summaries_of(per_route: dict[str, list[BenchRecord]], costs: dict[str, tuple[int, float, float | None]],
                  groups: dict[str, str] | None, dialogue: dict[str, DialogueMetrics],
                  parts: Components, stats: Statistics) -> dict[str, RouteSummary]:
    summaries = {}
    for name, records in per_route.items():
        resumed, rss, cuda_mb = costs[name]
        summaries[name] = RouteSummary(
            route=name, summary=route_entry(name).summary, untrained=route_untrained(name, parts.untrained),
            metrics=route_metrics(records, groups, stats), n_queries=len(records),
            n_errors=sum(r.error is not None for r in records), n_resumed=resumed,
            seconds_per_query=float(np.mean([r.seconds for r in records])), peak_rss_mb=rss, cuda_peak_mb=cuda_mb,
            mllm_calls_per_query=_mean_calls(records),
            dialogue=dialogue.get(name))
    return summaries


def _mean_calls(records: list[BenchRecord]) -> float | None:
    calls = [r.mllm_calls for r in records if r.mllm_calls is not None]
    return float(np.mean(calls)) if calls else None


def _environment(settings: BenchSettings, config: RunConfig, provenance: Provenance) -> Environment:
    return Environment(provenance=provenance,
        benchmark=settings.benchmark, preset=settings.preset, data=settings.data, split=settings.split,
        device=settings.device, timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=package_versions(), first_text_only=settings.first_text_only, limit=settings.limit,
        batch_size=settings.batch_size, prompts=config.prompts, dialogue=config.dialogue, extra=dict(settings.extra),
        protocol="lisa" if settings.lisa_compat else "default", bootstrap=settings.bootstrap,
        permutations=settings.permutations, seed=settings.seed)


def _open_run(settings: BenchSettings, requested: list[str], prompts) -> tuple[RunConfig, Components]:
    """Check the results folder belongs to this run (before and after loading the models); load them."""
    out = Path(settings.out_dir)
    spec = _spec(settings)
    config = RunConfig(
        benchmark=settings.benchmark, preset=settings.preset, data=settings.data, split=settings.split,
        routes=requested, prompts=fingerprint(prompts.identity()), first_text_only=settings.first_text_only,
        dialogue=(f"{Path(settings.dialogue).resolve()}#{file_fingerprint(settings.dialogue)}"
                  if settings.dialogue is not None else None),
        extra={**settings.extra, "components": fingerprint(spec.model_dump(mode="json"))},
    )
    check_run_config(out, config, ignore=("models",))  # refuse before loading any model
    parts = shared_components(settings.preset, settings.device, spec, _allow_untrained(settings))
    config = config.model_copy(update={"models": _models_fingerprint(parts)})
    check_run_config(out, config)
    write_run_config(out, config)
    return config, parts


def _provenance(parts: Components, prompts) -> Provenance:
    spec = parts.spec
    components = {"mllm": {"source": spec.mllm, **parts.mllm.identity()},
                  "sam": {"source": spec.sam, **parts.sam.identity()},
                  "clip": {"source": spec.clip, **parts.text_encoder.identity()}}
    if parts.adapters is not None:
        components["adapters"] = {"source": spec.adapters or "(untrained)", "weights": parts.adapters.fingerprint()}
    for part in ("seg_token", "seg_token_cot"):
        if getattr(spec, part):
            components[part] = {"source": getattr(spec, part)}
    return Provenance(components=components, untrained=list(parts.untrained), notices=list(parts.notices),
                      templates={stage: text_digest(t.text) for stage, t in prompts.templates.items()})


def run_benchmark(settings: BenchSettings, queries: list, *, groups: dict[str, str] | None = None
                  ) -> BenchResults | None:
    """Run (or resume) a benchmark into ``settings.out_dir`` and return its results (also written to disk:
    ``results.json``, ``results.csv``, ``overlays.png``, the charts and ``report.html``; ``render_table``
    prints them).

    ``queries`` is the selection (after ``--limit``); ``groups`` maps query ids to metric groups (RefCOCO
    splits) - without it metrics are ReasonSeg's overall/short/long. Under ``torchrun`` every rank scores its
    share of each route's batches (:func:`~llavaseg.bench.scoring.run_route`); rank 0 returns the results, the
    other ranks ``None``.
    """
    from llavaseg.prompting import PromptSet

    requested, skipped = _requested_routes(settings)
    if not queries:
        raise InputError("no queries selected (empty split, or --limit 0)")
    prompts = PromptSet.load(settings.prompts_dir)
    items = load_dialogue(settings.dialogue, max_images=settings.limit) if settings.dialogue is not None else None
    config, parts = _open_run(settings, requested, prompts)
    routes, not_built = _build_routes(settings, requested, parts, prompts)
    place = world(settings.device)
    per_route, costs = _score_routes(routes, queries, settings, place)
    if not place.is_main:
        return None  # rank 0 probes dialogue and writes the results
    base_metrics, route_dialogue = _probe_dialogue(routes, parts.mllm.answer, items, settings)
    stats = settings.statistics()
    results = BenchResults(environment=_environment(settings, config, _provenance(parts, prompts)),
                           routes=_summaries_of(per_route, costs, groups, route_dialogue, parts, stats),
                           skipped_routes={**skipped, **not_built}, base_dialogue=base_metrics,
                           comparisons=compare_routes(per_route, stats))
    write_outputs(Path(settings.out_dir), results, per_route, queries, settings.overlay_rows)
    return results
