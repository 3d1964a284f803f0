"""Soak test: one engine, 1,000+ mixed SepLLM requests under KV pressure, checked end to end.

    # H200 (one device call: ``bash benchmarks/h200_run.sh soak``): Llama-3-8B shape, dummy weights
    python3 benchmarks/soak.py --tokenizer-dir .gpu/tok --deadline 470 --out /tmp/out/h200_soak.json
    # CPU smoke test (SmolLM2-135M, tiny sizes; all but async scheduling and CUDA graphs), ~6 min
    .venv/bin/python benchmarks/soak.py --model "$(.venv/bin/python -m vllm_sepllm.testing.model)" \\
        --requests 48 --min-requests 40 --long 3 --max-output 384 --prompt-range 8 200 \\
        --window-range 16 160 --sep-cap-range 2 16 --mode-weights 0.3,0.2,0.4,0.1 \\
        --medium-frac 0.6 --arrival-s 8 --burst-s 1 --kv-tokens 768 --block-size 32 \\
        --max-num-seqs 24 --max-num-batched-tokens 256 --deadline 1300 --stall-s 300 \\
        --min-preemptions 2 --out /tmp/cpu_soak.json
    # no engine: the plan through the real scheduler, to size the pool and estimate the time
    .venv/bin/python benchmarks/soak.py --simulate --tokenizer-dir .gpu/tok

What runs. vLLM's ``AsyncLLM`` in this process (its engine core in a child process, as behind
``vllm serve``), SEPLLM backend, prefix caching on (vLLM's default), V1 model runner (SEPLLM and
the replay logits processor both need it), on CUDA ``async_scheduling=True`` and full CUDA
graphs: by default no torch.compile + ``FULL_DECODE_ONLY`` (every all-decode step replays a
full graph; an 8B engine starts in ~10-20 s on the H200, throughput.py ``--fast-start``),
``--compile`` vLLM's default compile + ``FULL_AND_PIECEWISE`` (~60-75 s start). Exact per-step
eviction (no engine ``cache_size``): every decoding request evicts and compacts every step, the
busiest path of the block manager, and ``mode: full`` stays allowed per request (with a
``cache_size`` it would not). Dummy weights of a real shape (``--model-shape``, common.SHAPES;
Llama-3-8B, the shape of every H200 figure so far): the model's speed matters only for the
time, SEPLLM's kernels run at the real head and layer counts.

The requests (all drawn from ``--seed``):

* ``--requests`` (1,200) real-text prompts (public-domain books, common.load_texts) of
  ``--prompt-range`` (16-2,048) tokens, log-uniform, each replaying the text that follows it
  (replay.py: output token ``i`` is forced to ``continuation[i]``, so separators come at the
  natural rate and the exact output of every request is known whatever the weights);
* per-request settings through ``SamplingParams.extra_args["sepllm"]`` (config.PER_REQUEST_KEYS),
  ``--mode-weights``: 45% ``sepllm`` (window log-uniform in ``--window-range`` 64-1,024,
  ``sep_cap`` in ``--sep-cap-range`` 8-64, sinks 0-8), 25% ``streamingllm``, 20% ``full``, 10%
  no override (the engine's a4 s64 w256);
* outputs: ``--long`` (8) requests of ``--max-output`` (16,384) down to ``--long-min``
  (``max-output / 2`` = 8,192) tokens, one of them in mode full, submitted first: they head
  vLLM's FCFS running list, which preempts from its tail, so their 8k-16k decode steps fit the
  run; of the others ``--medium-frac`` (30%) medium (``max/16 .. max/4``: 1,024-4,096), the
  rest short (16-1,024), log-uniform;
* ``--prefix-groups`` (12) groups of 4-7 requests with one start in the text (shared prompt
  blocks) and the same settings (SepLLM salts the prefix-cache key with them), arriving spread
  out: prefix hits and the copy-out of shared blocks at the first eviction;
* arrivals: ``--burst-frac`` (25%) within the first ``--burst-s`` (30 s), the rest uniform over
  ``--arrival-s`` (240 s), so the load lasts about 4 minutes whatever the GPU's speed (as long
  as it keeps up); 30% stream deltas, the rest ask for the final output only; no detokenizing;
* ``--abort-frac`` (10%) of the non-long requests aborted at a random moment: 40% through
  ``AsyncLLM.abort`` after a random delay from submission within about the request's decode
  time (``min(--abort-delay-s, 0.5 s + 5 ms x max_tokens)``: waiting, prefill or decode), 60%
  once a random number of streamed tokens (0-80% of max_tokens) has arrived, half of those
  through ``AsyncLLM.abort`` and half by closing the stream (a client going away);
* a KV pool of ``--kv-tokens`` (20,480 tokens = 1,280 blocks of 16, 2.5 GiB at 8B): just above
  ``max_model_len`` (16,944; vLLM refuses to start with a pool below one full-length request,
  prefix caching on), under what the running requests want (the long ones alone hold ~750
  blocks once the mode-full one has grown; the rest ~30 blocks each), so vLLM's scheduler
  preempts running requests (the newest first) and recomputes them later, over and over. Sized
  with ``--simulate``: the default plan through SEPLLM's real scheduler and block pool gives
  ~110 preemptions of ~65 requests (a 40,960-token pool: none).

Checks (each a boolean in ``checks``; ``passed`` is their conjunction; exit status 1 otherwise):

* ``no_crash``: the engine stayed alive and no request failed with an error;
* ``no_hang``: every request reached a final state before ``--deadline`` (seconds since start,
  engine start included) and generation never stalled for ``--stall-s``;
* ``enough_requests``: at least ``--min-requests`` (1,000) were sent;
* ``outputs_exact``: every finished request returned exactly ``max_tokens`` tokens, equal to
  its replayed continuation (preempted-and-recomputed requests included);
* ``aborted_prefix``: every aborted request's tokens so far are a prefix of its continuation;
  ``aborts_landed``: at least 80% of the planned aborts ended their requests early;
* ``kv_policy``: per finished request, its ``RequestOutput.kv_transfer_params["sepllm"]``
  figures: retained + evicted == tokens; tokens == prompt + output - 1 (or + 0 with async
  scheduling's step in flight); mode full evicts, frees and compacts nothing; an evicting
  request holds exactly ``|R(n)| + 1`` tokens, ``R(n)`` the policy's retained set before its
  last (one-token) step at ``n = tokens - 1`` (sinks + the newest ``s`` separators left of the
  window + the window, counted here with numpy, apart from policy.py), so at most ``a + s + w``;
  with async scheduling also exactly ``|R(tokens)|``: the next step was scheduled, and the cache
  evicted for its query, before the request was seen to finish (that step is discarded);
  where the request was preempted and its last step was a recompute chunk,
  ``retained <= a + s + w - 1 + max_num_batched_tokens`` instead (counted as
  ``kv_exact_waived``); evicted > 0 implies compactions >= 1; the most blocks it held at once
  within ``(max(prompt, a + s + w) + chunk) / block_size + 1`` (full: its tokens' blocks + 1);
* ``pool_conserved``: after the drain (and a probe request, so that the last scheduler stats
  are taken with nothing else in the engine) the SepLLM gauges show ``kv_blocks_used == 0``
  (free == every usable block: nothing leaked), ``num_requests == 0`` records, and vLLM's
  running and waiting queues are empty; ``leaked_blocks`` is that ``kv_blocks_used``;
* ``counters_monotone``: every ``SchedulerStats`` carried the SepLLM figures, every counter
  increment was >= 0, used + free blocks stayed constant, the ``vllm:sepllm_*_total`` counters
  of the in-process Prometheus registry (metrics.SepLLMPrometheusStatLogger: what ``/metrics``
  serves) never decreased between samples (one a second) and end equal to the sum of the
  increments (``vllm:num_preemptions_total`` to the preemptions counted); something was
  evicted, compacted and freed;
* ``preempted_repeatedly``: vLLM preempted at least ``--min-preemptions`` (20) times (the
  stat logger's ``num_preempted_reqs``, what ``vllm:num_preemptions`` counts) and at least one
  preempted request finished (and is checked above);
* ``long_outputs``: every long request finished (``max_decode_steps`` = the longest output);
* ``modes_mixed``: finished requests of all three modes;
* ``async_full_graphs`` (CUDA only; ``null`` on CPU, where vLLM turns async scheduling and
  graphs off): the engine ran with async scheduling, a full-graph CUDA graph mode and the V1
  runner.

Stats path: a custom stat logger (``AsyncLLM(stat_loggers=[SoakStatLogger])``) sees every
``SchedulerStats`` (SEPLLM's ``SepLLMSchedulerStats``: ``.sepllm`` holds counter increments and
gauges) and ``IterationStats`` (``num_preempted_reqs``); per-request preemptions come from the
same ``PREEMPTED`` engine events (``IterationStats.update_from_events`` wrapped in this process).

The JSON is always written: every 15 s while running (``status: running``), at the end, and
from a SIGTERM handler (``timeout`` in h200_run.sh) with ``status: terminated``, ``passed: false``.

Time on the H200 (Llama-3-8B shape, bf16, fast start). ``--simulate`` with a step cost of
4.5 ms + 0.04 ms per decode row + prefill tokens / 30k per s (conservative: 96 SepLLM requests
of this shape decoded at ~6.7 ms a step, results/h200_family_llama3.1-8b.json; 512 rows ~25 ms,
README): the long requests end by ~100-150 s, arrivals end at 240 s, the load at ~256 s
(~44,000 engine steps, ~22 decode rows on average, up to ~66 running, ~0.55M prefill tokens of
which ~0.1M recomputed). Plus making the plan (~10-20 s), the engine start (~15-30 s; Triton
compiles SEPLLM's kernels at first use) and the drain (~5 s): ~5-5.5 minutes for the script,
about 6 with h200_run.sh's set-up. The deadline (470 s with SOAK_S=500) leaves ~1.5x on the
load, and the long requests would need ~2x slower decode steps than assumed to run late.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

MODES = ("sepllm", "streamingllm", "full", "default")
MODE_WEIGHTS = "0.45,0.25,0.2,0.1"
#: SepLLM counters of ``SepLLMStepStats`` (increments per report).
COUNTERS = ("evicted_tokens", "freed_blocks", "compactions", "moved_tokens",
            "compaction_seconds", "eviction_seconds")


# ============================================================================ the plan
@dataclasses.dataclass
class Item:
    idx: int
    rid: str
    prompt: list[int]
    cont: list[int]  # the replayed continuation, len == max_tokens
    mode: str  # sepllm | streamingllm | full | default (no override)
    overrides: dict | None  # extra_args["sepllm"]
    arrival: float  # seconds after the load starts
    stream: bool  # DELTA outputs (else FINAL_ONLY)
    kind: str  # long | medium | short | group
    abort: str | None = None  # None | "time" | "tokens"
    abort_at: float = 0.0  # seconds after submission, or tokens received
    abort_via: str = "abort"  # "abort" (AsyncLLM.abort) | "close" (client goes away)
    group: int | None = None

    @property
    def max_tokens(self) -> int:
        return len(self.cont)


def _log_uniform(rng: random.Random, lo: float, hi: float) -> int:
    lo, hi = max(lo, 1), max(hi, 1)
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _settings(rng: random.Random, mode: str, args) -> dict | None:
    if mode == "default":
        return None
    if mode == "full":
        return {"mode": "full"}
    w = _log_uniform(rng, *args.window_range)
    a = rng.choice((0, 1, 2, 4, 4, 4, 8))
    if mode == "streamingllm":
        return {"mode": "streamingllm", "num_sinks": a, "window": w}
    return {"mode": "sepllm", "num_sinks": a, "window": w,
            "sep_cap": rng.randint(*args.sep_cap_range)}


def make_plan(ids: list[int], args) -> list[Item]:
    """The requests (deterministic in ``args.seed``); see the module docstring."""
    rng = random.Random(args.seed)
    n, top = args.requests, args.max_output
    long_min = args.long_min or top // 2
    p_lo, p_hi = args.prompt_range
    items: list[Item] = []

    def text(plen: int, olen: int, start: int | None = None) -> tuple[list[int], list[int]]:
        if start is None:
            start = rng.randrange(0, len(ids) - plen - olen)
        return ids[start:start + plen], ids[start + plen:start + plen + olen]

    def add(kind, prompt, cont, mode, overrides, arrival, stream, group=None):
        i = len(items)
        items.append(Item(i, f"soak-{i:05d}", prompt, cont, mode, overrides, arrival, stream,
                          kind, group=group))

    # Long requests first (arrivals 0..1 s): outputs from top down to long_min; one in mode
    # full (the shortest: its KV grows to prompt + output), two streamingllm, the rest sepllm.
    n_long = min(args.long, n)
    for k in range(n_long):
        olen = top if n_long == 1 else int(round(top - (top - long_min) * k / (n_long - 1)))
        mode = ("full" if k == n_long - 1 and n_long >= 3 else
                "streamingllm" if k % 3 == 1 else "sepllm")
        plen = _log_uniform(rng, p_lo, min(p_hi, 1024)) if mode != "full" else \
            _log_uniform(rng, p_lo, min(p_hi, 256))
        prompt, cont = text(plen, olen)
        add("long", prompt, cont, mode, _settings(rng, mode, args), rng.uniform(0, 1.0),
            stream=k % 2 == 0)

    # Prefix groups: one text start, growing prompt lengths, one setting, spread arrivals.
    n_rest = n - len(items)
    groups = []
    for g in range(args.prefix_groups):
        size = rng.randint(4, 7)
        if sum(len(x) for x in groups) + size > n_rest // 3:
            break
        base = max(p_lo, min(p_hi, _log_uniform(rng, max(p_lo, p_hi // 8), p_hi)))
        mode = rng.choices(MODES, args.mode_weights)[0]
        overrides = _settings(rng, mode, args)
        start = rng.randrange(0, len(ids) - p_hi - top)
        members = []
        for _ in range(size):
            plen = min(p_hi, base + rng.randint(0, max(1, base // 4)))
            olen = _log_uniform(rng, min(16, max(2, top // 32)), top // 16)
            prompt, cont = text(plen, olen, start)
            members.append((prompt, cont, mode, overrides))
        groups.append(members)
    group_slots = []
    for g, members in enumerate(groups):
        t = rng.uniform(0, args.arrival_s * 0.6)
        for prompt, cont, mode, overrides in members:
            group_slots.append((g, prompt, cont, mode, overrides, t))
            t += rng.uniform(0.5, args.arrival_s * 0.1)
    for g, prompt, cont, mode, overrides, t in group_slots:
        add("group", prompt, cont, mode, overrides, min(t, args.arrival_s), rng.random() < 0.3,
            group=g)

    # The rest: medium (--medium-frac) and short outputs.
    while len(items) < n:
        mode = rng.choices(MODES, args.mode_weights)[0]
        if rng.random() < args.medium_frac:
            kind, olen = "medium", _log_uniform(rng, top // 16, top // 4)
        else:
            kind, olen = "short", _log_uniform(rng, min(16, max(2, top // 32)), top // 16)
        plen = _log_uniform(rng, p_lo, p_hi)
        prompt, cont = text(plen, max(olen, 2))
        arrival = rng.uniform(0, args.burst_s if rng.random() < args.burst_frac
                              else args.arrival_s)
        add(kind, prompt, cont, mode, _settings(rng, mode, args), arrival, rng.random() < 0.3)

    # Aborts: among the non-long requests.
    candidates = [it for it in items if it.kind != "long"]
    for it in rng.sample(candidates, min(len(candidates), round(n * args.abort_frac))):
        if rng.random() < 0.4:  # through AsyncLLM.abort, streamed or not; a delay within
            # about the request's own decode time (short ones are gone within a few seconds)
            it.abort = "time"
            it.abort_at = rng.uniform(0.0, min(args.abort_delay_s, 0.5 + 0.005 * it.max_tokens))
        else:  # streamed; half through AsyncLLM.abort, half by closing the stream
            it.abort, it.abort_at = "tokens", int(rng.uniform(0, 0.8) * it.max_tokens)
            it.abort_via = "abort" if rng.random() < 0.5 else "close"
            it.stream = True
    items.sort(key=lambda it: it.arrival)
    return items


# ============================================================================ KV policy check
def retained_count(is_sep: np.ndarray, n: int, a: int, s: int | None, w: int) -> int:
    """``|R(n)|``: positions below ``n`` the query at ``n`` sees under (a, s, w): the first
    ``a``, the newest ``s`` separators in ``[a, n - w + 1)``, and ``[n - w + 1, n)``.
    Written here with numpy, apart from policy.py, as the check's own reading of the rule."""
    head = min(a, n)
    ws = max(n - w + 1, 0)
    seps = int(is_sep[a:ws].sum()) if ws > a else 0
    if s is not None:
        seps = min(seps, s)
    return head + seps + (n - max(ws, head))


def check_kv(it: Item, st: dict | None, sep_arr: np.ndarray, engine_cfg: dict, chunk: int,
             block_size: int, preempted: int, async_sched: bool) -> tuple[list[str], bool]:
    """Problems with one finished request's KV figures (empty: consistent) and whether the
    exact retained count was waived (preempted, last step a recompute chunk)."""
    if st is None:
        return ["no kv_transfer_params['sepllm'] in the final output"], False
    problems = []
    tokens, kept, evicted = st["tokens"], st["kv_retained"], st["kv_evicted"]
    if preempted and tokens == 0:
        # finished while preempted (its last token in flight under async scheduling): no KV
        return ([] if kept == evicted == st["peak_kv_blocks"] == 0
                and st.get("preempted_at_finish") and async_sched
                else [f"finished while preempted but holds KV: {st}"]), False
    if kept + evicted != tokens:
        problems.append(f"retained {kept} + evicted {evicted} != tokens {tokens}")
    full = len(it.prompt) + it.max_tokens
    if tokens not in ((full - 1, full) if async_sched else (full - 1,)):
        problems.append(f"tokens {tokens}, expected {full - 1}" + (f" or {full}" if async_sched
                                                                    else ""))
    cfg = dict(engine_cfg, **(it.overrides or {}))
    mode = cfg["mode"]
    if mode == "full":
        if evicted or st.get("compactions") or st.get("kv_blocks_freed"):
            problems.append(f"mode full evicted {evicted}, compactions "
                            f"{st.get('compactions')}, freed {st.get('kv_blocks_freed')}")
        if st["peak_kv_blocks"] > -(-tokens // block_size) + 1:
            problems.append(f"peak {st['peak_kv_blocks']} blocks for {tokens} tokens")
        return problems, False
    a, w = cfg["num_sinks"], cfg["window"]
    s = 0 if mode == "streamingllm" else cfg["sep_cap"]
    cap = a + s + w if s is not None else math.inf  # no separator cap: unbounded
    ids = np.asarray(it.prompt + it.cont, dtype=np.int64)[:max(tokens - 1, 0)]
    is_sep = np.isin(ids, sep_arr)
    expect = retained_count(is_sep, tokens - 1, a, s, w) + 1
    if async_sched and kept != expect:
        # With async scheduling the next step may be scheduled (and the cache evicted for its
        # query at position ``tokens``) before the request is seen to finish; that step is
        # discarded, its token never counted: the cache is then R(tokens) without the query.
        ids_next = np.asarray(it.prompt + it.cont, dtype=np.int64)[:tokens]
        if kept == retained_count(np.isin(ids_next, sep_arr), tokens, a, s, w):
            expect = kept
    waived = False
    if kept != expect:
        # Recomputed up to its last token in one chunk of q tokens: |R(tokens - q)| + q,
        # which is more than the one-token figure and at most a + s + w - 1 + q.
        if preempted and expect < kept <= min(cap - 1, tokens) + chunk:
            waived = True
        else:
            problems.append(f"retained {kept}, the policy keeps {expect} (a={a} s={s} w={w}, "
                            f"{'preempted ' + str(preempted) + 'x' if preempted else 'never preempted'})")
    if not waived and kept > cap:
        problems.append(f"retained {kept} > a + s + w = {cap}")
    if evicted and not st.get("compactions"):
        problems.append(f"evicted {evicted} tokens but no compaction reported")
    bound = -(-(max(len(it.prompt), cap if s is not None else tokens) + chunk) // block_size) + 1
    if st["peak_kv_blocks"] > bound:
        problems.append(f"peak {st['peak_kv_blocks']} blocks > {bound}")
    return problems, waived


# ============================================================================ stats
class Collector:
    """What the stat logger and the PREEMPTED events tell (one engine)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.num_sched_stats = 0
        self.missing_sepllm = 0
        self.negative: list[str] = []
        self.totals = dict.fromkeys(COUNTERS, 0.0)
        self.total_blocks: int | None = None  # used + free (usable blocks)
        self.blocks_inconsistent = 0
        self.last: dict | None = None
        self.peak = {"kv_blocks_used": 0, "running": 0, "waiting": 0, "sepllm_records": 0}
        self.preemptions = 0
        self.preempted_by_req: collections.Counter = collections.Counter()
        self.generation_tokens = 0
        self.last_token_t = time.monotonic()
        self.timeline: list[list] = []
        self._next_timeline = 0.0

    def record(self, sched, iteration) -> None:
        now = time.monotonic()
        if iteration is not None:
            self.preemptions += iteration.num_preempted_reqs
            self.generation_tokens += iteration.num_generation_tokens
            if iteration.num_generation_tokens:
                self.last_token_t = now
        if sched is None:
            return
        self.num_sched_stats += 1
        s = getattr(sched, "sepllm", None)
        if s is None:
            self.missing_sepllm += 1
            return
        for c in COUNTERS:
            v = getattr(s, c)
            if not v >= 0:  # NaN too
                if len(self.negative) < 20:
                    self.negative.append(f"{c} += {v} (report {self.num_sched_stats})")
                continue
            self.totals[c] += v
        total = s.kv_blocks_used + s.kv_blocks_free
        if self.total_blocks is None:
            self.total_blocks = total
        elif total != self.total_blocks:
            self.blocks_inconsistent += 1
        self.last = {"kv_blocks_used": s.kv_blocks_used, "kv_blocks_free": s.kv_blocks_free,
                     "sepllm_records": s.num_requests, "retained_tokens": s.retained_tokens,
                     "context_tokens": s.context_tokens, "running": sched.num_running_reqs,
                     "waiting": sched.num_waiting_reqs,
                     "kv_cache_usage": round(sched.kv_cache_usage, 4),
                     "t": round(now - self.t0, 2)}
        for k in self.peak:
            self.peak[k] = max(self.peak[k], self.last[k])
        if now - self.t0 >= self._next_timeline:  # one point every 5 s
            self._next_timeline = now - self.t0 + 5.0
            self.timeline.append([round(now - self.t0, 1), sched.num_running_reqs,
                                  sched.num_waiting_reqs, s.kv_blocks_used, self.preemptions,
                                  self.generation_tokens])


COLLECTOR = Collector()


def _stat_logger_class():
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SoakStatLogger(StatLoggerBase):
        """Hands every report to COLLECTOR (same process: AsyncLLM's output handler)."""

        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                   engine_idx: int = 0) -> None:
            COLLECTOR.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return SoakStatLogger


def _hook_preemption_events() -> None:
    """Count PREEMPTED engine events per request (the events behind vllm:num_preemptions)."""
    from vllm.v1.engine import EngineCoreEventType
    from vllm.v1.metrics.stats import IterationStats

    original = IterationStats.update_from_events
    if getattr(original, "_soak", False):
        return

    def update_from_events(self, req_id, events, *args, **kwargs):
        for event in events:
            if event.type == EngineCoreEventType.PREEMPTED:
                # internal id = "<external id>-<8 random chars>" (InputProcessor)
                COLLECTOR.preempted_by_req[req_id.rsplit("-", 1)[0]] += 1
        return original(self, req_id, events, *args, **kwargs)

    update_from_events._soak = True
    IterationStats.update_from_events = update_from_events


class PromCounters:
    """``vllm:sepllm_*_total`` (and vllm:num_preemptions_total) as the in-process Prometheus
    registry serves them, sampled over the run: they must never decrease."""

    NAMES = tuple(f"vllm:sepllm_{c}_total" for c in COUNTERS) + ("vllm:num_preemptions_total",)

    def __init__(self) -> None:
        self.samples = 0
        self.last: dict[str, float] = {}
        self.decreases: list[str] = []

    def read(self) -> dict[str, float]:
        from prometheus_client import REGISTRY

        values: dict[str, float] = {}
        for metric in REGISTRY.collect():
            for sample in metric.samples:
                if sample.name in self.NAMES:
                    values[sample.name] = values.get(sample.name, 0.0) + sample.value
        return values

    def sample(self) -> None:
        values = self.read()
        for name, v in values.items():
            if v < self.last.get(name, 0.0) - 1e-9 and len(self.decreases) < 20:
                self.decreases.append(f"{name}: {self.last[name]} -> {v}")
        self.last.update(values)
        self.samples += 1


# ============================================================================ the run
@dataclasses.dataclass
class Result:
    status: str = "planned"  # planned | running | finished | aborted | error | unfinished
    tokens: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    kv: dict | None = None
    error: str | None = None
    t_submit: float | None = None
    t_end: float | None = None
    abort_sent: float | None = None
    outputs: int = 0
    checked: tuple | None = None  # (mismatch or None, KV problems, waived), once finished


class State:
    def __init__(self, args) -> None:
        self.args = args
        self.t_start = time.monotonic()
        self.items: list[Item] = []
        self.results: dict[int, Result] = {}
        self.engine = None
        self.engine_info: dict = {}
        self.engine_dead = False
        self.stopping = False  # the soak aborts what is still open (deadline, stall)
        self.hang: str | None = None
        self.fatal: str | None = None
        self.phase = "setup"
        self.times: dict[str, float] = {}
        self.final_stats: dict | None = None
        self.prom = PromCounters()
        self.prom_final: dict | None = None
        self.sep_arr = np.zeros(0, dtype=np.int64)
        self.env: dict | None = None  # common.environment(), once the engine runs


STATE: State | None = None


def _sampling_params(it: Item, cont_file: str):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    extra = {"replay": {"file": cont_file, "row": it.idx}}
    if it.overrides is not None:
        extra["sepllm"] = dict(it.overrides)
    return SamplingParams(max_tokens=it.max_tokens, temperature=0.0, ignore_eos=True,
                          detokenize=False, extra_args=extra,
                          output_kind=RequestOutputKind.DELTA if it.stream
                          else RequestOutputKind.FINAL_ONLY)


async def _abort_later(engine, it: Item, r: Result) -> None:
    await asyncio.sleep(it.abort_at)
    if r.status == "running":
        r.abort_sent = time.monotonic()
        await engine.abort(it.rid)


async def run_request(st: State, it: Item, cont_file: str, t0: float) -> None:
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.exceptions import EngineDeadError

    engine, r = st.engine, st.results[it.idx]
    await asyncio.sleep(max(0.0, t0 + it.arrival - time.monotonic()))
    r.status, r.t_submit = "running", time.monotonic()
    gen = engine.generate(TokensPrompt(prompt_token_ids=it.prompt),
                          _sampling_params(it, cont_file), it.rid)
    timer = (asyncio.create_task(_abort_later(engine, it, r)) if it.abort == "time" else None)
    try:
        async for out in gen:
            c = out.outputs[0]
            if it.stream:
                r.tokens.extend(c.token_ids)
            else:
                r.tokens = list(c.token_ids)
            r.outputs += 1
            if out.finished:
                r.finish_reason = str(c.finish_reason)
                r.kv = (out.kv_transfer_params or {}).get("sepllm")
                break
            if (it.abort == "tokens" and r.abort_sent is None
                    and len(r.tokens) >= it.abort_at):
                r.abort_sent = time.monotonic()
                if it.abort_via == "abort":
                    await engine.abort(it.rid)  # the stream then ends with an abort output
                else:
                    await gen.aclose()  # the client goes away: vLLM aborts it
                    r.finish_reason = "abort"
                    break
        if r.finish_reason is None:
            r.status, r.error = "error", "stream ended without a final output"
        else:
            r.status = "aborted" if r.finish_reason == "abort" else "finished"
        if r.status == "aborted" and it.abort is None:
            if st.stopping:
                r.status = "unfinished"  # aborted by the soak at its deadline or a stall
            else:
                r.status, r.error = "error", "aborted without being asked to"
    except EngineDeadError as e:
        st.engine_dead = True
        r.status, r.error = "error", f"EngineDeadError: {e}"[:300]
    except asyncio.CancelledError:
        r.status = "unfinished"
        raise
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        if type(e).__name__ == "EngineGenerateError" and e.__cause__ is not None:
            e = e.__cause__
        r.status, r.error = "error", f"{type(e).__name__}: {e}"[:300]
        if "EngineDead" in type(e).__name__:
            st.engine_dead = True
    finally:
        r.t_end = time.monotonic()
        if timer is not None:
            timer.cancel()


async def probe(st: State, k: int) -> None:
    """A tiny request after the drain: its step's scheduler stats are taken with nothing else
    in the engine (the gauges then show the pool as the soak left it)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, detokenize=False,
                            extra_args={"sepllm": {"mode": "full"}})
    async for _ in st.engine.generate(TokensPrompt(prompt_token_ids=st.items[0].prompt[:8]
                                                   or [1, 2, 3]), params, f"probe-{k}"):
        pass


def _progress_line(st: State) -> str:
    c = collections.Counter(r.status for r in st.results.values())
    last = COLLECTOR.last or {}
    return (f"[soak {time.monotonic() - st.t_start:6.0f} s] done {c['finished']} finished + "
            f"{c['aborted']} aborted + {c['error']} errors of {len(st.items)}; running "
            f"{last.get('running')} waiting {last.get('waiting')}; KV blocks used "
            f"{last.get('kv_blocks_used')}/{COLLECTOR.total_blocks}; preemptions "
            f"{COLLECTOR.preemptions}; generated {COLLECTOR.generation_tokens} tokens")


def prepare(args, work: Path) -> tuple[Path, str, list[Item]]:
    """The model folder (a dummy --model-shape, or --model), its load format, the plan."""
    from transformers import AutoTokenizer

    from benchmarks.common import SHAPES, load_texts, make_dummy_model

    if args.model:
        model_dir, load_format = Path(args.model), "auto"
    else:
        from benchmarks.throughput import fit_vocab_to_tokenizer

        model_dir = make_dummy_model(work / args.model_shape, Path(args.tokenizer_dir),
                                     SHAPES[args.model_shape], max_len=args.max_output + 4096)
        fit_vocab_to_tokenizer(model_dir)
        load_format = "dummy"
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids: list[int] = []
    for text in load_texts().values():
        ids += tok.encode(text, add_special_tokens=False)
    return model_dir, load_format, make_plan(ids, args)


def sizes(args, items: list[Item]) -> tuple[int, int]:
    """max_model_len (the longest request, rounded up) and the KV pool in tokens (at least
    max_model_len + 64: vLLM refuses to start with a pool below one full-length request)."""
    max_len = max(len(it.prompt) + it.max_tokens for it in items) + 16
    max_len = -(-max_len // 16) * 16
    return max_len, max(args.kv_tokens, max_len + 64)


async def soak(st: State) -> None:
    args = st.args
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from benchmarks.common import kv_bytes_per_token

    work = Path(tempfile.mkdtemp(prefix="sepllm-soak-"))
    model_dir, load_format, st.items = prepare(args, work)
    st.results = {it.idx: Result() for it in st.items}
    # The continuation table the engine core reads (replay.py): row = item index.
    width = max(it.max_tokens for it in st.items)
    table = np.zeros((len(st.items), width), dtype=np.int32)
    for it in st.items:
        table[it.idx, :it.max_tokens] = it.cont
    cont_file = str(work / "continuations.npy")
    np.save(cont_file, table)
    del table
    st.times["plan_s"] = round(time.monotonic() - st.t_start, 1)

    from vllm.platforms import current_platform

    cuda = current_platform.is_cuda()
    cfg = json.loads((model_dir / "config.json").read_text())
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    elem = 4 if dtype == "float32" else 2
    max_len, kv_tokens = sizes(args, st.items)
    engine_sepllm = dict(args.engine_sepllm)
    kwargs = dict(
        model=str(model_dir), tokenizer=str(model_dir), load_format=load_format, dtype=dtype,
        seed=args.seed, attention_backend="SEPLLM",
        additional_config={"sepllm": engine_sepllm},
        logits_processors=["benchmarks.replay:ReplayLogitsProcessor"],
        max_model_len=max_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_bytes=kv_tokens * kv_bytes_per_token(cfg, elem),
        enable_prefix_caching=True,
    )
    if args.block_size:
        kwargs["block_size"] = args.block_size
    if cuda:
        kwargs["async_scheduling"] = True
        kwargs["compilation_config"] = ({"cudagraph_mode": "FULL_AND_PIECEWISE"} if args.compile
                                        else {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"})
    else:
        kwargs["enforce_eager"] = True
    st.engine_info = {"engine_kwargs": {k: v for k, v in kwargs.items()
                                        if k not in ("model", "tokenizer")},
                      "model": args.model_shape if not args.model else model_dir.name,
                      "kv_tokens_asked": kv_tokens}
    # The engine core process imports benchmarks.replay.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    _hook_preemption_events()

    st.phase = "engine start"
    t = time.monotonic()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs),
                                       stat_loggers=[_stat_logger_class()])
    st.engine = engine
    st.times["engine_start_s"] = round(time.monotonic() - t, 1)
    vc = engine.vllm_config
    resolved = vc.additional_config["sepllm"]
    st.sep_arr = np.asarray(sorted(resolved["separator_token_ids"]), dtype=np.int64)
    cc = vc.compilation_config
    st.engine_info.update({
        "async_scheduling": bool(vc.scheduler_config.async_scheduling),
        "cudagraph_mode": str(cc.cudagraph_mode),
        "full_cuda_graphs": bool(cc.cudagraph_mode.has_full_cudagraphs()) and
        not vc.model_config.enforce_eager,
        "compilation_mode": str(cc.mode),
        "v2_model_runner": bool(vc.use_v2_model_runner),
        "scheduler_cls": str(vc.scheduler_config.scheduler_cls),
        "num_gpu_blocks": vc.cache_config.num_gpu_blocks,
        "block_size": vc.cache_config.block_size,
        "max_model_len": vc.model_config.max_model_len,
        "max_num_batched_tokens": vc.scheduler_config.max_num_batched_tokens,
        "prefix_caching": bool(vc.cache_config.enable_prefix_caching),
        "engine_sepllm": {k: v for k, v in resolved.items() if k != "separator_token_ids"},
        "num_separator_ids": len(st.sep_arr),
    })
    print("engine: " + json.dumps(st.engine_info, default=str), flush=True)
    from benchmarks.common import environment

    st.env = environment()  # after the engine start: no CUDA context before the fork
    st.prom.sample()

    # Load.
    st.phase = "load"
    t0 = time.monotonic()
    st.times["load_start_s"] = round(t0 - st.t_start, 1)
    tasks = {asyncio.create_task(run_request(st, it, cont_file, t0)) for it in st.items}
    pending = set(tasks)
    next_line = next_log = time.monotonic()
    while pending:
        done, pending = await asyncio.wait(pending, timeout=1.0)
        now = time.monotonic()
        st.prom.sample()
        if now >= next_line:
            next_line = now + 15.0
            print(_progress_line(st), flush=True)
            write_record(st, status="running")
        if now >= next_log:
            next_log = now + 30.0
            await engine.do_log_stats()
        if st.engine_dead:
            st.fatal = st.fatal or "engine died"
            break
        if now - st.t_start > args.deadline:
            st.hang = f"deadline {args.deadline:.0f} s reached with {len(pending)} requests open"
            break
        started = any(r.status == "running" for r in st.results.values())
        if started and now - max(COLLECTOR.last_token_t, t0) > args.stall_s:
            st.hang = f"no token generated for {args.stall_s:.0f} s ({len(pending)} open)"
            break
    st.times["load_s"] = round(time.monotonic() - t0, 1)
    if pending:
        print(f"stopping: {st.hang or st.fatal}", flush=True)
        st.stopping = True
        open_ids = [it.rid for it in st.items if st.results[it.idx].status == "running"]
        if not st.engine_dead and open_ids:
            try:
                await asyncio.wait_for(engine.abort(open_ids), 10)
            except Exception as e:  # noqa: BLE001
                print(f"abort of open requests failed: {e!r}", flush=True)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    print(_progress_line(st), flush=True)

    # Drain check: probe requests until the last stats show an idle engine (or give up).
    st.phase = "drain"
    if not st.engine_dead:
        for k in range(3):
            try:
                await asyncio.wait_for(probe(st, k), 60)
            except Exception as e:  # noqa: BLE001
                st.fatal = st.fatal or f"probe request failed: {type(e).__name__}: {e}"[:300]
                break
            await asyncio.sleep(1.0)
            last = COLLECTOR.last or {}
            if last.get("running") == 0 and last.get("waiting") == 0:
                break
    st.final_stats = dict(COLLECTOR.last) if COLLECTOR.last else None
    st.prom.sample()
    st.prom_final = dict(st.prom.last)
    st.times["total_s"] = round(time.monotonic() - st.t_start, 1)


# ============================================================================ simulation
def simulate(args, items: list[Item], model_dir: Path, max_len: int, kv_tokens: int) -> dict:
    """The plan through SEPLLM's real scheduler and block manager, without a model: vLLM's
    ``SepLLMScheduler`` (sync) over a real block pool of the run's size, prefix caching on
    (vLLM's block hasher, SepLLM's salt), every scheduled request that catches up sampling its
    continuation's next token, aborts at their planned moments, time advanced per step by
    ``--sim-cost`` (base ms + ms per decode row + prefill tokens / rate). Reports steps,
    preemptions, the simulated load time, and whether the pool drained clean. For sizing the
    pool (enough preemption, not a thrash) and estimating the run's length on CPU."""
    import torch
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request, RequestStatus
    from vllm.v1.structured_output import StructuredOutputManager

    import vllm_sepllm.patches as patches
    from vllm_sepllm.kv_manager import SepLLMSpec

    patches.install()
    bs = args.block_size or 16
    vllm_config = EngineArgs(
        model=str(model_dir), max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=True,
        block_size=bs, async_scheduling=False, max_model_len=max_len,
        attention_backend="SEPLLM", additional_config={"sepllm": dict(args.engine_sepllm)},
    ).create_engine_config()
    num_blocks = kv_tokens // bs
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    spec = SepLLMSpec(block_size=bs, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
    kv_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                              kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    sched = vllm_config.scheduler_config.get_scheduler_cls()(
        vllm_config=vllm_config, kv_cache_config=kv_config,
        structured_output_manager=StructuredOutputManager(vllm_config), block_size=bs,
        log_stats=True)
    init_none_hash(sha256)
    hasher = get_request_block_hasher(bs, sha256)
    base_ms, row_ms, rate = (float(x) for x in args.sim_cost.split(","))

    by_rid = {it.rid: it for it in items}
    reqs: dict[str, Request] = {}
    arrivals = sorted(items, key=lambda it: it.arrival)
    nxt = 0
    t = 0.0
    steps = prefill_tokens = decode_rows = 0
    finished, aborted = {}, 0
    abort_at: dict[str, float] = {}
    peak_running = 0
    long_done_s = 0.0
    wall0 = time.monotonic()
    while nxt < len(arrivals) or sched.requests:
        while nxt < len(arrivals) and arrivals[nxt].arrival <= t:
            it = arrivals[nxt]
            nxt += 1
            extra = {"sepllm": dict(it.overrides)} if it.overrides else None
            salt = patches.prefix_cache_salt(vllm_config, extra, None)
            req = Request(it.rid, list(it.prompt), SamplingParams(
                max_tokens=it.max_tokens, ignore_eos=True, extra_args=extra), None,
                cache_salt=salt, block_hasher=hasher)
            reqs[it.rid] = req
            sched.add_request(req)
            if it.abort == "time":
                abort_at[it.rid] = t + it.abort_at
        due = [rid for rid, at in abort_at.items() if at <= t]
        due += [rid for rid, req in reqs.items() if by_rid[rid].abort == "tokens"
                and rid not in finished and req.num_output_tokens >= max(by_rid[rid].abort_at, 1)
                and rid in sched.requests]
        if due:
            for rid in due:
                abort_at.pop(rid, None)
            gone = sched.finish_requests(due, RequestStatus.FINISHED_ABORTED)
            aborted += len(gone)
            for r in gone:
                finished[r.request_id] = "abort"
        if not sched.requests:
            if nxt < len(arrivals):
                t = max(t, arrivals[nxt].arrival)
            continue
        out = sched.schedule()
        ids = list(out.num_scheduled_tokens)
        sampled = []
        rows = pre = 0
        for rid in ids:
            req = sched.requests[rid]
            q = out.num_scheduled_tokens[rid]
            if q == 1:
                rows += 1
            else:
                pre += q
            if req.num_computed_tokens < req.num_tokens:  # a chunk that does not catch up
                sampled.append([])
            else:
                sampled.append([by_rid[rid].cont[req.num_output_tokens]])
        result = sched.update_from_output(out, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=sampled))
        for eco in result.values():
            for o in eco.outputs:
                if o.finish_reason is not None:
                    finished[o.request_id] = str(o.finish_reason)
                    if by_rid[o.request_id].kind == "long":
                        long_done_s = t
        steps += 1
        prefill_tokens += pre
        decode_rows += rows
        peak_running = max(peak_running, len(sched.running))
        t += base_ms / 1e3 + rows * row_ms / 1e3 + pre / rate
    pool = sched.kv_cache_manager.block_pool
    preemptions = sum(r.num_preemptions for r in reqs.values())
    return {
        "simulated_load_s": round(t, 1), "long_requests_done_s": round(long_done_s, 1),
        "steps": steps, "prefill_tokens": prefill_tokens,
        "mean_decode_rows": round(decode_rows / max(steps, 1), 1), "peak_running": peak_running,
        "preemptions": preemptions,
        "preempted_requests": sum(r.num_preemptions > 0 for r in reqs.values()),
        "finished": sum(v != "abort" for v in finished.values()), "aborted": aborted,
        "usable_blocks": num_blocks - 1, "free_blocks_end": pool.get_num_free_blocks(),
        "sepllm_records_end": len(sched.sepllm_manager.caches),
        "sim_cost": args.sim_cost, "cpu_seconds": round(time.monotonic() - wall0, 1),
    }

# ============================================================================ the record
def evaluate(st: State, status: str) -> dict:
    args = st.args
    items, results = st.items, st.results
    info = st.engine_info
    eng_sepllm = info.get("engine_sepllm") or {"mode": "sepllm", "num_sinks": 4, "sep_cap": 64,
                                                "window": 256}
    chunk = info.get("max_num_batched_tokens") or args.max_num_batched_tokens
    block_size = info.get("block_size") or 16
    async_sched = bool(info.get("async_scheduling"))
    counts = collections.Counter(r.status for r in results.values())
    mismatches, kv_problems, aborted_bad, errors = [], [], [], []
    waived = preempted_finished = 0
    modes_finished = collections.Counter()
    max_steps = 0
    for it in items:
        r = results[it.idx]
        pre = COLLECTOR.preempted_by_req.get(it.rid, 0)
        if r.status == "finished":
            max_steps = max(max_steps, len(r.tokens))
            modes_finished[(dict(eng_sepllm, **(it.overrides or {})))["mode"]] += 1
            if r.checked is None:  # once: a finished request's figures no longer change
                mismatch = None
                if r.tokens != it.cont:
                    first = next((k for k, (x, y) in enumerate(zip(r.tokens, it.cont))
                                  if x != y), min(len(r.tokens), len(it.cont)))
                    mismatch = {"rid": it.rid, "kind": it.kind, "mode": it.mode,
                                "got": len(r.tokens), "expected": it.max_tokens,
                                "first_diff": first, "preempted": pre}
                r.checked = (mismatch, *check_kv(it, r.kv, st.sep_arr, eng_sepllm, chunk,
                                                 block_size, pre, async_sched))
            mismatch, problems, w = r.checked
            if mismatch:
                mismatches.append(mismatch)
            waived += w
            preempted_finished += bool(pre)
            if problems:
                kv_problems.append({"rid": it.rid, "mode": it.mode, "settings": it.overrides,
                                    "prompt": len(it.prompt), "max_tokens": it.max_tokens,
                                    "kv": r.kv, "preempted": pre, "problems": problems})
        elif r.status == "aborted":
            if r.tokens != it.cont[:len(r.tokens)]:
                aborted_bad.append({"rid": it.rid, "got": len(r.tokens)})
        elif r.status == "error":
            errors.append({"rid": it.rid, "error": r.error})
    planned_aborts = sum(it.abort is not None for it in items)
    long_items = [it for it in items if it.kind == "long"]
    long_done = [len(results[it.idx].tokens) for it in long_items
                 if results[it.idx].status == "finished"]
    final = st.final_stats or {}
    leaked = final.get("kv_blocks_used")
    prom = st.prom_final or st.prom.last
    prom_match = bool(prom) and all(
        abs(prom.get(f"vllm:sepllm_{c}_total", -1.0) - COLLECTOR.totals[c])
        <= 1e-6 * max(1.0, COLLECTOR.totals[c]) for c in COUNTERS) and \
        prom.get("vllm:num_preemptions_total") == COLLECTOR.preemptions
    finished_all = counts["planned"] == counts["running"] == counts["unfinished"] == 0
    on_cuda = info.get("engine_kwargs", {}).get("async_scheduling") is not None
    checks = {
        "no_crash": not st.engine_dead and st.fatal is None and not errors,
        "no_hang": st.hang is None and finished_all and status == "done",
        "enough_requests": len(items) >= args.min_requests,
        "outputs_exact": counts["finished"] > 0 and not mismatches,
        "aborted_prefix": not aborted_bad,
        "aborts_landed": counts["aborted"] >= 0.8 * planned_aborts,
        "kv_policy": counts["finished"] > 0 and not kv_problems,
        "pool_conserved": (leaked == 0 and final.get("sepllm_records") == 0
                           and final.get("running") == 0 and final.get("waiting") == 0),
        "counters_monotone": (COLLECTOR.num_sched_stats > 0 and COLLECTOR.missing_sepllm == 0
                              and not COLLECTOR.negative and COLLECTOR.blocks_inconsistent == 0
                              and not st.prom.decreases and prom_match
                              and COLLECTOR.totals["evicted_tokens"] > 0
                              and COLLECTOR.totals["compactions"] > 0
                              and COLLECTOR.totals["freed_blocks"] > 0),
        "preempted_repeatedly": (COLLECTOR.preemptions >= args.min_preemptions
                                 and preempted_finished >= 1),
        "long_outputs": bool(long_items) and len(long_done) == len(long_items),
        "modes_mixed": all(modes_finished[m] for m in ("sepllm", "streamingllm", "full")),
        "async_full_graphs": (bool(info.get("async_scheduling") and info.get("full_cuda_graphs")
                                   and info.get("v2_model_runner") is False)
                              if on_cuda else None),
    }
    passed = status == "done" and all(v is not False for v in checks.values())
    env = st.env or _light_environment()
    out_tokens = sum(len(r.tokens) for r in results.values())
    load_s = st.times.get("load_s") or max(time.monotonic() - st.t_start, 1e-9)
    return {
        "status": status,
        "passed": passed,
        "checks": checks,
        "requests": len(items),
        "finished": counts["finished"],
        "aborted": counts["aborted"],
        "errors": counts["error"],
        "unfinished": counts["planned"] + counts["running"] + counts["unfinished"],
        "planned_aborts": planned_aborts,
        "preempted": COLLECTOR.preemptions,
        "preempted_requests": len(COLLECTOR.preempted_by_req),
        "preempted_requests_finished": preempted_finished,
        "max_preemptions_one_request": max(COLLECTOR.preempted_by_req.values(), default=0),
        "max_decode_steps": max_steps,
        "long_outputs_finished": sorted(long_done, reverse=True),
        "leaked_blocks": leaked,
        "mismatches": len(mismatches),
        "kv_problems": len(kv_problems),
        "kv_exact_waived": waived,
        "crashed": bool(st.engine_dead or st.fatal),
        "hang": st.hang,
        "fatal": st.fatal,
        "output_tokens": out_tokens,
        "prompt_tokens": sum(len(it.prompt) for it in items),
        "out_tok_per_s": round(out_tokens / load_s, 1),
        "modes_finished": dict(modes_finished),
        "kinds": dict(collections.Counter(it.kind for it in items)),
        "pool": {"usable_blocks": COLLECTOR.total_blocks, "end": final,
                 "peak": COLLECTOR.peak},
        "sepllm_counters": {c: round(v, 4) for c, v in COLLECTOR.totals.items()},
        "prometheus_end": prom,
        "prometheus_samples": st.prom.samples,
        "stats_reports": COLLECTOR.num_sched_stats,
        "counter_problems": COLLECTOR.negative + st.prom.decreases
        + ([f"{COLLECTOR.missing_sepllm} reports without SepLLM figures"]
           if COLLECTOR.missing_sepllm else [])
        + ([f"used + free changed {COLLECTOR.blocks_inconsistent} times"]
           if COLLECTOR.blocks_inconsistent else []),
        "mismatch_examples": mismatches[:20],
        "kv_problem_examples": kv_problems[:20],
        "aborted_not_prefix": aborted_bad[:20],
        "error_examples": errors[:20],
        "long_requests": [{"rid": it.rid, "mode": it.mode, "settings": it.overrides,
                           "prompt": len(it.prompt), "max_tokens": it.max_tokens,
                           "status": results[it.idx].status,
                           "tokens": len(results[it.idx].tokens),
                           "preempted": COLLECTOR.preempted_by_req.get(it.rid, 0),
                           "kv": results[it.idx].kv,
                           "seconds": (round(results[it.idx].t_end - results[it.idx].t_submit, 1)
                                       if results[it.idx].t_end and results[it.idx].t_submit
                                       else None)} for it in long_items],
        "timeline_cols": ["t_s", "running", "waiting", "kv_blocks_used", "preemptions",
                          "generated_tokens"],
        "timeline": COLLECTOR.timeline,
        "wall_s": {**st.times, "now": round(time.monotonic() - st.t_start, 1)},
        "phase": st.phase,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "engine": st.engine_info,
        "gpu": env.get("gpu"),
        "commit": env.get("commit"),
        "vllm_version": env.get("vllm_version"),
        "torch": env.get("torch"),
    }


def _light_environment() -> dict:
    """vLLM version and commit without touching CUDA (before or without an engine)."""
    import subprocess

    env: dict = {"gpu": None}
    try:
        import vllm

        env["vllm_version"] = vllm.__version__
    except ImportError:
        pass
    env["commit"] = os.environ.get("SEPLLM_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
        text=True).stdout.strip() or "unknown"
    return env


def write_record(st: State, status: str) -> dict | None:
    if not st.args.out:
        return None
    try:
        rec = evaluate(st, status)
        path = Path(st.args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1, default=str) + "\n")
        tmp.replace(path)
        return rec
    except Exception:  # noqa: BLE001 - never let the record kill the run
        traceback.print_exc()
        return None


def _on_sigterm(signum, frame) -> None:
    st = STATE
    if st is not None:
        st.hang = st.hang or f"terminated by signal {signum} in phase {st.phase}"
        write_record(st, status="terminated")
        print(f"signal {signum}: record written", flush=True)
    raise SystemExit(1)


def parser() -> argparse.ArgumentParser:
    from benchmarks.common import SHAPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder with weights (default: a dummy "
                   "--model-shape with the tokenizer of --tokenizer-dir)")
    p.add_argument("--model-shape", default="llama3-8b", choices=list(SHAPES))
    p.add_argument("--tokenizer-dir", default=".gpu/tok")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--requests", type=int, default=1200)
    p.add_argument("--min-requests", type=int, default=1000)
    p.add_argument("--max-output", type=int, default=16384)
    p.add_argument("--long", type=int, default=8, help="long requests (first to arrive)")
    p.add_argument("--long-min", type=int, default=0, help="shortest long output "
                   "(default max-output / 2)")
    p.add_argument("--prompt-range", type=int, nargs=2, default=[16, 2048])
    p.add_argument("--window-range", type=int, nargs=2, default=[64, 1024])
    p.add_argument("--sep-cap-range", type=int, nargs=2, default=[8, 64])
    p.add_argument("--prefix-groups", type=int, default=12)
    p.add_argument("--mode-weights", default=MODE_WEIGHTS,
                   type=lambda x: [float(v) for v in x.split(",")],
                   help="weights of sepllm, streamingllm, full, no override")
    p.add_argument("--medium-frac", type=float, default=0.3,
                   help="fraction of the other requests with medium outputs (max/16 .. max/4)")
    p.add_argument("--abort-frac", type=float, default=0.10)
    p.add_argument("--abort-delay-s", type=float, default=8.0)
    p.add_argument("--arrival-s", type=float, default=240.0)
    p.add_argument("--burst-frac", type=float, default=0.25,
                   help="fraction of the requests arriving within the first --burst-s seconds")
    p.add_argument("--burst-s", type=float, default=30.0)
    p.add_argument("--engine-sepllm", type=json.loads,
                   default={"num_sinks": 4, "sep_cap": 64, "window": 256},
                   help="the engine's SepLLM settings (JSON)")
    p.add_argument("--kv-tokens", type=int, default=20480,
                   help="KV pool in tokens (raised to max_model_len + 64 if below)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--block-size", type=int, default=0,
                   help="KV block size (default: vLLM's, 16 on CUDA, 128 on CPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile + FULL_AND_PIECEWISE graphs (default: no compile, "
                        "FULL_DECODE_ONLY graphs: faster start)")
    p.add_argument("--deadline", type=float, default=470.0,
                   help="seconds since start (engine start included) to finish the load")
    p.add_argument("--stall-s", type=float, default=120.0,
                   help="a hang: no token generated for this long while requests are open")
    p.add_argument("--min-preemptions", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--simulate", action="store_true",
                   help="no engine: the plan through the real scheduler, see simulate()")
    p.add_argument("--sim-cost", default="4.5,0.04,30000",
                   help="simulated step: base ms, ms per decode row, prefill tokens/s "
                        "(default: Llama-3-8B shape on the H200, see the docstring)")
    p.add_argument("--out", default=None, help="JSON record")
    return p


def main(argv: list[str] | None = None) -> int:
    global STATE
    args = parser().parse_args(argv)
    if args.requests < 1 or args.long > args.requests:
        raise SystemExit("--requests must be >= max(1, --long)")
    if args.simulate:
        model_dir, _, items = prepare(args, Path(tempfile.mkdtemp(prefix="sepllm-soak-")))
        max_len, kv_tokens = sizes(args, items)
        rec = simulate(args, items, model_dir, max_len, kv_tokens)
        rec.update(requests=len(items), output_tokens=sum(it.max_tokens for it in items),
                   prompt_tokens=sum(len(it.prompt) for it in items), max_model_len=max_len,
                   kv_tokens=kv_tokens)
        print(json.dumps(rec, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")
        return 0
    st = STATE = State(args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    status = "done"
    try:
        asyncio.run(soak(st))
    except SystemExit:
        status = "terminated"
        raise
    except BaseException as e:  # noqa: BLE001 - recorded
        status = "crashed"
        st.fatal = f"{type(e).__name__}: {e}"[:500]
        traceback.print_exc()
    finally:
        if status == "terminated":
            pass  # the signal handler wrote the record
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        engine, st.engine = st.engine, None
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001
                traceback.print_exc()
            del engine
            import gc

            gc.collect()  # AsyncLLM.__del__ now, not at interpreter teardown
    rec = write_record(st, status) or evaluate(st, status)
    summary = {k: rec[k] for k in ("passed", "requests", "finished", "aborted", "errors",
                                   "unfinished", "preempted", "preempted_requests_finished",
                                   "max_decode_steps", "leaked_blocks", "mismatches",
                                   "kv_problems", "kv_exact_waived", "crashed", "hang")}
    print("checks: " + json.dumps(rec["checks"]))
    print("summary: " + json.dumps(summary))
    print(f"wall: {json.dumps(rec['wall_s'])}")
    for key in ("mismatch_examples", "kv_problem_examples", "error_examples",
                "counter_problems"):
        if rec.get(key):
            print(f"{key}: " + json.dumps(rec[key][:5], default=str))
    return 0 if rec["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
