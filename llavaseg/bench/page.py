"""``report.html``: one page that says what a results folder holds, readable without a server or the folder.

It shows the run's settings (data, split, protocol, interval method, seed, components, versions), the
metric table with intervals, the paired comparisons, what each prediction set matched (``score``), the
charts and the overlay grid. Images are embedded as ``data:`` URIs, so the page can be mailed or moved on
its own; nothing is fetched (no scripts, no fonts, no style sheets from elsewhere).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from llavaseg.bench.jsonl import write_atomic
from llavaseg.bench.report import BenchResults, Environment, PredictionSource

__all__ = ["render_html", "write_html", "REPORT_FILE"]

REPORT_FILE = "report.html"
_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1e1e1e; max-width: 1200px; }
table { border-collapse: collapse; margin: 8px 0 20px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
code, .mono { font-family: ui-monospace, monospace; font-size: 12px; }
img { max-width: 100%; border: 1px solid #ddd; margin: 4px 0 16px; }
.note { color: #8a5a00; }
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ci(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f"<br><span class=mono>[{ci[0]:.3f}, {ci[1]:.3f}]</span>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """``header`` cells are escaped here; row cells must already be HTML."""
    head = "".join(f"<th>{_e(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _settings(env: Environment) -> str:
    rows = [["benchmark", env.benchmark], ["data", env.data], ["split", env.split], ["protocol", env.protocol],
            ["first text only", env.first_text_only], ["intervals", f"{env.interval_method} bootstrap over images, "
                                                                    f"{env.bootstrap} resamples (0 = none)"],
            ["paired p-values", f"sign-flip permutations over images, {env.permutations}"], ["seed", env.seed],
            ["preset", env.preset], ["device", env.device], ["limit", env.limit], ["when", env.timestamp],
            *[[f"extra: {k}", v] for k, v in env.extra.items()],
            *[[f"version: {k}", v] for k, v in env.versions.items()]]
    if env.provenance is not None:
        rows += [[f"component: {name}", ", ".join(f"{k}={v}" for k, v in part.items())]
                 for name, part in env.provenance.components.items()]
    return _table(["setting", "value"], [[_e(k), f"<span class=mono>{_e(v)}</span>"] for k, v in rows])


def _metrics(results: BenchResults) -> str:
    keys = results.metric_keys()
    no_target = any(m.n_no_target for r in results.routes.values() for m in r.metrics.values())
    header = ["route"] + [f"{k} {m}" for k in keys for m in ("gIoU", "cIoU", "n")]
    header += [f"{k} {m}" for k in keys for m in ("N-acc", "T-acc")] if no_target else []
    header += ["s/query", "queries", "errors"]
    rows = []
    for name, summary in results.routes.items():
        label = _e(name) + (f" <span class=note>(untrained: {_e(', '.join(summary.untrained))})</span>"
                            if summary.untrained else "")
        row = [label]
        for key in keys:
            m = summary.metrics.get(key)
            row += ([_num(m.giou) + _ci(m.giou_ci), _num(m.ciou) + _ci(m.ciou_ci), str(m.n_queries)] if m
                    else ["-", "-", "0"])
        if no_target:
            row += [_num(getattr(summary.metrics.get(k), f, None)) for k in keys for f in ("n_acc", "t_acc")]
        row += [_num(summary.seconds_per_query), str(summary.n_queries), str(summary.n_errors)]
        rows.append(row)
    return _table(header, rows)


def _comparisons(results: BenchResults) -> str:
    if not results.comparisons:
        return "<p>No paired comparison (a single route or prediction set).</p>"
    rows = [[_e(f"{c.a} - {c.b}"), str(c.n_queries), str(c.n_images), f"{c.giou_diff:+.3f}{_ci(c.giou_diff_ci)}",
             f"{c.giou_p:.4f}", f"{c.ciou_diff:+.3f}{_ci(c.ciou_diff_ci)}", f"{c.ciou_p:.4f}",
             "yes" if c.exact else "no"] for c in results.comparisons]
    return _table(["A - B", "queries", "images", "gIoU diff [95%]", "p", "cIoU diff [95%]", "p", "exact"], rows)


def _predictions(sources: dict[str, PredictionSource], shown: int = 50) -> str:
    parts = []
    for name, s in sources.items():
        items = [f"<li>{_e(q)}: no prediction, scored as an empty mask</li>" for q in s.missing[:shown]]
        items += [f"<li>{_e(q)}: unreadable ({_e(why)}), scored as a failure</li>"
                  for q, why in list(s.unreadable.items())[:shown]]
        items += [f"<li>{_e(u.item)}: {_e(u.reason)}</li>" for u in s.unmatched[:shown]]
        more = len(s.missing) + len(s.unreadable) + len(s.unmatched) - len(items)
        parts.append(f"<h3>{_e(name)}</h3><p><code>{_e(s.path)}</code> ({_e(s.format)}, {_e(s.naming)} naming): "
                     f"{s.n_matched} of {s.n_items} matched, {len(s.missing)} missing, {len(s.unreadable)} "
                     f"unreadable, {len(s.unmatched)} not scored.</p><ul>{''.join(items)}"
                     + (f"<li>... and {more} more (results.json lists them all)</li>" if more > 0 else "")
                     + "</ul>")
    return "".join(parts)


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def render_html(results: BenchResults, charts: dict[str, bytes], overlays: bytes | None) -> str:
    """The page as a string (``charts``: PNG bytes by file name, ``overlays``: the grid's PNG bytes)."""
    env = results.environment
    notes = "".join(f"<p class=note>note: {_e(n)}</p>" for n in (env.provenance.notices if env.provenance else []))
    skipped = "".join(f"<li>{_e(k)}: {_e(v)}</li>" for k, v in results.skipped_routes.items())
    body = [f"<h1>{_e(env.benchmark)}: {_e(env.split)}</h1>", notes,
            "<h2>Metrics</h2><p>Fractions in [0, 1]; the 95% interval is under each value.</p>", _metrics(results),
            "<h2>Paired comparisons</h2>", _comparisons(results)]
    if results.predictions:
        body += ["<h2>Prediction sets</h2>", _predictions(results.predictions)]
    if skipped:
        body.append(f"<h2>Skipped routes</h2><ul>{skipped}</ul>")
    body += ["<h2>Charts</h2>", *(_img(charts.get(name), name) for name in charts),
             "<h2>Overlays</h2>", _img(overlays, "overlays.png"), "<h2>Settings</h2>", _settings(env)]
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{_e(env.benchmark)} {_e(env.split)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def write_html(out_dir: Path, results: BenchResults, charts: dict[str, bytes], overlays: bytes | None) -> Path:
    path = Path(out_dir) / REPORT_FILE
    write_atomic(path, render_html(results, charts, overlays))
    return path
