"""Where the GPU waits: a torch.profiler trace of engine steps, read step by step.

    python3 benchmarks/trace_gaps.py TRACE.pt.trace.json.gz [--min-gap-us 10]

Reads a Chrome trace (``.json`` or ``.json.gz``) as vLLM's torch profiler writes it in the engine
core (``throughput.py --profile-steps N --profile-trace DIR`` keeps it). Steps start where the
GPU starts each one: vLLM's ``execute_context_*`` GPU annotation where the trace has it, else
the GPU side of the model runner's first scope (``gpu_model_runner: preprocess``, vLLM 0.26 with
``VLLM_CUSTOM_SCOPES_FOR_PROFILING=1``), else the host's ``execute_context_*`` annotation; GPU
work is every kernel, memcpy and memset. Per step
(start of one annotation to the start of the next) it reports the period, the GPU busy time (the
union of GPU work), and the idle rest, as medians over the steps. Idle stretches of at least
``--min-gap-us`` are then attributed to the host work running meanwhile: for each CPU user
annotation (vLLM's ``gpu_model_runner: ...`` and ``schedule: ...`` scopes with
``VLLM_CUSTOM_SCOPES_FOR_PROFILING=1``, SepLLM's ``sepllm: ...`` scopes: the scheduler's, and
the V1 model runner's hooks; the V2 runner's hooks carry none), the idle time it
overlaps, in ms per step; ``unannotated`` is idle time under no annotation (the engine core's
``update_from_output``, output hand-off, Python between scopes). Annotations nest, so their
overlaps can add up to more than the idle time. ``steps_ms`` lists each step's period and idle
time (a run can change regime inside the window: host-bound steps next to GPU-bound ones).

:func:`step_log_summary` reads the other record, which needs no profiler: the schedulers' step
log over a whole run (``VLLM_SEPLLM_KV_TRACE``, vllm_sepllm/instrument.py), and says where the
run's wall time went: step periods by kind (decode-only, with prompt tokens), the time lost to
steps slower than the decode median, and the garbage collector's pauses.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
STEP_PREFIX = "execute_context_"
GPU_STEP_SCOPE = "gpu_model_runner: preprocess"


def step_starts(events: list[dict]) -> list[float]:
    """Start times of the steps (module docstring: the first marker kind the trace has)."""
    for cat, match in (("gpu_user_annotation", lambda n: n.startswith(STEP_PREFIX)),
                       ("gpu_user_annotation", lambda n: n == GPU_STEP_SCOPE),
                       ("user_annotation", lambda n: n.startswith(STEP_PREFIX))):
        starts = sorted(float(e["ts"]) for e in events
                        if e.get("cat") == cat and match(str(e.get("name", ""))))
        if len(starts) >= 2:
            return starts
    return []


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
    steps = step_starts(events)
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
        "steps_ms": [[round(p / 1e3, 2), round(i / 1e3, 2)] for p, i in zip(periods, idle)],
        "host_phase_ms_per_step": host_phases(events),
    }


def host_phases(events: list[dict]) -> dict[str, float]:
    """Median host time per step of each CPU annotation (summed within a step: vLLM's
    ``schedule: allocate_slots`` runs once per request), steps binned by the host's
    ``execute_context_*`` annotations (empty without them); the step annotation itself is
    ``execute_context``."""
    import bisect

    starts = sorted(float(e["ts"]) for e in events if e.get("cat") == "user_annotation"
                    and str(e.get("name", "")).startswith(STEP_PREFIX))
    if len(starts) < 2:
        return {}
    per: dict[str, list[float]] = {}
    n = len(starts) - 1
    for e in events:
        if e.get("cat") != "user_annotation":
            continue
        t = float(e["ts"])
        i = bisect.bisect_right(starts, t) - 1
        if not 0 <= i < n:
            continue
        name = str(e.get("name", ""))
        name = "execute_context" if name.startswith(STEP_PREFIX) else name
        per.setdefault(name, [0.0] * n)[i] += float(e.get("dur", 0.0))
    return {k: round(statistics.median(v) / 1e3, 3)
            for k, v in sorted(per.items(), key=lambda kv: -statistics.median(kv[1]))}


def _pct(x, q: float) -> float:
    import numpy as np

    return round(float(np.percentile(x, q)) * 1e3, 2)


def step_log_summary(steps: list, gc_log: dict | None, t0: float, t1: float,
                     slow_factor: float = 1.25) -> dict:
    """Where the wall time of ``[t0, t1]`` went, from the scheduler's step log (rows of
    ``[wall time, scheduled tokens, scheduled rows]``, instrument.py): a step's period is the
    time to the next step's schedule (the last step's, to ``t1``). Decode-only steps (one token
    per row) get percentiles and ``slow_excess_s``, the time they spent beyond ``slow_factor``
    times their median; steps with prompt tokens and empty steps, count and time; the
    collector's pauses in the window (over 1 ms) and its totals over the engine's life."""
    import numpy as np

    rows = [s for s in steps if t0 <= s[0] <= t1]
    if not rows:
        return {"error": "no steps in the timed window"}
    a = np.asarray(rows, dtype=np.float64)
    t = a[:, 0]
    period = np.diff(np.append(t, t1))
    tokens, nrows = a[:, 1], a[:, 2]
    decode = (tokens == nrows) & (tokens > 0)
    mixed = tokens > nrows
    empty = tokens == 0
    out = {"wall_s": round(t1 - t0, 2), "before_first_step_s": round(float(t[0] - t0), 3),
           "steps": int(len(t))}
    if decode.any():
        d = period[decode]
        med = float(np.median(d))
        out["decode"] = {
            "steps": int(decode.sum()), "time_s": round(float(d.sum()), 2),
            "p50_ms": _pct(d, 50), "p90_ms": _pct(d, 90), "p99_ms": _pct(d, 99),
            "max_ms": round(float(d.max()) * 1e3, 1),
            "mean_rows": round(float(nrows[decode].mean()), 1),
            "slow_steps": int((d > slow_factor * med).sum()),
            "slow_excess_s": round(float(np.clip(d - slow_factor * med, 0, None).sum()), 2),
            # the median of each tenth of the decode steps, in order (drift over the run)
            "p50_ms_by_tenth": [round(float(np.median(x)) * 1e3, 2)
                                for x in np.array_split(d, 10) if x.size]}
    if mixed.any():
        m = period[mixed]
        out["with_prompt_tokens"] = {"steps": int(mixed.sum()), "time_s": round(float(m.sum()), 2),
                                     "p50_ms": _pct(m, 50),
                                     "tokens": int(tokens[mixed].sum())}
    if empty.any():
        out["empty"] = {"steps": int(empty.sum()),
                        "time_s": round(float(period[empty].sum()), 2)}
    if gc_log:
        pauses = [p for p in gc_log.get("pauses", []) if t0 <= p[0] <= t1 + 1.0]
        out["gc"] = {"pauses_over_1ms": len(pauses),
                     "pause_s": round(sum(p[2] for p in pauses), 3),
                     "max_pause_ms": round(max((p[2] for p in pauses), default=0.0) * 1e3, 1),
                     "by_generation": {str(g): sum(1 for p in pauses if p[1] == g)
                                       for g in (0, 1, 2)},
                     "engine_totals": gc_log.get("totals")}
    return out


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
