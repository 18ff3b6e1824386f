"""The pictures of a results folder, drawn with pillow (no plotting dependency): written next to ``overlays.png``.

* ``iou_histogram.png`` - per route, how the per-query IoUs are distributed (ten bins of 0.1; the last bin
  holds IoU 1.0). Two routes with the same gIoU can differ completely: one mediocre everywhere, the other
  right or wrong;
* ``metrics_by_split.png`` - gIoU per metric group other than ``overall`` (ReasonSeg's short / long, or the
  RefCOCO splits), one bar per route, with the 95% interval as a whisker;
* ``metrics_by_route.png`` - overall gIoU and cIoU per route, with their intervals.

Pillow rather than matplotlib: matplotlib is not a dependency of the library, and three bar charts do not
justify adding one. Every chart has a fixed layout, so its size depends only on how many bars it has.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from llavaseg.bench.jsonl import write_atomic
from llavaseg.bench.overlays import ROUTE_COLORS
from llavaseg.bench.report import BenchResults

__all__ = ["Bar", "bar_chart", "iou_histogram", "write_charts", "CHART_FILES"]

CHART_FILES = ("iou_histogram.png", "metrics_by_split.png", "metrics_by_route.png")
_BACKGROUND, _INK, _GRID = (255, 255, 255), (30, 30, 30), (225, 225, 225)
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 12, 28, 40
_METRIC_COLORS = [(40, 140, 255), (255, 160, 0)]


@dataclass(frozen=True)
class Bar:
    """One bar: its height in [0, 1] (``None`` draws nothing) and an optional interval whisker."""

    value: float | None
    interval: tuple[float, float] | None = None


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _axes(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, ticks: int = 5) -> None:
    """Frame, horizontal grid lines at 0, 0.2, ..., 1 and the title above the plot area ``box``."""
    left, top, right, bottom = box
    for k in range(ticks + 1):
        y = bottom - (bottom - top) * k / ticks
        draw.line([(left, y), (right, y)], fill=_GRID)
        draw.text((left - 30, y - 6), f"{k / ticks:.1f}", fill=_INK, font=_font())
    draw.rectangle(box, outline=_INK)
    draw.text((left, 6), title, fill=_INK, font=_font())


def _legend_width(labels: list[str]) -> int:
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return sum(24 + int(measure.textlength(label, font=_font())) for label in labels)


def _legend(draw: ImageDraw.ImageDraw, labels: list[str], colors: list[tuple[int, int, int]], x: int, y: int) -> None:
    for label, color in zip(labels, colors):
        draw.rectangle([x, y + 2, x + 9, y + 11], fill=color)
        draw.text((x + 13, y), label, fill=_INK, font=_font())
        x += 24 + int(draw.textlength(label, font=_font()))


def bar_chart(groups: list[str], series: list[str], bars: list[list[Bar]], title: str,
              colors: list[tuple[int, int, int]] | None = None) -> Image.Image:
    """Grouped bars on a 0..1 axis: ``bars[g][s]`` is series ``s`` in group ``g``; whiskers show intervals."""
    colors = colors or [ROUTE_COLORS[i % len(ROUTE_COLORS)] for i in range(len(series))]
    slot = max(14, 120 // max(1, len(series)))
    group_width = slot * len(series) + 24
    width = max(320, _LEFT + _RIGHT + group_width * max(1, len(groups)), _LEFT + _RIGHT + _legend_width(series))
    height = 260
    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    box = (_LEFT, _TOP, width - _RIGHT, height - _BOTTOM)
    _axes(draw, box, title)
    scale = box[3] - box[1]
    for g, group in enumerate(groups):
        x0 = _LEFT + 12 + g * group_width
        for s_index, bar in enumerate(bars[g]):
            if bar.value is None:
                continue
            x = x0 + s_index * slot
            y = box[3] - scale * min(max(bar.value, 0.0), 1.0)
            draw.rectangle([x, y, x + slot - 3, box[3]], fill=colors[s_index])
            if bar.interval is not None:
                low, high = (box[3] - scale * min(max(v, 0.0), 1.0) for v in bar.interval)
                middle = x + (slot - 3) / 2
                draw.line([(middle, low), (middle, high)], fill=_INK, width=1)
                draw.line([(middle - 3, low), (middle + 3, low)], fill=_INK)
                draw.line([(middle - 3, high), (middle + 3, high)], fill=_INK)
        draw.text((x0, box[3] + 4), group[: max(4, group_width // 7)], fill=_INK, font=_font())
    _legend(draw, series, colors, _LEFT, height - 18)
    return image


def iou_histogram(per_route: dict[str, np.ndarray], bins: int = 10) -> Image.Image:
    """One panel per route: the share of queries per IoU bin (``[0, 0.1) ... [0.9, 1.0]``)."""
    panel_width, panel_height = 300, 150
    image = Image.new("RGB", (panel_width, 14 + panel_height * max(1, len(per_route))), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((4, 2), "per-query IoU (share of queries per bin of 0.1)", fill=_INK, font=_font())
    for r, (name, ious) in enumerate(per_route.items()):
        top = 14 + r * panel_height
        box = (_LEFT, top + 18, panel_width - _RIGHT, top + panel_height - 22)
        counts = np.histogram(np.clip(ious, 0.0, 1.0), bins=bins, range=(0.0, 1.0))[0]
        share = counts / max(1, len(ious))
        left, upper, right, bottom = box
        for k in range(3):
            y = bottom - (bottom - upper) * k / 2
            draw.line([(left, y), (right, y)], fill=_GRID)
            draw.text((left - 30, y - 6), f"{k / 2:.1f}", fill=_INK, font=_font())
        step = (right - left) / bins
        color = ROUTE_COLORS[r % len(ROUTE_COLORS)]
        for k, value in enumerate(share):
            x = left + k * step
            draw.rectangle([x + 1, bottom - (bottom - upper) * value, x + step - 2, bottom], fill=color)
        draw.rectangle(box, outline=_INK)
        draw.text((left, top + 4), f"{name} ({len(ious)} queries)", fill=_INK, font=_font())
        draw.text((left - 2, bottom + 3), "0", fill=_INK, font=_font())
        draw.text((right - 6, bottom + 3), "1", fill=_INK, font=_font())
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def chart_images(results: BenchResults, ious: dict[str, np.ndarray]) -> dict[str, Image.Image]:
    """The three charts of a results folder, by file name."""
    routes = list(results.routes)
    keys = [k for k in results.metric_keys() if k != "overall"] or results.metric_keys()
    by_split = [[Bar(m.giou, m.giou_ci) if (m := results.routes[r].metrics.get(k)) else Bar(None) for r in routes]
                for k in keys]
    overall = results.metric_keys()[0] if results.metric_keys() else "overall"
    by_route = []
    for route in routes:
        metric = results.routes[route].metrics.get(overall)
        by_route.append([Bar(metric.giou, metric.giou_ci), Bar(metric.ciou, metric.ciou_ci)] if metric
                        else [Bar(None), Bar(None)])
    return {
        "iou_histogram.png": iou_histogram(ious),
        "metrics_by_split.png": bar_chart(keys, routes, by_split, "gIoU per split (whiskers: 95% interval)"),
        "metrics_by_route.png": bar_chart(routes, ["gIoU", "cIoU"], by_route,
                                          f"{overall} gIoU and cIoU per route (whiskers: 95% interval)",
                                          colors=_METRIC_COLORS),
    }


def write_charts(out_dir: Path, results: BenchResults, ious: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Write the charts atomically into ``out_dir``; return their PNG bytes by file name (for the HTML page)."""
    written = {}
    for name, image in chart_images(results, ious).items():
        written[name] = _png(image)
        write_atomic(Path(out_dir) / name, written[name])
    return written
