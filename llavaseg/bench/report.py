"""Benchmark results: the pydantic model behind ``results.json``, the one-row-per-route ``results.csv`` and
the console tables.

Metrics are fractions in ``[0, 1]`` like :mod:`llavaseg.evaluate` (LISA's tables print percentages).
``results.json`` and ``results.csv`` are rewritten atomically at the end of every run (including a
resumed one), from the per-query JSONL files, so they always describe every query of the selection.

Beside each metric: its bootstrap interval, N-acc / T-acc when the data has no-target queries, and the paired
comparisons of every two routes (or prediction sets) on their common queries. A ``score`` run (predictions
made elsewhere) also records, per prediction set, what was matched, missing and left over.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.table import Table

from llavaseg.bench.dialogue import DialogueMetrics
from llavaseg.bench.jsonl import write_atomic
from llavaseg.evaluate import PairedTest, SplitMetrics
from llavaseg.provenance import Provenance

__all__ = ["Environment", "RouteSummary", "RouteComparison", "Unmatched", "PredictionSource", "BenchResults",
           "write_results", "render_table", "make_console", "CSV_DIALOGUE_FIELDS"]

CSV_DIALOGUE_FIELDS = ("agreement_em", "agreement_f1", "reference_em", "reference_f1")


class Environment(BaseModel):
    """Where and with what the numbers were produced."""

    model_config = ConfigDict(frozen=True)

    benchmark: str
    preset: str
    data: str
    split: str
    device: str
    timestamp: str
    versions: dict[str, str]
    first_text_only: bool = False
    limit: int | None = None
    batch_size: int = 8
    prompts: str = ""
    dialogue: str | None = None
    extra: dict[str, str] = {}
    provenance: Provenance | None = None
    protocol: str = "default"  # "lisa": LISA's first text per image and its count + 1e-5 divisor
    bootstrap: int = 0  # resamples behind every interval (0: none)
    permutations: int = 0  # sign-flip patterns behind every paired p-value
    seed: int = 0
    interval_method: str = "studentized"


class RouteSummary(BaseModel):
    """One route's scores. ``metrics`` keys: ``overall``/``short``/``long`` (ReasonSeg) or split names (RefCOCO).

    ``seconds_per_query`` is the mean wall time of the route call per query over every scored query (also
    those from an earlier, resumed process); ``peak_rss_mb`` is this process's peak resident set size
    (``getrusage``, monotone over the run) after the route finished, and ``cuda_peak_mb`` the route's
    ``torch.cuda.max_memory_allocated`` (``None`` on CPU).
    """

    model_config = ConfigDict(frozen=True)

    route: str
    summary: str = ""
    untrained: list[str] = []
    metrics: dict[str, SplitMetrics]
    n_queries: int
    n_errors: int
    n_resumed: int = 0
    seconds_per_query: float | None = None
    mllm_calls_per_query: float | None = None  # conversation turns sent to an MLLM (routes that report them)
    peak_rss_mb: float | None = None
    cuda_peak_mb: float | None = None
    dialogue: DialogueMetrics | None = None


class RouteComparison(PairedTest):
    """Route (or prediction set) ``a`` minus ``b`` on their common queries (see :func:`llavaseg.evaluate.paired_test`)."""

    a: str
    b: str


class Unmatched(BaseModel):
    """A prediction file or line that scored nothing, and why."""

    model_config = ConfigDict(frozen=True)

    item: str
    reason: str


class PredictionSource(BaseModel):
    """Where a scored prediction set came from and how it matched the data set (``llavaseg-bench score``).

    ``naming`` is ``per-text`` (``<image stem>_<text index>.png``, or JSONL records) or ``first-text``
    (``<image stem>.png``: LISA-style outputs, one per image, so the first text of each image is scored).
    ``missing`` lists the queries without a prediction (scored as empty masks), ``unreadable`` the queries
    whose prediction could not be decoded (scored as failures, IoU 0), ``unmatched`` everything that matched
    no selected query.
    """

    model_config = ConfigDict(frozen=True)

    path: str
    format: str
    naming: str
    n_items: int
    n_matched: int
    missing: list[str] = []
    unreadable: dict[str, str] = {}
    unmatched: list[Unmatched] = []


class BenchResults(BaseModel):
    """Everything ``results.json`` holds."""

    model_config = ConfigDict(frozen=True)

    environment: Environment
    routes: dict[str, RouteSummary]
    skipped_routes: dict[str, str] = {}
    base_dialogue: DialogueMetrics | None = None
    comparisons: list[RouteComparison] = []
    predictions: dict[str, PredictionSource] = {}

    def metric_keys(self) -> list[str]:
        keys: list[str] = []
        for summary in self.routes.values():
            keys += [k for k in summary.metrics if k not in keys]
        return keys


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


_CSV_EXTRA = ("giou_ci_low", "giou_ci_high", "ciou_ci_low", "ciou_ci_high", "n_no_target", "n_acc", "t_acc")


def _extra_cells(metric: SplitMetrics | None) -> list[object]:
    if metric is None:
        return [""] * len(_CSV_EXTRA)
    giou_ci, ciou_ci = metric.giou_ci or (None, None), metric.ciou_ci or (None, None)
    return [*giou_ci, *ciou_ci, metric.n_no_target, metric.n_acc, metric.t_acc]


def csv_text(results: BenchResults) -> str:
    """One row per route: split metrics, cost, dialogue columns, then intervals and no-target rates per split
    (appended, so that readers of the earlier columns are unaffected)."""
    keys = results.metric_keys()
    header = ["route", "untrained", "n_queries", "n_errors"]
    for key in keys:
        header += [f"{key}_giou", f"{key}_ciou", f"{key}_n"]
    header += ["seconds_per_query", "peak_rss_mb", "cuda_peak_mb", "dialogue_n"]
    header += [f"dialogue_{name}" for name in CSV_DIALOGUE_FIELDS]
    header += [f"{key}_{field}" for key in keys for field in _CSV_EXTRA]
    header.append("mllm_calls_per_query")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for name, summary in results.routes.items():
        row: list[object] = [name, ";".join(summary.untrained), summary.n_queries, summary.n_errors]
        for key in keys:
            metric = summary.metrics.get(key)
            row += [metric.giou, metric.ciou, metric.n_queries] if metric else ["", "", 0]
        row += [summary.seconds_per_query, summary.peak_rss_mb, summary.cuda_peak_mb]
        dialogue = summary.dialogue
        row.append(dialogue.n_items if dialogue else "")
        row += [getattr(dialogue, field) if dialogue else "" for field in CSV_DIALOGUE_FIELDS]
        for key in keys:
            row += _extra_cells(summary.metrics.get(key))
        row.append(summary.mllm_calls_per_query)
        writer.writerow(["" if value is None else value for value in row])
    return buffer.getvalue()


def write_results(out_dir: Path, results: BenchResults) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.csv`` atomically; return their paths."""
    json_path, csv_path = Path(out_dir) / "results.json", Path(out_dir) / "results.csv"
    write_atomic(json_path, results.model_dump_json(indent=2) + "\n")
    write_atomic(csv_path, csv_text(results))
    return json_path, csv_path


def make_console() -> Console:
    """A rich console; when output is not a terminal (a log file) it is 160 columns wide, so the tables
    are not folded into unreadable 80-column cells."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def _title(env: Environment) -> str:
    if env.benchmark == "score":
        return f"score | {env.extra.get('kind', '')} | split {env.split} | {env.data}"
    return f"{env.benchmark} | preset {env.preset} | split {env.split} | {env.data}"


def _caption(env: Environment) -> str:
    parts = ["gIoU / cIoU are fractions in [0, 1]"]
    if env.bootstrap:
        parts.append(f"intervals below: {env.interval_method} bootstrap over images, {env.bootstrap} resamples, "
                     f"seed {env.seed}")
    if env.protocol == "lisa":
        parts.append("LISA-compatible: first text per image, gIoU = sum / (count + 1e-5) in float32")
    return "; ".join(parts)


def _interval(ci: tuple[float, float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _segmentation_table(results: BenchResults) -> Table:
    """Metrics per group, then cost columns (the layout of earlier versions)."""
    env = results.environment
    table = Table(title=_title(env), caption=_caption(env))
    table.add_column("route", style="bold", no_wrap=True)
    keys = results.metric_keys()
    for key in keys:
        table.add_column(f"{key}\ngIoU", justify="right")
        table.add_column(f"{key}\ncIoU", justify="right")
    for title in ("s/query", "MLLM\ncalls/q", "peak RSS\nMB", "CUDA peak\nMB", "queries", "errors"):
        table.add_column(title, justify="right")
    for name, summary in results.routes.items():
        cells = [f"{name} [red](untrained: {', '.join(summary.untrained)})[/red]" if summary.untrained else name]
        for key in keys:
            metric = summary.metrics.get(key)
            cells += [_fmt(metric.giou if metric else None), _fmt(metric.ciou if metric else None)]
        cells += [_fmt(summary.seconds_per_query, 3), _fmt(summary.mllm_calls_per_query, 1),
                  _fmt(summary.peak_rss_mb, 0), _fmt(summary.cuda_peak_mb, 0), str(summary.n_queries),
                  str(summary.n_errors)]
        table.add_row(*cells)
    return table


def _uncertainty_table(results: BenchResults) -> Table | None:
    """Per route and metric group: gIoU and cIoU with their 95% intervals, and N-acc / T-acc when the data
    has no-target queries. ``None`` when there is nothing to show (no intervals, no no-target query)."""
    no_target = any(m.n_no_target for r in results.routes.values() for m in r.metrics.values())
    if not results.environment.bootstrap and not no_target:
        return None
    table = Table(title="uncertainty (95% intervals) and no-target queries" if no_target else "95% intervals")
    for title in ("route", "group", "gIoU", "95% interval", "cIoU", "95% interval"):
        table.add_column(title, justify="left" if title in ("route", "group") else "right", no_wrap=True)
    if no_target:
        for title in ("no-target", "N-acc", "T-acc"):
            table.add_column(title, justify="right")
    for name, summary in results.routes.items():
        for key, m in summary.metrics.items():
            cells = [name, key, _fmt(m.giou), _interval(m.giou_ci), _fmt(m.ciou), _interval(m.ciou_ci)]
            cells += [str(m.n_no_target), _fmt(m.n_acc), _fmt(m.t_acc)] if no_target else []
            table.add_row(*cells)
    return table


def _comparison_table(results: BenchResults) -> Table | None:
    if not results.comparisons:
        return None
    env = results.environment
    table = Table(title="paired differences (A - B on the same queries)",
                  caption=f"interval: paired bootstrap over images; p: two-sided sign-flip permutation test over "
                          f"images ({env.permutations} patterns, or all when fewer)")
    table.add_column("A - B", style="bold", no_wrap=True)
    for title in ("queries", "images", "gIoU diff", "95% interval", "p", "cIoU diff", "95% interval", "p"):
        table.add_column(title, justify="right", no_wrap=True)
    for c in results.comparisons:
        table.add_row(f"{c.a} - {c.b}", str(c.n_queries), str(c.n_images), f"{c.giou_diff:+.3f}",
                      _interval(c.giou_diff_ci), _p(c.giou_p, c.exact), f"{c.ciou_diff:+.3f}",
                      _interval(c.ciou_diff_ci), _p(c.ciou_p, c.exact))
    return table


def _p(value: float, exact: bool) -> str:
    return f"{value:.4f}" + (" (exact)" if exact else "")


def _dialogue_table(results: BenchResults) -> Table | None:
    if results.base_dialogue is None:
        return None
    dialogue = Table(title="dialogue preservation (greedy answers to held-out questions)",
                     caption="agree = vs the base MLLM's answers, ref = vs reference answers; EM and SQuAD token F1")
    dialogue.add_column("model", style="bold", no_wrap=True)
    for title in ("questions", "errors", "agree EM", "agree F1", "ref EM", "ref F1"):
        dialogue.add_column(title, justify="right")
    rows = [(name, s.dialogue) for name, s in results.routes.items() if s.dialogue is not None]
    for name, d in [("base MLLM", results.base_dialogue), *rows]:
        dialogue.add_row(name, str(d.n_items), str(d.n_errors), _fmt(d.agreement_em), _fmt(d.agreement_f1),
                         _fmt(d.reference_em), _fmt(d.reference_f1))
    return dialogue


def prediction_lines(results: BenchResults, examples: int = 3) -> list[str]:
    """One line per prediction set of a ``score`` run: matched, missing, unreadable, unmatched (with examples)."""
    lines = []
    for name, source in results.predictions.items():
        parts = [f"{source.n_matched} of {source.n_items} {'files' if source.format == 'png-folder' else 'lines'} "
                 f"matched ({source.naming} naming)"]
        if source.missing:
            parts.append(f"{len(source.missing)} queries without a prediction, scored as empty masks "
                         f"(e.g. {', '.join(source.missing[:examples])})")
        if source.unreadable:
            first = next(iter(source.unreadable.items()))
            parts.append(f"{len(source.unreadable)} unreadable, scored as failures (e.g. {first[0]}: {first[1]})")
        if source.unmatched:
            shown = "; ".join(f"{u.item}: {u.reason}" for u in source.unmatched[:examples])
            parts.append(f"{len(source.unmatched)} not scored ({shown})")
        lines.append(f"{name} ({source.path}): " + "; ".join(parts))
    return lines


def render_table(results: BenchResults, console: Console | None = None) -> None:
    """Print the tables with rich: segmentation (metrics, intervals, cost), paired differences, what each
    prediction set matched (``score``), dialogue preservation."""
    console = console or make_console()
    console.print(_segmentation_table(results))
    provenance = results.environment.provenance
    for notice in provenance.notices if provenance else []:
        console.print(f"[yellow]note: {notice}[/yellow]")
    for table in (_uncertainty_table(results), _comparison_table(results)):
        if table is not None:
            console.print(table)
    for line in prediction_lines(results):
        console.print(line, markup=False, highlight=False)
    dialogue = _dialogue_table(results)
    if dialogue is not None:
        console.print(dialogue)
