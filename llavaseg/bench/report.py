"""Benchmark results: the pydantic model behind ``results.json``, the one-row-per-route ``results.csv`` and
the console table.

Metrics are fractions in ``[0, 1]`` like :mod:`llavaseg.evaluate` (LISA's tables print percentages).
``results.json`` and ``results.csv`` are rewritten atomically at the end of every run (including a
resumed one), from the per-query JSONL files, so they always describe every query of the selection.
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
from llavaseg.evaluate import SplitMetrics
from llavaseg.provenance import Provenance

__all__ = ["Environment", "RouteSummary", "BenchResults", "write_results", "render_table", "make_console",
           "CSV_DIALOGUE_FIELDS"]

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
    peak_rss_mb: float | None = None
    cuda_peak_mb: float | None = None
    dialogue: DialogueMetrics | None = None


class BenchResults(BaseModel):
    """Everything ``results.json`` holds."""

    model_config = ConfigDict(frozen=True)

    environment: Environment
    routes: dict[str, RouteSummary]
    skipped_routes: dict[str, str] = {}
    base_dialogue: DialogueMetrics | None = None

    def metric_keys(self) -> list[str]:
        keys: list[str] = []
        for summary in self.routes.values():
            keys += [k for k in summary.metrics if k not in keys]
        return keys


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def csv_text(results: BenchResults) -> str:
    """One row per route: split metrics, cost, dialogue columns."""
    keys = results.metric_keys()
    header = ["route", "untrained", "n_queries", "n_errors"]
    for key in keys:
        header += [f"{key}_giou", f"{key}_ciou", f"{key}_n"]
    header += ["seconds_per_query", "peak_rss_mb", "cuda_peak_mb", "dialogue_n"]
    header += [f"dialogue_{name}" for name in CSV_DIALOGUE_FIELDS]
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


def render_table(results: BenchResults, console: Console | None = None) -> None:
    """Print two tables with rich: segmentation (metrics and cost) and dialogue preservation."""
    console = console or make_console()
    env = results.environment
    table = Table(title=f"{env.benchmark} | preset {env.preset} | split {env.split} | {env.data}",
                  caption="gIoU / cIoU are fractions in [0, 1]")
    table.add_column("route", style="bold", no_wrap=True)
    keys = results.metric_keys()
    for key in keys:
        table.add_column(f"{key}\ngIoU", justify="right")
        table.add_column(f"{key}\ncIoU", justify="right")
    for title in ("s/query", "peak RSS\nMB", "CUDA peak\nMB", "queries", "errors"):
        table.add_column(title, justify="right")
    for name, summary in results.routes.items():
        cells = [f"{name} [red](untrained: {', '.join(summary.untrained)})[/red]" if summary.untrained else name]
        for key in keys:
            metric = summary.metrics.get(key)
            cells += [_fmt(metric.giou if metric else None), _fmt(metric.ciou if metric else None)]
        cells += [_fmt(summary.seconds_per_query, 3), _fmt(summary.peak_rss_mb, 0), _fmt(summary.cuda_peak_mb, 0),
                  str(summary.n_queries), str(summary.n_errors)]
        table.add_row(*cells)
    console.print(table)
    provenance = results.environment.provenance
    for notice in provenance.notices if provenance else []:
        console.print(f"[yellow]note: {notice}[/yellow]")
    if results.base_dialogue is None:
        return
    dialogue = Table(title="dialogue preservation (greedy answers to held-out questions)",
                     caption="agree = vs the base MLLM's answers, ref = vs reference answers; EM and SQuAD token F1")
    dialogue.add_column("model", style="bold", no_wrap=True)
    for title in ("questions", "errors", "agree EM", "agree F1", "ref EM", "ref F1"):
        dialogue.add_column(title, justify="right")
    rows = [(name, s.dialogue) for name, s in results.routes.items() if s.dialogue is not None]
    for name, d in [("base MLLM", results.base_dialogue), *rows]:
        dialogue.add_row(name, str(d.n_items), str(d.n_errors), _fmt(d.agreement_em), _fmt(d.agreement_f1),
                         _fmt(d.reference_em), _fmt(d.reference_f1))
    console.print(dialogue)
