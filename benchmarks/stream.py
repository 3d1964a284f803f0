"""One request streams N tokens past the model's context with SepLLM + PE shift; memory and
progress are sampled over time.

H200 (Llama-3-8B shape, dummy weights, 4,194,304 tokens; see benchmarks/README.md "PE shift"):

    python3 benchmarks/stream.py --tokens 4194304 --tokenizer-dir .gpu/tok \\
        --out benchmarks/results/h200_stream_4m.json

CPU smoke test (SmolLM2-135M, real weights):

    .venv/bin/python benchmarks/stream.py --model smollm2 --tokens 20000 --chunk 512 \\
        --dtype float32 --out /tmp/stream_cpu.json

The stream is one prompt of N real-text token ids (the public-domain texts of common.py,
repeated) with ``max_tokens = --decode`` (default 16: decoding continues past the stream).
vLLM prefills it in chunks of ``--chunk`` tokens; SEPLLM evicts between chunks, so the request's
KV stays at most a + s + w + one chunk, and PE shift keeps RoPE positions below that.
``max_model_len`` is N + decode (vLLM's own length check is lifted with its
``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1``, which this script sets: positions never pass the cache).

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that a sampler
thread can read the scheduler every ``--interval`` seconds: tokens computed so far, KV blocks in
use, and memory (GPU: ``torch.cuda.memory_allocated`` and the device's used memory; CPU: RSS).
Writes JSON (samples + summary) and a PNG (tokens/s and memory over time). The summary also
gives the time the worker spent re-rotating keys (``rerotation_s``, its share of the run, and
the number of keys re-rotated): the cost of PE shift.

Memory: a 16-bit KV cache under PE shift keeps a copy of the original keys (+50% of the KV
pool, vllm_sepllm/rope_shift.py), so the pool is sized explicitly (``--kv-bytes``, default
4 GiB on GPU) instead of filling the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    LLAMA3_8B,
    NO_PLOT,
    environment,
    load_texts,
    make_dummy_model,
    pyplot,
)


def stream_ids(tokenizer, n: int) -> list[int]:
    """``n`` token ids of real text: the texts of common.py, repeated as often as needed."""
    ids: list[int] = []
    for text in load_texts().values():
        ids += tokenizer.encode(text, add_special_tokens=False)
    reps = -(-n // len(ids))
    return (ids * reps)[:n]


def rerotation_stats(worker) -> dict:
    """On the worker: time spent re-rotating keys (PE shift) and how many were re-rotated."""
    state = worker.model_runner.sepllm
    return {"seconds": state.rerotate_timer.take(), "keys": state.rerotated_keys}


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


class Sampler(threading.Thread):
    """Reads the in-process scheduler and memory every ``interval`` seconds."""

    def __init__(self, llm, interval: float) -> None:
        super().__init__(daemon=True)
        import torch

        self.cuda = torch.cuda.is_available()
        self.scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        self.interval = interval
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def sample(self) -> dict:
        import psutil
        import torch

        s = self.scheduler
        pool = s.kv_cache_manager.block_pool
        reqs = list(s.requests.values())
        rec = {"t": round(time.perf_counter() - self.t0, 3),
               "tokens": max((r.num_computed_tokens for r in reqs), default=None),
               "kv_blocks_used": pool.num_gpu_blocks - 1 - pool.get_num_free_blocks(),
               "rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1)}
        if self.cuda:
            free, total = torch.cuda.mem_get_info()
            rec["gpu_allocated_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)
            rec["gpu_used_mib"] = round((total - free) / 2**20, 1)
        return rec

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.sample())
            self.stop.wait(self.interval)


def plot(result: dict, out: Path) -> bool:
    """The stream's plot at ``out``; False (nothing drawn) where matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    xs = [s for s in result["samples"] if s["tokens"] is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    rate_t, rate = [], []
    k = max(1, len(xs) // 50)  # tokens arrive a chunk at a time: average over k samples
    for a, b in zip(xs, xs[k:]):
        if b["t"] > a["t"]:
            rate_t.append(b["tokens"] / 1e6)
            rate.append((b["tokens"] - a["tokens"]) / (b["t"] - a["t"]))
    ax1.plot(rate_t, rate, lw=1)
    ax1.set_xlabel("tokens streamed (millions)")
    ax1.set_ylabel("tokens/s (moving average)")
    ax1.grid(alpha=0.3)
    key = "gpu_used_mib" if "gpu_used_mib" in xs[0] else "rss_mib"
    ax2.plot([s["tokens"] / 1e6 for s in xs], [s[key] / 1024 for s in xs],
             label=("GPU memory used" if key == "gpu_used_mib" else "process RSS") + " (GiB)")
    ax2b = ax2.twinx()
    ax2b.plot([s["tokens"] / 1e6 for s in xs], [s["kv_blocks_used"] for s in xs],
              color="tab:orange", label="KV blocks in use")
    ax2.set_xlabel("tokens streamed (millions)")
    ax2.set_ylabel("GiB")
    ax2b.set_ylabel("KV blocks")
    # Headroom above the flat lines (they would sit on the frame).
    ax2.set_ylim(0, 1.2 * max(s[key] for s in xs) / 1024)
    ax2b.set_ylim(0, 2 * max(s["kv_blocks_used"] for s in xs))  # the lines apart
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax2b.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    ax2.grid(alpha=0.3)
    s = result["summary"]
    fig.suptitle(f"{s['model']}: one request, {s.get('tokens_done', s['tokens']):,} tokens, SepLLM {s['config']} + PE "
                 f"shift, {s['tok_per_s']:.0f} tok/s, {s['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4194304)
    p.add_argument("--decode", type=int, default=16, help="tokens generated after the stream")
    p.add_argument("--model", default=None,
                   help="HF folder, or 'smollm2' (real weights); default: Llama-3-8B shape "
                        "with dummy weights")
    p.add_argument("--tokenizer-dir", default=".gpu/tok", help="for the dummy-weight shape")
    p.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    p.add_argument("--sepllm", default='{"num_sinks": 4, "sep_cap": 64, "window": 256}',
                   help="SepLLM settings (JSON); pe_shift is added")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-bytes", type=int, default=4 << 30)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    p.add_argument("--out", default="benchmarks/results/stream.json")
    p.add_argument("--plot", metavar="JSON",
                   help="only reprint the summary and (re)draw the PNG of a result JSON")
    args = p.parse_args()
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        print(json.dumps(result["summary"], indent=1))
        png = Path(args.plot).with_suffix(".png")
        print(f"plot: {png}" if plot(result, png) else NO_PLOT)
        return

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    load_format = "auto"
    if args.model == "smollm2":
        from vllm_sepllm.testing.model import smollm2_path

        model, name = smollm2_path(), "SmolLM2-135M"
    elif args.model:
        model, name = args.model, Path(args.model).name
    else:
        model = str(make_dummy_model(Path(tempfile.mkdtemp(prefix="sepllm-model-")) / "llama3-8b",
                                     Path(args.tokenizer_dir), LLAMA3_8B))
        name, load_format = "Llama-3-8B shape (dummy weights)", "dummy"
    sepllm = dict(json.loads(args.sepllm), pe_shift=True)
    tok = AutoTokenizer.from_pretrained(model)
    ids = stream_ids(tok, args.tokens)

    t0 = time.perf_counter()
    llm = LLM(model=model, load_format=load_format, dtype=args.dtype,
              attention_backend="SEPLLM", additional_config={"sepllm": sepllm},
              max_model_len=args.tokens + args.decode + 8, max_num_seqs=1,
              max_num_batched_tokens=args.chunk, enable_prefix_caching=False,
              kv_cache_memory_bytes=args.kv_bytes, seed=0,
              enforce_eager=args.dtype == "float32")
    startup = time.perf_counter() - t0
    sampler = Sampler(llm, args.interval)
    sampler.samples.append(sampler.sample())
    sampler.start()
    # A `timeout` (SIGTERM) ends the stream early but still writes what was measured.
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.perf_counter()
    out, completed = None, True
    try:
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                           SamplingParams(max_tokens=args.decode, ignore_eos=True,
                                          temperature=0.0), use_tqdm=False)[0]
    except KeyboardInterrupt:
        completed = False
        print("interrupted: writing the partial results")
    elapsed = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    final = sampler.sample()
    if completed:
        final["tokens"] = args.tokens + args.decode
    sampler.samples.append(final)
    done = final["tokens"] or 0

    samples = sampler.samples
    try:
        rot = llm.collective_rpc(rerotation_stats)[0]
    except Exception as e:  # noqa: BLE001 - keep the run's results whatever happens here
        print(f"re-rotation stats unavailable: {e!r}")
        rot = {"seconds": float("nan"), "keys": None}
    key = "gpu_used_mib" if "gpu_used_mib" in samples[0] else "rss_mib"
    steady = [s[key] for s in samples if s["tokens"] and s["tokens"] > args.tokens // 10]
    kv = ((out.kv_transfer_params or {}).get("sepllm") or {}) if out else {}
    cfg = sepllm
    label = (f"a{cfg.get('num_sinks', 4)}s{cfg.get('sep_cap', 64)}w{cfg.get('window', 256)}"
             if cfg.get("mode", "sepllm") == "sepllm" else json.dumps(cfg))
    summary = {
        "model": name, "tokens": args.tokens, "completed": completed, "tokens_done": done,
        "decode_tokens": len(out.outputs[0].token_ids) if out else 0,
        "config": label, "chunk": args.chunk, "dtype": args.dtype,
        "elapsed_s": round(elapsed, 1), "startup_s": round(startup, 1),
        "tok_per_s": round(done / elapsed, 1),
        "memory_key": key,
        "memory_min_mib_after_10pct": min(steady) if steady else None,
        "memory_max_mib_after_10pct": max(steady) if steady else None,
        "kv_blocks_used_max": max(s["kv_blocks_used"] for s in samples),
        "kv_peak_blocks_request": kv.get("peak_kv_blocks"),
        "kv_retained_at_end": kv.get("kv_retained"),
        "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
        "rerotation_s": round(rot["seconds"], 2),
        "rerotation_share": round(rot["seconds"] / elapsed, 4),
        "keys_rerotated": rot["keys"],
        "device": environment().get("gpu"),
    }
    result = {"summary": summary, "samples": samples, **environment()}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    drawn = plot(result, out_path.with_suffix(".png"))
    print(json.dumps(summary, indent=1))
    print(f"wrote {out_path}" + (f" and {out_path.with_suffix('.png')}" if drawn else
                                 f"; {NO_PLOT} (--plot {out_path} draws it)"))


if __name__ == "__main__":
    main()
