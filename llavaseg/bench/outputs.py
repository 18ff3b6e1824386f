"""Everything a results folder shows, written the same way for a route run and for scored predictions.

``results.json`` / ``results.csv`` (:mod:`~llavaseg.bench.report`), ``overlays.png``
(:mod:`~llavaseg.bench.overlays`), the charts (:mod:`~llavaseg.bench.charts`) and ``report.html``
(:mod:`~llavaseg.bench.page`), all rebuilt from the per-query records at the end of every run.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from llavaseg.bench.charts import write_charts
from llavaseg.bench.jsonl import write_atomic
from llavaseg.bench.overlays import OverlayRow, render_grid
from llavaseg.bench.page import write_html
from llavaseg.bench.records import BenchRecord
from llavaseg.bench.report import BenchResults, write_results
from llavaseg.errors import LlavasegError

__all__ = ["overlay_rows", "write_outputs"]


def overlay_rows(queries: list, per_route: dict[str, list[BenchRecord]], count: int) -> list[OverlayRow]:
    """The first ``count`` queries of the selection with every route's mask (by query id, so routes that
    scored different selections still line up; a route without the query shows "missing")."""
    by_id = {name: {r.query_id: r for r in records} for name, records in per_route.items()}
    rows = []
    for query in queries[:count]:
        try:
            image, gt = query.load_image(), query.load_mask()
        except LlavasegError:
            continue
        cells = {}
        for name, records in by_id.items():
            record = records.get(query.query_id)
            if record is None:
                continue
            label = f"IoU {record.iou:.2f}" if record.error is None else "error"
            cells[name] = (record.predicted_mask(), label)
        rows.append(OverlayRow(image=image, gt=gt, text=query.text, cells=cells))
    return rows


def write_outputs(out_dir: Path, results: BenchResults, per_route: dict[str, list[BenchRecord]], queries: list,
                  overlay_count: int) -> None:
    """Write ``results.json``, ``results.csv``, ``overlays.png``, the three charts and ``report.html``."""
    out = Path(out_dir)
    write_results(out, results)
    buffer = io.BytesIO()
    render_grid(overlay_rows(queries, per_route, overlay_count), list(per_route)).save(buffer, format="PNG")
    overlays = buffer.getvalue()
    write_atomic(out / "overlays.png", overlays)
    ious = {name: np.asarray([r.iou for r in records], dtype=np.float64) for name, records in per_route.items()}
    charts = write_charts(out, results, ious)
    write_html(out, results, charts, overlays)
