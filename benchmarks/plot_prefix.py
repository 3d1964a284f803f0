"""Prefix-cached serving, FLASH_ATTN vs SEPLLM (benchmarks/prefix_serve.sh): table and plot
from `vllm bench serve`'s result JSONs.

    python benchmarks/plot_prefix.py [--dir benchmarks/results] [--name h200_prefix] \\
        [--points light heavy] [--backends FLASH_ATTN SEPLLM] [--no-plot]

Reads DIR/NAME_<point>_<backend>.json and DIR/NAME_<point>_meta.json (the server's /metrics
counters, saved by prefix_serve.sh). Prints per point a markdown table: TTFT p50/p99, TPOT
p50/p99, E2E latency p50 (ms), completed requests, requests/s, goodput/s (the SLOs given to bench
serve: TTFT <= 2 s and TPOT <= 50 ms), output tok/s, prefix-cache hit rate, preemptions, and a
row with the ratio of each later backend to the first. Writes DIR/NAME.png (per point: TTFT, TPOT and
goodput bars per backend) where matplotlib imports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import NO_PLOT, pyplot  # noqa: E402

#: (key in vLLM's result JSON, column header)
COLUMNS = [("p50_ttft_ms", "TTFT p50 ms"), ("p99_ttft_ms", "TTFT p99 ms"),
           ("p50_tpot_ms", "TPOT p50 ms"), ("p99_tpot_ms", "TPOT p99 ms"),
           ("p50_e2el_ms", "E2E p50 ms"), ("completed", "done"),
           ("request_throughput", "req/s"), ("request_goodput", "goodput req/s"),
           ("output_throughput", "out tok/s"),
           ("prefix_hit_rate", "prefix hits"), ("preemptions", "preempted")]


def load(directory: Path, name: str, points: list[str], backends: list[str]) -> dict:
    """{point: {backend: record}} for the JSONs that exist; each record gets ``prefix_hit_rate``
    (prefix-cache hits over queried tokens, from the server's counters in the meta JSON)."""
    runs: dict[str, dict[str, dict]] = {}
    for point in points:
        meta_path = directory / f"{name}_{point}_meta.json"
        servers = json.loads(meta_path.read_text()).get("servers", {}) if meta_path.exists() else {}
        for backend in backends:
            path = directory / f"{name}_{point}_{backend}.json"
            if path.exists():
                rec = json.loads(path.read_text())
                counters = servers.get(backend, {}).get("metrics", {})
                queries = counters.get("prefix_cache_queries_total")
                rec["prefix_hit_rate"] = (counters.get("prefix_cache_hits_total", 0) / queries
                                          if queries else None)
                preempted = counters.get("num_preemptions_total")
                rec["preemptions"] = None if preempted is None else int(preempted)
                runs.setdefault(point, {})[backend] = rec
    return runs


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float) and value < 1:
        return f"{value:.3f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def table(point: str, recs: dict[str, dict]) -> str:
    any_rec = next(iter(recs.values()))
    lines = [f"### {point}: {any_rec.get('num_prompts')} requests at {any_rec.get('request_rate')}/s, "
             f"{any_rec.get('total_input_tokens')} prompt tokens, "
             f"{any_rec.get('total_output_tokens')} output tokens (first backend)", "",
             "| backend | " + " | ".join(h for _, h in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for backend, rec in recs.items():
        lines.append(f"| {backend} | " + " | ".join(fmt(rec.get(k)) for k, _ in COLUMNS) + " |")
    base_name, base = next(iter(recs.items()))
    for backend, rec in list(recs.items())[1:]:
        ratios = [(f"{rec[k] / base[k]:.2f}x" if rec.get(k) is not None and base.get(k) else "-")
                  for k, _ in COLUMNS]
        lines.append(f"| {backend} / {base_name} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def plot(runs: dict, path: Path, title: str) -> bool:
    """Per point: TTFT p50/p99, TPOT p50/p99 and goodput bars per backend; False without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    panels = [("TTFT (ms)", ["p50_ttft_ms", "p99_ttft_ms"], ["p50", "p99"]),
              ("TPOT (ms)", ["p50_tpot_ms", "p99_tpot_ms"], ["p50", "p99"]),
              ("requests/s", ["request_throughput", "request_goodput"], ["all", "goodput"])]
    fig, axes = plt.subplots(len(runs), 3, figsize=(13, 3.6 * len(runs)), squeeze=False)
    for row, (point, recs) in zip(axes, runs.items()):
        width = 0.8 / len(recs)
        for ax, (ylabel, keys, labels) in zip(row, panels):
            for i, (backend, rec) in enumerate(recs.items()):
                xs = [x + (i - (len(recs) - 1) / 2) * width for x in range(len(keys))]
                bars = ax.bar(xs, [rec.get(k) or 0 for k in keys], width, label=backend)
                ax.bar_label(bars, fmt="%.4g", fontsize=7)
            ax.set_xticks(range(len(keys)), labels)
            ax.set(ylabel=ylabel, title=f"{point}: {ylabel}")
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="h200_prefix")
    p.add_argument("--points", nargs="+", default=["light", "heavy"])
    p.add_argument("--backends", nargs="+", default=["FLASH_ATTN", "SEPLLM"])
    p.add_argument("--out", type=Path, default=None, help="PNG (default DIR/NAME.png)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args()
    runs = load(args.dir, args.name, args.points, args.backends)
    if not runs:
        raise SystemExit(f"no {args.name}_<point>_<backend>.json in {args.dir}")
    for point, recs in runs.items():
        print(table(point, recs) + "\n")
    if args.no_plot:
        return
    meta = args.dir / f"{args.name}_{next(iter(runs))}_meta.json"
    info = json.loads(meta.read_text()) if meta.exists() else {}
    title = f"{args.name}: {info.get('gpu', '?')}, commit {info.get('commit', '?')}"
    out = args.out or args.dir / f"{args.name}.png"
    print(f"plot: {out}" if plot(runs, out, title) else NO_PLOT)


if __name__ == "__main__":
    main()
