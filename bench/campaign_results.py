"""What a campaign's results cost the aggregator: the class comparison and each export for a fleet's levels.

    .venv/bin/python bench/campaign_results.py [--devices 1000] [--levels 12] [--repeat 7]

Builds ``devices`` × ``levels`` decoded ``campaign_level`` records over three device classes, each carrying a results
document with 20-sample latency distributions in the shape of a real level's document (``--template``: by default
one written by ``lens-agent bench --suite`` on a tiny model, ~6 KB; tests/campaign_docs.py), then times, best of
``repeat`` rounds in which the steps take turns: reading and checking every record (``collect``), the class rows and
the per-device results (from the records, as the API computes them), and each export (json, csv, parquet, arrow)
from the records. Prints the CPU time of this process (others' load on a shared machine does not count), the time
per record and the size of each answer, and each as a ratio to ``class_rows``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator import campaign_results as cr
from tests.campaign_docs import REAL_DOCUMENT, fleet


def interleaved(repeat: int, cases: list[tuple[str, Callable[[], Any]]]) -> dict[str, tuple[float, Any]]:
    """Best CPU time of each case over ``repeat`` rounds, the cases taking turns within each round (so that a load
    that comes and goes on a shared machine falls on all of them alike)."""
    best: dict[str, tuple[float, Any]] = {}
    for _ in range(repeat):
        for name, work in cases:
            gc.collect()
            started = time.process_time()  # this process's CPU time: other processes' load does not count
            result = work()
            seconds = time.process_time() - started
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, result)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--levels", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--template",
        type=Path,
        default=REAL_DOCUMENT,
        help="a real results document whose shape every record's document takes (default: %(default)s)",
    )
    parser.add_argument("--synthetic", action="store_true", help="the bare synthetic documents (~1.9 KB) instead")
    args = parser.parse_args()
    template = None if args.synthetic else json.loads(args.template.read_text())
    records, classes = fleet(args.devices, args.levels, template=template)
    n = len(records)
    doc_bytes = sum(len(json.dumps(r["ext"]["results"])) for r in records) / n
    print(f"{args.devices} devices × {args.levels} levels = {n:,} records, {doc_bytes:,.0f} B per results document")
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("collect (read + check every record)", lambda: cr.collect(records, classes)),
        ("class_rows", lambda: cr.class_rows(records, classes)),
        ("device_results", lambda: cr.device_results(records, classes)),
        ("results (both, one pass)", lambda: cr.results(records, classes)),
    ]
    for fmt in cr.FORMATS:
        cases.append((f"export {fmt}", lambda fmt=fmt: cr.export(records, classes, fmt)[0]))
    timed = interleaved(args.repeat, cases)
    rows = [
        (name, seconds, len(result) if isinstance(result, bytes) else None) for name, (seconds, result) in timed.items()
    ]
    base = next(s for name, s, _ in rows if name == "class_rows")
    print(f"{'step':<38}{'CPU ms':>10}{'µs/record':>11}{'bytes':>14}{'÷ class_rows':>14}")
    for name, seconds, size in rows:
        shown = f"{size:,}" if size is not None else "–"
        print(f"{name:<38}{seconds * 1e3:>10.1f}{seconds * 1e6 / n:>11.1f}{shown:>14}{seconds / base:>14.2f}")


if __name__ == "__main__":
    main()
