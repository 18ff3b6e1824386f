"""The benchmark loop: every route on the same queries, scored by the shared evaluator, resumable.

For each route the selected queries not yet in ``queries-<route>.jsonl`` are grouped by image (queries on the
same image go into the same batch and share one decoded image array, so SAM's feature cache and the
MLLM's image work are reused), packed into batches of ``batch_size``, passed to the route, scored, and
appended to the JSONL file as each batch finishes. A batch that raises is retried query by query, so one
bad sample costs one error record (scored as the evaluator's rule says) instead of the run.

Frozen components are built once per process (``_COMPONENTS``) and shared by every route: they are frozen,
so sharing cannot change a result, and a notebook or test session running several benchmarks pays the
model loading once.
"""

from __future__ import annotations

import hashlib
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
from rich.console import Console
from tqdm import tqdm

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
from llavaseg.bench.jsonl import append_jsonl, read_jsonl
from llavaseg.bench.overlays import OverlayRow, write_grid
from llavaseg.bench.records import BenchRecord, record_from_error, record_from_result
from llavaseg.bench.report import (
    BenchResults,
    Environment,
    RouteSummary,
    make_console,
    render_table,
    write_results,
)
from llavaseg.data.annotations import STAGES_FILE
from llavaseg.errors import InputError, LlavasegError
from llavaseg.evaluate import SplitMetrics, summarize
from llavaseg.images import check_query

__all__ = ["BenchSettings", "run_benchmark", "make_batches", "check_preset_files", "route_file", "shared_components"]

_COMPONENTS: dict[tuple[str, str], object] = {}


@dataclass
class BenchSettings:
    """Everything a benchmark run needs besides its queries (the CLI fills it from its flags)."""

    benchmark: str
    preset: str
    out_dir: Path
    data: str
    split: str
    routes: list[str] | None = None  # None: every registered route that can be built for the preset
    device: str = "cpu"
    batch_size: int = 8
    limit: int | None = None
    prompts_dir: Path | None = None
    first_text_only: bool = False
    dialogue: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)
    overlay_rows: int = 6


def route_file(out_dir: Path, prefix: str, route: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in route)
    return Path(out_dir) / f"{prefix}-{safe}.jsonl"


def make_batches(queries: list, batch_size: int) -> list[list]:
    """Group queries by ``sample_id`` (first-appearance order) and pack whole groups into batches.

    A group larger than ``batch_size`` is split into full chunks; otherwise a group never straddles two
    batches, so an image's work is shared by all its queries.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    groups: dict[str, list] = {}
    for query in queries:
        groups.setdefault(str(query.sample_id), []).append(query)
    batches: list[list] = []
    current: list = []
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start: start + batch_size]
            if current and len(current) + len(chunk) > batch_size:
                batches.append(current)
                current = []
            current = current + chunk
    if current:
        batches.append(current)
    return batches


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _score_batch(name: str, route, batch: list) -> list[BenchRecord]:
    """Run ``route`` on one batch and score it; failures become error records, one per failing query."""
    images: dict[str, np.ndarray | BaseException] = {}
    for query in batch:
        key = str(query.sample_id)
        if key not in images:
            try:
                images[key] = query.load_image()
            except LlavasegError as exc:  # an unreadable image fails its queries, not the run
                images[key] = exc
    gts = [query.load_mask() for query in batch]
    records: dict[int, BenchRecord] = {}
    runnable: list[int] = []
    texts: dict[int, str] = {}
    for index, query in enumerate(batch):
        image = images[str(query.sample_id)]
        try:
            if isinstance(image, BaseException):
                raise image
            texts[index] = check_query(query.text)
            runnable.append(index)
        except LlavasegError as exc:
            records[index] = record_from_error(name, query, gts[index], _one_line(exc), 0.0)

    def attempt(indices: list[int]) -> tuple[list | None, str | None, float]:
        start = time.perf_counter()
        try:
            results = list(route([images[str(batch[i].sample_id)] for i in indices], [texts[i] for i in indices]))
            if len(results) != len(indices):
                raise RuntimeError(f"route returned {len(results)} results for {len(indices)} queries")
            return results, None, (time.perf_counter() - start) / len(indices)
        except Exception as exc:  # noqa: BLE001 - recorded per query below; KeyboardInterrupt propagates
            return None, _one_line(exc), (time.perf_counter() - start) / len(indices)

    def keep(index: int, result, seconds: float) -> None:
        try:
            records[index] = record_from_result(name, batch[index], gts[index], result, seconds)
        except (LlavasegError, ValueError) as exc:  # e.g. a mask of the wrong size
            records[index] = record_from_error(name, batch[index], gts[index], _one_line(exc), seconds)

    if runnable:
        results, error, seconds = attempt(runnable)
        if results is not None:
            for index, result in zip(runnable, results):
                keep(index, result, seconds)
        elif len(runnable) == 1:
            records[runnable[0]] = record_from_error(name, batch[runnable[0]], gts[runnable[0]], error, seconds)
        else:
            for index in runnable:  # isolate the failing query (or queries)
                results, error, seconds = attempt([index])
                if results is not None:
                    keep(index, results[0], seconds)
                else:
                    records[index] = record_from_error(name, batch[index], gts[index], error, seconds)
    return [records[i] for i in range(len(batch))]


def run_route(name: str, route, queries: list, store: Path, batch_size: int) -> tuple[list[BenchRecord], int]:
    """Score every query of ``queries`` with ``route``, reusing ``store``; returns (records, n_resumed)."""
    done = {record.query_id: record for record in read_jsonl(store, BenchRecord)}
    for query in queries:
        if query.query_id in done and done[query.query_id].text != query.text:
            raise InputError(f"{store}: query {query.query_id} was scored with another text "
                             f"({done[query.query_id].text!r}); the data changed, use a new --out")
    resumed = sum(query.query_id in done for query in queries)
    pending = [query for query in queries if query.query_id not in done]
    with tqdm(total=len(pending), desc=name, unit="q", file=sys.stderr) as bar:
        for batch in make_batches(pending, batch_size):
            records = _score_batch(name, route, batch)
            append_jsonl(store, records)
            done.update({record.query_id: record for record in records})
            bar.update(len(batch))
    return [done[query.query_id] for query in queries], resumed


def check_preset_files(preset) -> None:
    """Fail early, and clearly, if a preset's shipped weights (``pkg:`` sources) are not installed."""
    from llavaseg.models.sources import parse_source

    missing = []
    for spec in (preset.mllm, preset.sam_checkpoint, preset.clip_model, preset.adapters):
        source = parse_source(spec) if spec else None
        if source is not None and source.shipped and not source.path().exists():
            missing.append(str(source.path()))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputError(f"preset {preset.name!r} needs shipped weights missing from this install "
                         f"({missing[0]}{more}); "
                         "use --preset tiny (random weights: plumbing only, meaningless scores)")


def shared_components(preset_name: str, device: str):
    """The preset's frozen components, built once per process and shared by every route and run."""
    from llavaseg.models.presets import PRESETS, build_components

    key = (preset_name, device)
    if key not in _COMPONENTS:
        preset = PRESETS[preset_name]
        check_preset_files(preset)
        try:
            _COMPONENTS[key] = build_components(preset, device=device)
        except LlavasegError as exc:
            raise type(exc)(f"cannot build preset {preset_name!r}: {exc}") from None
    return _COMPONENTS[key]


def _models_fingerprint(parts) -> str:
    """Identity of the frozen models, the adapters and the generation length: results depend on all of them."""
    adapters = parts.adapters
    params = sorted((k, v.detach().float().cpu().numpy().tobytes()[:4096]) for k, v in adapters.state_dict().items())
    digest = hashlib.sha256()
    for key, blob in params:
        digest.update(key.encode())
        digest.update(blob)
    return fingerprint({"mllm": parts.mllm.identity(), "max_new_tokens": parts.mllm.max_new_tokens,
                        "sam": parts.sam.identity(),
                        "text": parts.text_encoder.identity(), "adapters": digest.hexdigest()})


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("llavaseg", "torch", "transformers", "numpy", "segment-anything", "open_clip_torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _summaries(records: list[BenchRecord], groups: dict[str, str] | None) -> dict[str, SplitMetrics]:
    if groups is None:
        return summarize(records)
    labels = list(dict.fromkeys(groups.values()))
    return {label: summarize([r for r in records if groups[r.query_id] == label])["overall"] for label in labels}


def _overlay_rows(queries: list, per_route: dict[str, list[BenchRecord]], count: int) -> list[OverlayRow]:
    rows = []
    for index, query in enumerate(queries[:count]):
        try:
            image, gt = query.load_image(), query.load_mask()
        except LlavasegError:
            continue
        cells = {}
        for name, records in per_route.items():
            record = records[index]
            label = f"IoU {record.iou:.2f}" if record.error is None else "error"
            cells[name] = (record.predicted_mask(), label)
        rows.append(OverlayRow(image=image, gt=gt, text=query.text, cells=cells))
    return rows


def _requested_routes(settings: BenchSettings) -> list[str]:
    from llavaseg.models.presets import PRESETS
    from llavaseg.routes.registry import ROUTES

    if settings.preset not in PRESETS:
        raise InputError(f"unknown preset {settings.preset!r}; available: {', '.join(PRESETS)}")
    requested = list(ROUTES) if settings.routes is None else list(dict.fromkeys(settings.routes))
    unknown = [name for name in requested if name not in ROUTES]
    if unknown:
        raise InputError(f"unknown route {unknown[0]!r}; available: {', '.join(ROUTES)}")
    return requested


def _build_routes(settings: BenchSettings, requested: list[str], parts, prompts, console: Console
                  ) -> tuple[dict[str, object], dict[str, str]]:
    """Every requested route that can be built; the others with the one-line reason they could not."""
    from llavaseg.models.presets import PRESETS
    from llavaseg.routes.registry import RouteContext, build_route

    options: dict[str, object] = {}
    if settings.benchmark == "reasonseg" and (Path(settings.data) / settings.split / STAGES_FILE).is_file():
        options["reference_data"] = (settings.data, settings.split)  # enables route llavaseg-oracle
    context = RouteContext(parts, prompts, preset=PRESETS[settings.preset], device=settings.device, options=options)
    routes: dict[str, object] = {}
    skipped: dict[str, str] = {}
    for name in requested:
        try:
            routes[name] = build_route(name, context)
        except Exception as exc:  # noqa: BLE001 - a route that cannot be built is reported, not fatal
            skipped[name] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            console.print(f"[yellow]skipping route {name}: {skipped[name]}[/yellow]")
    if not routes:
        raise InputError(f"no route could be built for preset {settings.preset!r} "
                         f"({'; '.join(f'{k}: {v}' for k, v in skipped.items())})")
    return routes, skipped


def _score_routes(routes: dict[str, object], queries: list, settings: BenchSettings
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
        per_route[name], resumed = run_route(name, route, queries, store, settings.batch_size)
        costs[name] = (resumed, _peak_rss_mb(), torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
    return per_route, costs


def _probe_dialogue(routes: dict[str, object], base_answer, items: list[DialogueItem] | None,
                    settings: BenchSettings, console: Console
                    ) -> tuple[DialogueMetrics | None, dict[str, DialogueMetrics]]:
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
            console.print(f"[yellow]route {name}: no dialogue model ({_one_line(exc)})[/yellow]")
            continue
        answers = collect_answers(answer_fn, items, route_file(out, "dialogue", name),
                                  batch_size=settings.batch_size, desc=f"dialogue: {name}")
        route_dialogue[name] = dialogue_metrics(items, answers, base)
    return dialogue_metrics(items, base, None), route_dialogue


def _summaries_of(per_route: dict[str, list[BenchRecord]], costs: dict[str, tuple[int, float, float | None]],
                  groups: dict[str, str] | None, dialogue: dict[str, DialogueMetrics]) -> dict[str, RouteSummary]:
    summaries = {}
    for name, records in per_route.items():
        resumed, rss, cuda_mb = costs[name]
        summaries[name] = RouteSummary(
            route=name, metrics=_summaries(records, groups), n_queries=len(records),
            n_errors=sum(r.error is not None for r in records), n_resumed=resumed,
            seconds_per_query=float(np.mean([r.seconds for r in records])), peak_rss_mb=rss, cuda_peak_mb=cuda_mb,
            dialogue=dialogue.get(name))
    return summaries


def _environment(settings: BenchSettings, config: RunConfig) -> Environment:
    return Environment(
        benchmark=settings.benchmark, preset=settings.preset, data=settings.data, split=settings.split,
        device=settings.device, timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=_versions(), first_text_only=settings.first_text_only, limit=settings.limit,
        batch_size=settings.batch_size, prompts=config.prompts, dialogue=config.dialogue, extra=dict(settings.extra))


def _open_run(settings: BenchSettings, requested: list[str], prompts) -> tuple[RunConfig, object]:
    """Check the results folder belongs to this run (before and after loading the models); load them."""
    from llavaseg.models.presets import PRESETS

    out = Path(settings.out_dir)
    config = RunConfig(
        benchmark=settings.benchmark, preset=settings.preset, data=settings.data, split=settings.split,
        routes=requested, prompts=fingerprint(prompts.identity()), first_text_only=settings.first_text_only,
        dialogue=(f"{Path(settings.dialogue).resolve()}#{file_fingerprint(settings.dialogue)}"
                  if settings.dialogue is not None else None),
        extra=dict(settings.extra),
    )
    check_run_config(out, config, ignore=("models",))  # refuse before loading any model
    check_preset_files(PRESETS[settings.preset])
    parts = shared_components(settings.preset, settings.device)
    config = config.model_copy(update={"models": _models_fingerprint(parts)})
    check_run_config(out, config)
    write_run_config(out, config)
    return config, parts


def run_benchmark(settings: BenchSettings, queries: list, *, groups: dict[str, str] | None = None,
                  console: Console | None = None) -> BenchResults:
    """Run (or resume) a benchmark into ``settings.out_dir`` and return its results (also written to disk).

    ``queries`` is the selection (after ``--limit``); ``groups`` maps query ids to metric groups (RefCOCO
    splits) - without it metrics are ReasonSeg's overall/short/long.
    """
    from llavaseg.prompting import PromptSet

    console = console or make_console()
    requested = _requested_routes(settings)
    if not queries:
        raise InputError("no queries selected (empty split, or --limit 0)")
    prompts = PromptSet.load(settings.prompts_dir)
    items = load_dialogue(settings.dialogue, max_images=settings.limit) if settings.dialogue is not None else None
    config, parts = _open_run(settings, requested, prompts)
    routes, skipped = _build_routes(settings, requested, parts, prompts, console)
    per_route, costs = _score_routes(routes, queries, settings)
    base_metrics, route_dialogue = _probe_dialogue(routes, parts.mllm.answer, items, settings, console)
    results = BenchResults(environment=_environment(settings, config),
                           routes=_summaries_of(per_route, costs, groups, route_dialogue), skipped_routes=skipped,
                           base_dialogue=base_metrics)
    out = Path(settings.out_dir)
    json_path, csv_path = write_results(out, results)
    grid = write_grid(out / "overlays.png", _overlay_rows(queries, per_route, settings.overlay_rows), list(per_route))
    render_table(results, console)
    console.print(f"wrote {json_path}, {csv_path}, {grid} and per-query queries-<route>.jsonl in {out}")
    return results
