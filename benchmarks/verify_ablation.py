"""Each helper of ``llavaseg-verify`` measured on its own, on tiny-world val (all texts), one run.

    python benchmarks/verify_ablation.py [--split val|train|select..select4] [--limit N] [--threads 1] [--out FILE]

Variants (same frozen MLLM, text tower, adapters and SAM; nothing trained here):

* ``llavaseg``: the plain route (greedy stages);
* ``constrained``: greedy stage 2 constrained to the tiny world's attribute schema;
* ``vote``: self-consistency, the per-key majority of greedy + 6 sampled stage-2 answers;
* ``verify``: greedy + 4 beam-search candidates, each checked by the frozen MLLM on a highlighted view;
* ``verify+vote``, ``verify+constrained``: the check with one of the other two helpers;
* ``all``: constrained sampling and beams, voted order, verified.

Reports gIoU / cIoU (the shared evaluator), seconds per query and MLLM calls (conversation turns sent to the
model) per query, as a table and ``benchmarks/results/verify_ablation.json``. The default benchmark runs only
``llavaseg-verify`` (= ``all``); this script is where each piece earns its place.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from llavaseg.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results" / "verify_ablation.json"

VARIANTS: dict[str, dict[str, object] | None] = {
    "llavaseg": None,
    "constrained": {"verify": False, "vote": False, "samples": 0, "beams": 0, "constrained": True},
    "vote": {"verify": False, "vote": True, "samples": 6, "beams": 0, "constrained": False},
    "verify": {"verify": True, "vote": False, "samples": 0, "beams": 4, "constrained": False},
    "verify+vote": {"verify": True, "vote": True, "samples": 6, "beams": 4, "constrained": False},
    "verify+constrained": {"verify": True, "vote": False, "samples": 0, "beams": 4, "constrained": True},
    "all": {"verify": True, "vote": True, "samples": 6, "beams": 4, "constrained": True},
}


def run_variant(parts, prompts, preset, name: str, options, queries, batch_size: int) -> dict[str, float]:
    from llavaseg.evaluate import MetricAccumulator
    from llavaseg.routes.registry import RouteContext, build_route

    context = RouteContext(components=parts, prompts=prompts, preset=preset, with_answer=False,
                           options={**(options or {}), "name": name})
    route = build_route("llavaseg" if options is None else "llavaseg-verify", context)
    accumulator, seconds, calls = MetricAccumulator(), 0.0, []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start: start + batch_size]
        images = [query.load_image() for query in chunk]
        before, began = parts.mllm.row_calls, time.perf_counter()
        results = route(images, [query.text for query in chunk])
        seconds += time.perf_counter() - began
        calls.append((parts.mllm.row_calls - before) / len(chunk))
        for query, result in zip(chunk, results):
            accumulator.add_masks(result.mask, query.load_mask(), query_id=query.query_id,
                                  is_sentence=query.is_sentence)
    overall = accumulator.result()["overall"]
    return {"giou": overall.giou, "ciou": overall.ciou, "seconds_per_query": seconds / len(queries),
            "mllm_calls_per_query": float(np.average(calls, weights=None))}


def main(argv: list[str] | None = None) -> int:
    from llavaseg.bench.runner import shared_components
    from llavaseg.data.registry import open_dataset
    from llavaseg.models.presets import get_preset
    from llavaseg.prompting import PromptSet
    from llavaseg.tinyworld.generate import default_tiny_world_source

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--split", default="val",
                        help="tiny-world split (select: train-distribution scenes no recipe trained on, where "
                             "settings that involve the shipped models are chosen)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = get_preset("tiny-world")
    parts = shared_components("tiny-world", "cpu")
    queries = list(open_dataset(default_tiny_world_source(args.split)).queries())[: args.limit]
    report = {"split": f"tiny-world {args.split}", "n_queries": len(queries), "variants": {}}
    for name, options in VARIANTS.items():
        row = run_variant(parts, PromptSet.load(), preset, name, options, queries, args.batch_size)
        report["variants"][name] = row
        print(f"{name:12s} gIoU {row['giou']:.3f} cIoU {row['ciou']:.3f}  {row['seconds_per_query']:.3f} s/query  "
              f"{row['mllm_calls_per_query']:.1f} MLLM calls/query", file=sys.stderr)
    base = report["variants"]["llavaseg"]["seconds_per_query"]
    for row in report["variants"].values():
        row["time_ratio_to_llavaseg"] = row["seconds_per_query"] / base
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
