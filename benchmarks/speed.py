"""Speed and memory benchmark of the frozen pipeline; writes benchmarks/results/speed-<preset>.json.

    python benchmarks/speed.py [--preset tiny-world] [--quick]      (same as: llavaseg-bench speed --out FILE)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llavaseg.atomic import atomic_write_text
from llavaseg.bench.speed import format_report, run_speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--quick", action="store_true", help="skip the SAM ViT-B measurements")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    report = run_speed(args.preset, full=not args.quick, repeats=args.repeats)
    print(format_report(report))
    out = Path(__file__).parent / "results" / f"speed-{args.preset}.json"
    atomic_write_text(out, report.model_dump_json(indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
