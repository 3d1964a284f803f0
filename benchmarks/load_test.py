"""Load test: vLLM's OpenAI server with SEPLLM on loopback (CPU, SmolLM2-135M real weights).

    .venv/bin/python benchmarks/load_test.py --requests 1000 --clients 64 \\
        --out benchmarks/results/cpu_load_test.json

Starts the server and, at the same time, a fresh offline ``LLM.generate`` with the same
settings in a separate process, which computes every request the clients will not drop (the
reference). Once both are ready, ``--clients`` concurrent clients run ``--requests`` completions
of mixed lengths (real-text prompts of ``--prompt-tokens`` ids, sent as token ids;
``--output-tokens`` new tokens, greedy, ``ignore_eos``), half of them streamed, ``--abort-frac``
of all requests streamed and dropped by the client after 2-4 chunks (vLLM aborts them). Then it
waits for the engine to drain, reads ``/metrics`` and stops the server.

Pass criteria (exit status 1 otherwise, and ``passed`` in the record): no failed request; every
non-aborted output equal to the offline one; dropped requests aborted mid-stream (none ran to
its end in the engine: vLLM's ``request_success{finished_reason="length"}`` grows by exactly the
completed count); SepLLM evicted tokens; after the drain no KV block and no SepLLM request
record left (``vllm:sepllm_kv_blocks_used`` and ``vllm:sepllm_num_requests`` are 0).

Settings: float32, eager, ``--sepllm`` a=4 s=16 w=64 (prompts of 100+ tokens really evict), chunked
prefill of ``--chunk`` tokens, ``--max-num-seqs`` running requests (default: the client count).
Everything is bounded: ``--deadline`` seconds for the client phase, ``--request-timeout`` per
request, the server's start-up.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEPLLM = {"num_sinks": 4, "sep_cap": 16, "window": 64}
MAX_MODEL_LEN = 2048


@dataclasses.dataclass
class Item:
    """One request of the plan: prompt ids, new tokens, streamed or not, and for a request the
    client drops, after how many streamed chunks."""

    idx: int
    prompt: list[int]
    max_tokens: int
    stream: bool
    abort_after: int | None = None


def plan(tokenizer, n: int, prompt_tokens: tuple[int, int], output_tokens: tuple[int, int],
         abort_frac: float, seed: int = 0) -> list[Item]:
    """``n`` requests: prompt lengths uniform in ``prompt_tokens`` (inclusive), cut at random
    offsets from the real texts; output lengths uniform in ``output_tokens``; every other one
    streamed; ``round(n * abort_frac)`` streamed ones dropped after 2-4 chunks (they ask for
    ``output_tokens[1]`` tokens, so the drop is mid-stream)."""
    from benchmarks.common import load_texts

    ids: list[int] = []
    for text in load_texts().values():
        ids += tokenizer.encode(text, add_special_tokens=False)
    rng = random.Random(seed)
    items = []
    for i in range(n):
        length = rng.randint(*prompt_tokens)
        start = rng.randrange(0, len(ids) - length)
        items.append(Item(i, ids[start:start + length], rng.randint(*output_tokens),
                          stream=i % 2 == 1))
    streamed = [it for it in items if it.stream]
    for it in rng.sample(streamed, min(len(streamed), round(n * abort_frac))):
        it.abort_after = rng.randint(2, 4)
        it.max_tokens = max(output_tokens[1], it.abort_after + 8)
    return items


# ---------------------------------------------------------------------- clients
async def _request(session, base: str, model: str, item: Item, timeout: float) -> dict:
    import aiohttp

    body = {"model": model, "prompt": item.prompt, "max_tokens": item.max_tokens,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            "stream": item.stream}
    t0 = time.monotonic()
    out = {"idx": item.idx, "status": "failed", "token_ids": [], "error": None}
    try:
        async with session.post(base + "/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                out["error"] = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return out
            if not item.stream:
                data = await resp.json()
                out["token_ids"] = data["choices"][0]["token_ids"]
                out["status"] = "ok"
            else:
                chunks = 0
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data: "):
                        continue
                    if line == b"data: [DONE]":
                        out["status"] = "ok"
                        break
                    data = json.loads(line[6:])
                    if "error" in data:
                        out["error"] = str(data["error"])[:300]
                        return out
                    for choice in data.get("choices", []):
                        if choice.get("token_ids"):
                            if not out["token_ids"]:
                                out["ttft_s"] = time.monotonic() - t0
                            out["token_ids"] += choice["token_ids"]
                            chunks += 1
                    if item.abort_after is not None and chunks >= item.abort_after:
                        resp.close()  # the client goes away mid-stream
                        out["status"] = "aborted"
                        break
    except Exception as e:  # noqa: BLE001 - every failure is recorded, none is retried
        out["error"] = f"{type(e).__name__}: {e}"[:300]
        return out
    out["latency_s"] = time.monotonic() - t0
    if out["status"] == "ok" and len(out["token_ids"]) != item.max_tokens:
        out["status"] = "failed"
        out["error"] = f"{len(out['token_ids'])} tokens, expected {item.max_tokens}"
    elif out["status"] == "ok" and item.abort_after is not None:
        out["status"] = "ended_before_abort"  # the stream ended before the client dropped it
    return out


async def drive(base: str, model: str, items: list[Item], clients: int, deadline: float,
                request_timeout: float) -> list[dict]:
    """``clients`` concurrent clients take the items in order; the phase ends within
    ``deadline`` seconds (requests still out then are recorded as failed)."""
    import aiohttp

    queue: asyncio.Queue[Item] = asyncio.Queue()
    for it in items:
        queue.put_nowait(it)
    results: dict[int, dict] = {}

    async def client(session):
        while not queue.empty():
            item = queue.get_nowait()
            results[item.idx] = await _request(session, base, model, item, request_timeout)

    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=deadline)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return [results.get(it.idx, {"idx": it.idx, "status": "failed", "token_ids": [],
                                 "error": f"not done within the {deadline:.0f} s deadline"})
            for it in items]


# ---------------------------------------------------------------------- offline reference
def _engine_kwargs(args) -> dict:
    return dict(attention_backend="SEPLLM", additional_config={"sepllm": args.sepllm},
                dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.chunk,
                kv_cache_memory_bytes=args.kv_cache_gib << 30, seed=0)


def reference_main(plan_path: str, out_path: str, engine_kwargs: str) -> None:
    """Subprocess body: offline ``LLM.generate`` of the planned requests."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    data = json.loads(Path(plan_path).read_text())
    llm = LLM(model=data["model"], **json.loads(engine_kwargs))
    params = [SamplingParams(max_tokens=it["max_tokens"], temperature=0.0, ignore_eos=True)
              for it in data["items"]]
    outs = llm.generate([TokensPrompt(prompt_token_ids=it["prompt"]) for it in data["items"]],
                        params, use_tqdm=False)
    Path(out_path).write_text(json.dumps(
        {str(it["idx"]): list(o.outputs[0].token_ids) for it, o in zip(data["items"], outs)}))


class OfflineReference:
    """``LLM.generate`` of ``items`` in a subprocess (started at construction, so it overlaps
    the server's start-up); :meth:`result` waits for it."""

    def __init__(self, model: str, items: list[Item], args, workdir: Path) -> None:
        self.workdir, self.timeout = workdir, args.reference_timeout
        plan_path, self.out_path = workdir / "plan.json", workdir / "reference.json"
        plan_path.write_text(json.dumps({"model": model, "items": [dataclasses.asdict(it)
                                                                    for it in items]}))
        self.log = open(workdir / "reference.log", "w")
        self.t0 = time.monotonic()
        self.seconds = None
        from vllm_sepllm.testing.server import upper_cores_env

        # The reference gets the upper half of the cores, so that it and the starting server
        # do not share one.
        env = {**os.environ, **upper_cores_env()}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--reference", str(plan_path),
             str(self.out_path), json.dumps(_engine_kwargs(args))],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def result(self) -> dict[int, list[int]]:
        try:
            rc = self.proc.wait(timeout=max(1.0, self.t0 + self.timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.seconds = time.monotonic() - self.t0
        if rc != 0:
            raise RuntimeError("offline reference failed: "
                               + (self.workdir / "reference.log").read_text()[-3000:])
        return {int(k): v for k, v in json.loads(self.out_path.read_text()).items()}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------------- the test
_COUNTERS = ("vllm:sepllm_evicted_tokens_total", "vllm:sepllm_freed_blocks_total",
             "vllm:sepllm_compactions_total", "vllm:sepllm_moved_tokens_total",
             "vllm:sepllm_compaction_seconds_total", "vllm:sepllm_eviction_seconds_total",
             "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
             'vllm:request_success_total{finished_reason="length"}')
_GAUGES = ("vllm:sepllm_kv_blocks_used", "vllm:sepllm_kv_blocks_free",
           "vllm:sepllm_num_requests", "vllm:sepllm_retained_tokens",
           "vllm:sepllm_context_tokens", "vllm:num_requests_running",
           "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def run(args, workdir: Path) -> dict:
    """Serve, load, drain, scrape, stop; then the offline reference. Returns the record."""
    from transformers import AutoTokenizer

    from benchmarks.common import environment
    from vllm_sepllm.testing.model import smollm2_path
    from vllm_sepllm.testing.server import scrape, sepllm_server, wait_idle

    model = args.model or smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model)
    items = plan(tokenizer, args.requests, tuple(args.prompt_tokens), tuple(args.output_tokens),
                 args.abort_frac, args.seed)
    # The offline reference (every request the clients will not drop) runs while the server
    # starts; the load phase begins once both are ready, so it runs alone.
    offline = OfflineReference(model, [it for it in items if it.abort_after is None], args,
                               workdir)
    t_start = time.monotonic()
    try:
        with sepllm_server(model, args.sepllm, workdir / "server.log", max_model_len=MAX_MODEL_LEN,
                           max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.chunk,
                           kv_cache_gib=args.kv_cache_gib) as base:
            startup_s = time.monotonic() - t_start
            reference = offline.result()
            before = scrape(base)
            t0 = time.monotonic()
            results = asyncio.run(drive(base, model, items, args.clients, args.deadline,
                                        args.request_timeout))
            load_s = time.monotonic() - t0
            after = wait_idle(base, timeout=120)
    finally:
        offline.close()

    by_status = {s: sum(r["status"] == s for r in results)
                 for s in ("ok", "aborted", "ended_before_abort", "failed")}
    mismatches = []
    for it, r in zip(items, results):
        if r["status"] == "ok" and r["token_ids"] != reference[it.idx]:
            ref = reference[it.idx]
            first = next((k for k, (x, y) in enumerate(zip(r["token_ids"], ref)) if x != y),
                         min(len(ref), len(r["token_ids"])))
            mismatches.append({"idx": it.idx, "prompt_tokens": len(it.prompt),
                               "stream": it.stream, "first_diff": first})
    metrics = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in _COUNTERS}
    metrics.update({name: after.get(name) for name in _GAUGES})
    latencies = [r["latency_s"] for r in results if r["status"] == "ok"]
    ttfts = [r["ttft_s"] for r in results if r["status"] == "ok" and "ttft_s" in r]
    out_tokens = sum(len(r["token_ids"]) for r in results)
    checks = {
        "no_failed_requests": by_status["failed"] == 0,
        "outputs_equal_offline": not mismatches,
        # vLLM's request_success does not count client aborts; a dropped request the engine
        # had run to its end would count, as "length": so none did, all were cut mid-stream.
        "aborted_mid_stream": by_status["aborted"] >= 1
        and not by_status["ended_before_abort"] and metrics[
            'vllm:request_success_total{finished_reason="length"}'] == by_status["ok"],
        "evicted_tokens": metrics["vllm:sepllm_evicted_tokens_total"] > 0,
        "no_blocks_left": after.get("vllm:sepllm_kv_blocks_used") == 0,
        "no_records_left": after.get("vllm:sepllm_num_requests") == 0,
    }
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "requests": len(items),
        "clients": args.clients,
        "streamed": sum(it.stream for it in items),
        "planned_aborts": sum(it.abort_after is not None for it in items),
        "status": by_status,
        "failures": [{"idx": r["idx"], "error": r["error"]} for r in results
                     if r["status"] == "failed"][:20],
        "mismatches": mismatches[:20],
        "num_mismatches": len(mismatches),
        "prompt_tokens": {"min": args.prompt_tokens[0], "max": args.prompt_tokens[1],
                          "total": sum(len(it.prompt) for it in items)},
        "output_tokens": {"min": args.output_tokens[0], "max": args.output_tokens[1],
                          "received": out_tokens},
        "timing_s": {"server_startup": round(startup_s, 1), "load": round(load_s, 1),
                     "offline_reference_incl_startup": round(offline.seconds, 1)},
        "requests_per_s": round(len(items) / load_s, 2),
        "out_tok_per_s": round(out_tokens / load_s, 1),
        "latency_s": {"p50": _pct(latencies, 0.5), "p90": _pct(latencies, 0.9),
                      "p99": _pct(latencies, 0.99), "max": _pct(latencies, 1.0),
                      "mean": round(statistics.fmean(latencies), 3) if latencies else None},
        "ttft_s_streamed": {"p50": _pct(ttfts, 0.5), "p90": _pct(ttfts, 0.9)},
        "metrics": metrics,
        "settings": {"sepllm": args.sepllm, "dtype": "float32", "max_model_len": MAX_MODEL_LEN,
                     "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.chunk,
                     "kv_cache_gib": args.kv_cache_gib, "abort_frac": args.abort_frac,
                     "seed": args.seed},
        "environment": environment(),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model dir (default: SmolLM2-135M)")
    p.add_argument("--sepllm", type=json.loads, default=SEPLLM,
                   help=f"SepLLM settings, JSON (default {json.dumps(SEPLLM)})")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=[100, 1200])
    p.add_argument("--output-tokens", type=int, nargs=2, default=[4, 64])
    p.add_argument("--abort-frac", type=float, default=0.05)
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: --clients")
    p.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens")
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--deadline", type=float, default=3600.0, help="client phase, seconds")
    p.add_argument("--request-timeout", type=float, default=1200.0)
    p.add_argument("--reference-timeout", type=float, default=3600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON record here")
    p.add_argument("--workdir", default=None, help="server/reference logs (default: temp)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--reference":
        reference_main(*argv[1:4])
        return 0
    args = parser().parse_args(argv)
    if args.max_num_seqs is None:
        args.max_num_seqs = args.clients
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        record = run(args, workdir)
    text = json.dumps(record, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
