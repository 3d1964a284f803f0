"""Where the GPU waits: a torch.profiler trace of engine steps, read step by step.

    python3 benchmarks/trace_gaps.py TRACE.pt.trace.json.gz [--min-gap-us 10]

Reads a Chrome trace (``.json`` or ``.json.gz``) as vLLM's torch profiler writes it in the engine
core (``throughput.py --profile-steps N --profile-trace DIR`` keeps it). Steps are vLLM's
``execute_context_*`` GPU annotations; GPU work is every kernel, memcpy and memset. Per step
(start of one annotation to the start of the next) it reports the period, the GPU busy time (the
union of GPU work), and the idle rest, as medians over the steps. Idle stretches of at least
``--min-gap-us`` are then attributed to the host work running meanwhile: for each CPU user
annotation (vLLM's ``gpu_model_runner: ...`` and ``schedule: ...`` scopes with
``VLLM_CUSTOM_SCOPES_FOR_PROFILING=1``, SepLLM's ``sepllm: ...`` scopes: the scheduler's, and
the V1 model runner's hooks; the V2 runner's hooks carry none), the idle time it
overlaps, in ms per step; ``unannotated`` is idle time under no annotation (the engine core's
``update_from_output``, output hand-off, Python between scopes). Annotations nest, so their
overlaps can add up to more than the idle time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
STEP_PREFIX = "execute_context_"


def load_events(path: Path) -> list[dict]:
    """Complete ('X') events of a Chrome trace file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of [start, end) intervals, sorted and disjoint."""
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def summarize(events: list[dict], min_gap_us: float = 10.0) -> dict:
    """The per-step GPU busy / idle figures and the idle time's attribution (module docstring).
    Times in the trace are µs; results in ms."""
    gpu = merge([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
                 if e.get("cat") in GPU_CATS])
    steps = sorted(float(e["ts"]) for e in events if e.get("cat") == "gpu_user_annotation"
                   and str(e.get("name", "")).startswith(STEP_PREFIX))
    if len(steps) < 2 or not gpu:
        return {"steps": max(len(steps) - 1, 0), "error": "fewer than two annotated steps"
                if len(steps) < 2 else "no GPU work in the trace"}
    periods, busy = [], []
    for s0, s1 in zip(steps, steps[1:]):
        periods.append(s1 - s0)
        busy.append(sum(overlap(s0, s1, g0, g1) for g0, g1 in gpu))
    idle = [p - b for p, b in zip(periods, busy)]
    # Idle stretches inside the stepped window.
    lo, hi = steps[0], steps[-1]
    gaps = [(e0, s1) for (_, e0), (s1, _) in zip(gpu, gpu[1:])
            if s1 - e0 >= min_gap_us and e0 >= lo and s1 <= hi]
    n = len(periods)
    annotations = [(str(e["name"]), float(e["ts"]), float(e["ts"]) + float(e["dur"]))
                   for e in events if e.get("cat") == "user_annotation"
                   and not str(e.get("name", "")).startswith(STEP_PREFIX)]
    by_name: dict[str, float] = {}
    covered = []
    for name, a0, a1 in annotations:
        ov = sum(overlap(a0, a1, g0, g1) for g0, g1 in gaps if g0 < a1 and g1 > a0)
        if ov:
            by_name[name] = by_name.get(name, 0.0) + ov
            covered.append((a0, a1))
    covered_m = merge(covered)
    gap_total = sum(g1 - g0 for g0, g1 in gaps)
    under_any = sum(overlap(g0, g1, c0, c1) for g0, g1 in gaps for c0, c1 in covered_m
                    if c0 < g1 and c1 > g0)
    attribution = {k: round(v / n / 1e3, 3)
                   for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])}
    attribution["unannotated"] = round((gap_total - under_any) / n / 1e3, 3)
    biggest = sorted(gaps, key=lambda g: g[0] - g[1])[:5]
    return {
        "steps": n,
        "period_ms": round(statistics.median(periods) / 1e3, 3),
        "gpu_busy_ms": round(statistics.median(busy) / 1e3, 3),
        "gpu_idle_ms": round(statistics.median(idle) / 1e3, 3),
        "gpu_idle_share": round(sum(idle) / sum(periods), 4),
        "min_gap_us": min_gap_us,
        "gaps_per_step": round(len(gaps) / n, 2),
        "gap_ms_per_step": round(gap_total / n / 1e3, 3),
        "idle_by_host_annotation_ms_per_step": attribution,
        "largest_gaps_us": [round(g1 - g0, 1) for g0, g1 in biggest],
    }


def find_trace(directory: Path) -> Path | None:
    """The newest Chrome trace under ``directory`` (vLLM's torch profiler output), if any."""
    found = sorted(directory.rglob("*.pt.trace.json*"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--min-gap-us", type=float, default=10.0)
    args = p.parse_args()
    print(json.dumps(summarize(load_events(args.trace), args.min_gap_us), indent=1))


if __name__ == "__main__":
    main()
