"""Kernel micro-benchmarks on one GPU: SepLLM decode/prefill attention vs vLLM's FlashAttention,
and the cost of the compaction op.

    python benchmarks/kernels.py --out benchmarks/results/kernels_h200.json

Shape: Llama-3-8B attention (Hq 32, Hkv 8, head size 128, bf16, block size 16).

* decode: ``sepllm_decode`` vs FlashAttention (as ``SepLLMImpl._flash_decode`` calls it) over the
  same paged caches, batch x cache length. ``gpu_us`` is the median GPU time of one call (L2
  flushed before each call, the flush covers the launch); ``eager_us`` is the wall time per call
  of back-to-back eager calls (includes Python/launch overhead); ``gbps`` = KV bytes read /
  ``gpu_us``. ``max_diff`` compares the two outputs.
* compact: one decode step's compaction (B moves of one slot, 32 layers) with the CUDA op
  (``torch.ops.vllm_sepllm.compact_kv``, when built) and with the torch fallback.
* fa_paging: one decode layer of FA3 as the backend calls it, by KV block size and split
  policy (``graph``: vLLM's split bound with FA3's ahead-of-time schedule, what a CUDA-graph
  replay runs; ``1``: unsplit; ``auto``: FA3's heuristic, eager).
* decode_tune: batched eviction's decode shape (512 and 256 rows of 324-356 cached keys): FA3
  as the backend calls it there, vLLM's Triton unified attention, and ``sepllm_decode`` at each
  launch setting (keys per tile, warps, stages); then longer caches (~1K, ~2K, ~4K keys) at
  batches that fill the GPU, and other head layouts per rank (Llama-3-70B at TP=4: 16 over 2 KV
  heads; Qwen2.5-7B: 28 over 4), with four settings; ``max_diff`` against FA3.
* prefill: ``sepllm_prefill`` (SepLLM mask, a4 s64 w512) vs FlashAttention varlen causal, chunks
  of 2048 new tokens after ~580 cached keys (R(n) of a 4096-token history: 4 sinks, 64
  separators, 511 window keys); tokens/s of query tokens. ``meta_us`` is the
  per-step (not per-layer) cost of ``prefill_key_meta``.

Writes JSON (with GPU name, versions, commit) to ``--out`` and, if matplotlib imports, a PNG next
to it; ``--plot-only JSON`` (no GPU needed) reprints the summary table and redraws the PNG.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# This file is benchmarks/kernels.py: drop its folder from the path so that `import kernels`
# finds the package, and let installed copies (which carry the built CUDA extension) win over
# the source tree, which is only the fallback.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.append(str(ROOT))

import kernels  # noqa: E402
import vllm_sepllm  # noqa: E402
from benchmarks.common import NO_PLOT, environment, pyplot  # noqa: E402
from kernels import load_compact_kv  # noqa: E402
from kernels.decode import sepllm_decode  # noqa: E402
from kernels.prefill import prefill_key_meta, sepllm_prefill  # noqa: E402
from vllm_sepllm.policy import Retention, retained_positions  # noqa: E402
from vllm_sepllm.reference import move_slots  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE, NUM_LAYERS = 32, 8, 128, 16, 32
DTYPE = torch.bfloat16
SCALE = HEAD_SIZE ** -0.5
BATCHES = [1, 16, 64, 256]
CACHE_LENS = [512, 1024, 4096]
PREFILL_CHUNK, PREFILL_HISTORY, PREFILL_BATCHES = 2048, 4096, [1, 4]
RETENTION = Retention(num_sinks=4, sep_cap=64, window=512)
SEPARATOR_RATE = 0.1  # about the rate of punctuation/newline tokens in prose


class Timer:
    """Median GPU time of a callable: an L2-sized flush before each call keeps the caches cold
    and the GPU busy while the call is launched, so launch gaps do not count."""

    def __init__(self, warmup: int, iters: int) -> None:
        self.warmup, self.iters = warmup, iters
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def gpu_us(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)

    def eager_us(self, fn) -> float:
        """Wall time per call of back-to-back calls: what an eager forward pays."""
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(self.iters):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / self.iters * 1e6


def flash_attention():
    """vLLM's FlashAttention varlen function and version, or None where it is unavailable."""
    try:
        from vllm.v1.attention.backends.fa_utils import (
            flash_attn_varlen_func,
            get_flash_attn_version,
        )
    except ImportError:
        return None
    return flash_attn_varlen_func, get_flash_attn_version()


def paged_cache(lens: list[int], gen: torch.Generator, block_size: int = BLOCK_SIZE,
                num_kv_heads: int = NUM_KV_HEADS):
    """A bf16 cache whose pages are shuffled, and its [B, max_blocks] int32 block table."""
    pages = [-(-n // block_size) for n in lens]
    num_blocks = sum(pages)
    kv_cache = torch.randn(num_blocks, block_size, num_kv_heads, 2 * HEAD_SIZE, dtype=DTYPE,
                           device="cuda")
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_table = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        block_table[b, :n] = perm[used:used + n]
        used += n
    return kv_cache, block_table.cuda()


def decode_case(timer: Timer, fa, batch: int, length: int, gen: torch.Generator) -> dict:
    lens = [length] * batch
    kv_cache, block_table = paged_cache(lens, gen)
    cache_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, NUM_HEADS, HEAD_SIZE, dtype=DTYPE, device="cuda")
    out = torch.empty_like(q)
    kv_bytes = sum(lens) * NUM_KV_HEADS * 2 * HEAD_SIZE * kv_cache.element_size()

    def sepllm():
        sepllm_decode(q, kv_cache, block_table, cache_lens, SCALE, out=out, max_cache_len=length)

    rec = {"batch": batch, "cache_len": length, "kv_bytes": kv_bytes}
    rec["sepllm_gpu_us"] = timer.gpu_us(sepllm)
    rec["sepllm_eager_us"] = timer.eager_us(sepllm)
    rec["sepllm_gbps"] = kv_bytes / rec["sepllm_gpu_us"] / 1e3
    if fa is not None:
        fn, version = fa
        key_cache, value_cache = kv_cache.split(HEAD_SIZE, dim=-1)
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        fa_out = torch.empty_like(q)

        def flash():
            fn(q=q, k=key_cache, v=value_cache, out=fa_out, cu_seqlens_q=cu_q, max_seqlen_q=1,
               seqused_k=cache_lens, max_seqlen_k=length, softmax_scale=SCALE, causal=True,
               block_table=block_table, fa_version=version)

        rec["fa_gpu_us"] = timer.gpu_us(flash)
        rec["fa_eager_us"] = timer.eager_us(flash)
        rec["fa_gbps"] = kv_bytes / rec["fa_gpu_us"] / 1e3
        rec["max_diff"] = (out.float() - fa_out.float()).abs().max().item()
    return rec


def fa_paging_case(timer: Timer, fa, batch: int, length: int, block_size: int, splits: str,
                   gen: torch.Generator) -> dict:
    """One decode layer of FA3 as the SEPLLM backend calls it at ``batch`` rows of ``length``
    cached tokens, by KV block size and split policy: ``graph`` = what a CUDA-graph replay
    runs (vLLM's split bound with FA3's ahead-of-time schedule, as backend.py builds it),
    ``1`` = no split, ``auto`` = FA3's own heuristic (eager)."""
    from vllm.config import AttentionConfig
    from vllm.v1.attention.backends.fa_utils import get_scheduler_metadata

    fn, version = fa
    lens = [length] * batch
    kv_cache, block_table = paged_cache(lens, gen, block_size)
    cache_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, NUM_HEADS, HEAD_SIZE, dtype=DTYPE, device="cuda")
    out = torch.empty_like(q)
    key_cache, value_cache = kv_cache.split(HEAD_SIZE, dim=-1)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    graph_bound = AttentionConfig().flash_attn_max_num_splits_for_cuda_graph  # vLLM's default
    num_splits, sched = {"auto": 0, "1": 1, "graph": graph_bound}[splits], None
    if splits != "auto":
        sched = get_scheduler_metadata(
            batch_size=batch, max_seqlen_q=1, max_seqlen_k=length, num_heads_q=NUM_HEADS,
            num_heads_kv=NUM_KV_HEADS, headdim=HEAD_SIZE, cache_seqlens=cache_lens,
            qkv_dtype=DTYPE, cu_seqlens_q=cu_q, page_size=block_size, causal=True,
            window_size=(-1, -1), num_splits=num_splits)

    def flash():
        fn(q=q, k=key_cache, v=value_cache, out=out, cu_seqlens_q=cu_q, max_seqlen_q=1,
           seqused_k=cache_lens, max_seqlen_k=length, softmax_scale=SCALE, causal=True,
           block_table=block_table, scheduler_metadata=sched, num_splits=num_splits,
           fa_version=version)

    kv_bytes = batch * length * NUM_KV_HEADS * 2 * HEAD_SIZE * kv_cache.element_size()
    rec = {"batch": batch, "cache_len": length, "block_size": block_size, "splits": splits,
           "gpu_us": timer.gpu_us(flash)}
    rec["gbps"] = kv_bytes / rec["gpu_us"] / 1e3
    return rec


def bench_fa_paging(timer: Timer, fa) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    recs = []
    for batch, length in [(512, 340), (64, 340), (512, 1024)]:
        for bs in (16, 32, 64, 128, 256):
            for splits in ("graph", "1", "auto"):
                r = fa_paging_case(timer, fa, batch, length, bs, splits, gen)
                print(f"fa_paging B={batch} len={length} bs={bs:3d} splits={splits:5s} "
                      f"{r['gpu_us']:8.1f} us {r['gbps']:7.0f} GB/s", flush=True)
                recs.append(r)
    return recs


def decode_tune_case(timer: Timer, fa, batch: int, lens: list[int], gen: torch.Generator,
                     configs: list[tuple[int, int, int]],
                     heads: tuple[int, int] = (NUM_HEADS, NUM_KV_HEADS)) -> list[dict]:
    """One decode layer at ``batch`` rows of the given cache lengths (batched eviction's
    steady state): FA3 as the backend calls it at this batch (one split, FA3's ahead-of-time
    schedule), vLLM's Triton unified attention, and our Triton kernel at each launch setting
    ``(tile_n, num_warps, num_stages)``; every output against FA3's. ``heads``: (query, KV)
    heads of one rank."""
    num_heads, num_kv_heads = heads
    kv_cache, block_table = paged_cache(lens, gen, num_kv_heads=num_kv_heads)
    cache_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, num_heads, HEAD_SIZE, dtype=DTYPE, device="cuda")
    kv_bytes = sum(lens) * num_kv_heads * 2 * HEAD_SIZE * kv_cache.element_size()
    key_cache, value_cache = kv_cache.split(HEAD_SIZE, dim=-1)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    max_len = max(lens)
    recs, ref = [], None

    def record(kernel: str, fn, out: torch.Tensor, **extra) -> None:
        nonlocal ref
        us = timer.gpu_us(fn)
        rec = {"batch": batch, "mean_len": round(sum(lens) / batch, 1), "heads": list(heads),
               "kernel": kernel, **extra, "gpu_us": us, "gbps": kv_bytes / us / 1e3}
        if ref is None:
            ref = out.float().clone()
        else:
            rec["max_diff"] = (out.float() - ref).abs().max().item()
        print(f"decode_tune B={batch} H={num_heads}/{num_kv_heads} {kernel:9s} {extra or ''} "
              f"{us:8.1f} us "
              f"{rec['gbps']:7.0f} GB/s", flush=True)
        recs.append(rec)

    if fa is not None:
        from vllm.v1.attention.backends.fa_utils import get_scheduler_metadata

        fn, version = fa
        sched = get_scheduler_metadata(
            batch_size=batch, max_seqlen_q=1, max_seqlen_k=max_len, num_heads_q=num_heads,
            num_heads_kv=num_kv_heads, headdim=HEAD_SIZE, cache_seqlens=cache_lens,
            qkv_dtype=DTYPE, cu_seqlens_q=cu_q, page_size=BLOCK_SIZE, causal=True,
            window_size=(-1, -1), num_splits=1)
        fa_out = torch.empty_like(q)
        record("fa3", lambda: fn(
            q=q, k=key_cache, v=value_cache, out=fa_out, cu_seqlens_q=cu_q, max_seqlen_q=1,
            seqused_k=cache_lens, max_seqlen_k=max_len, softmax_scale=SCALE, causal=True,
            block_table=block_table, scheduler_metadata=sched, num_splits=1,
            fa_version=version), fa_out)
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    except ImportError:
        unified_attention = None
    if unified_attention is not None:
        ua_out = torch.empty_like(q)
        try:
            record("vllm_triton", lambda: unified_attention(
                q=q, k=key_cache, v=value_cache, out=ua_out, cu_seqlens_q=cu_q, max_seqlen_q=1,
                seqused_k=cache_lens, max_seqlen_k=max_len, softmax_scale=SCALE, causal=True,
                window_size=(-1, -1), block_table=block_table, softcap=0, q_descale=None,
                k_descale=None, v_descale=None), ua_out)
        except Exception as exc:  # noqa: BLE001 - another vLLM's signature: record, go on
            recs.append({"batch": batch, "kernel": "vllm_triton", "error": repr(exc)[:300]})
            print(f"decode_tune B={batch} vllm_triton error {exc!r}"[:300], flush=True)
    out = torch.empty_like(q)
    for tile_n, warps, stages in configs:
        record("sepllm", functools.partial(
            sepllm_decode, q, kv_cache, block_table, cache_lens, SCALE, out=out, num_splits=1,
            tile_n=tile_n, num_warps=warps, num_stages=stages), out,
            tile_n=tile_n, num_warps=warps, num_stages=stages)
    return recs


def bench_decode_tune(timer: Timer, fa) -> list[dict]:
    """Batched eviction's decode shape (a4 s64 w256, cache_size 356: 324-356 cached keys)."""
    gen, rng = torch.Generator().manual_seed(2), random.Random(2)
    configs = [(t, w, s) for t in (32, 64, 128) for w in (2, 4, 8) for s in (2, 3, 4)
               if not (t == 128 and w == 2)]
    recs = []
    for batch in (512, 256):
        lens = [rng.randint(324, 356) for _ in range(batch)]
        recs += decode_tune_case(timer, fa, batch, lens, gen, configs)
    # Longer caches (larger windows, exact eviction) at batches that still fill the GPU: the
    # default launch, the many-rows launch and the next best at ~340 keys.
    few = [(64, 4, 3), (32, 2, 2), (128, 4, 3), (32, 2, 3)]
    for batch, low, high in ((512, 960, 1088), (128, 960, 1088), (128, 3840, 4352),
                             (72, 1800, 2200)):
        lens = [rng.randint(low, high) for _ in range(batch)]
        recs += decode_tune_case(timer, fa, batch, lens, gen, few)
    # Other head layouts per rank at batched eviction's lengths: Llama-3-70B at TP=4 (16 query
    # heads over 2 KV heads) and Qwen2.5-7B (28 over 4).
    for batch, heads in ((512, (16, 2)), (512, (28, 4)), (288, (16, 2))):
        lens = [rng.randint(324, 356) for _ in range(batch)]
        recs += decode_tune_case(timer, fa, batch, lens, gen, few, heads)
    return recs


def compact_case(timer: Timer, has_op: bool, caches: list[torch.Tensor], slot_pos: torch.Tensor,
                 slot_sep: torch.Tensor, batch: int) -> dict:
    """One decode step's compaction: each of ``batch`` requests moves one slot, in all layers."""
    perm = torch.randperm(slot_pos.numel(), device="cuda")
    src, dst = perm[:batch], perm[batch:2 * batch]
    moved = batch * len(caches) * caches[0][0, 0].numel() * caches[0].element_size()

    def fallback():
        move_slots([*caches, slot_pos, slot_sep], src, dst)

    def op():
        torch.ops.vllm_sepllm.compact_kv(caches, slot_pos, slot_sep, src, dst)

    rec = {"batch": batch, "layers": len(caches), "bytes_moved": moved,
           "torch_gpu_us": timer.gpu_us(fallback), "torch_eager_us": timer.eager_us(fallback)}
    if has_op:
        rec["cuda_gpu_us"] = timer.gpu_us(op)
        rec["cuda_eager_us"] = timer.eager_us(op)
    return rec


def prefill_batch(batch: int, gen: torch.Generator, rng: random.Random):
    """Requests whose caches hold R(n) of a PREFILL_HISTORY-token history (shuffled, as
    compaction leaves it) followed by a chunk of PREFILL_CHUNK new keys."""
    history = PREFILL_HISTORY
    rows, q_pos = [], []
    for _ in range(batch):
        ids = [1 if rng.random() < SEPARATOR_RATE else 0 for _ in range(history + PREFILL_CHUNK)]
        kept = retained_positions(ids, history, {1}, RETENTION)
        rng.shuffle(kept)
        keys = kept + list(range(history, history + PREFILL_CHUNK))
        rows.append((keys, [ids[p] == 1 for p in keys]))
        q_pos += range(history, history + PREFILL_CHUNK)
    lens = [len(k) for k, _ in rows]
    kv_cache, block_table = paged_cache(lens, gen)
    num_slots = kv_cache.shape[0] * BLOCK_SIZE
    slot_pos = torch.zeros(num_slots, dtype=torch.int32)
    slot_sep = torch.zeros(num_slots, dtype=torch.bool)
    bt = block_table.cpu().long()
    for b, (keys, seps) in enumerate(rows):
        idx = torch.arange(len(keys))
        slots = bt[b, idx // BLOCK_SIZE] * BLOCK_SIZE + idx % BLOCK_SIZE
        slot_pos[slots] = torch.tensor(keys, dtype=torch.int32)
        slot_sep[slots] = torch.tensor(seps)
    qsl = torch.arange(batch + 1, dtype=torch.int32) * PREFILL_CHUNK
    return (kv_cache, block_table, torch.tensor(lens, dtype=torch.int32, device="cuda"),
            qsl.cuda(), torch.tensor(q_pos, device="cuda"), slot_pos.cuda(), slot_sep.cuda())


def prefill_case(timer: Timer, fa, batch: int, gen: torch.Generator,
                 rng: random.Random) -> dict:
    kv_cache, block_table, cache_lens, qsl, q_pos, slot_pos, slot_sep = prefill_batch(
        batch, gen, rng)
    max_len = int(cache_lens.max())
    tokens = batch * PREFILL_CHUNK
    q = torch.randn(tokens, NUM_HEADS, HEAD_SIZE, dtype=DTYPE, device="cuda")
    out = torch.empty_like(q)
    retentions = [RETENTION] * batch

    def meta():
        return prefill_key_meta(slot_pos, slot_sep, block_table, cache_lens, qsl, q_pos,
                                retentions, BLOCK_SIZE, max_cache_len=max_len)

    md = meta()

    def sepllm():
        sepllm_prefill(q, kv_cache, block_table, cache_lens, qsl, q_pos, md, SCALE, out=out,
                       max_query_len=PREFILL_CHUNK)

    r = RETENTION
    rec = {"batch": batch, "chunk": PREFILL_CHUNK, "cached_keys": max_len - PREFILL_CHUNK,
           "retention": f"a{r.num_sinks}s{r.sep_cap}w{r.window}", "meta_us": timer.gpu_us(meta)}
    rec["sepllm_gpu_us"] = timer.gpu_us(sepllm)
    rec["sepllm_tok_per_s"] = tokens / rec["sepllm_gpu_us"] * 1e6
    if fa is not None:
        fn, version = fa
        key_cache, value_cache = kv_cache.split(HEAD_SIZE, dim=-1)
        fa_out = torch.empty_like(q)

        def flash():
            fn(q=q, k=key_cache, v=value_cache, out=fa_out, cu_seqlens_q=qsl,
               max_seqlen_q=PREFILL_CHUNK, seqused_k=cache_lens, max_seqlen_k=max_len,
               softmax_scale=SCALE, causal=True, block_table=block_table, fa_version=version)

        rec["fa_gpu_us"] = timer.gpu_us(flash)
        rec["fa_tok_per_s"] = tokens / rec["fa_gpu_us"] * 1e6
    return rec


def run_cases(name: str, cases) -> list[dict]:
    """Run and print each case (a zero-argument callable returning its record)."""
    records = []
    for case in cases:
        records.append(case())
        print(name, json.dumps(records[-1]), flush=True)
    return records


def bench_decode(timer: Timer, fa) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return run_cases("decode", [functools.partial(decode_case, timer, fa, batch, length, gen)
                                for batch in BATCHES for length in CACHE_LENS])


def bench_compact(timer: Timer) -> list[dict]:
    num_blocks = 4096  # 64K slots per layer; 32 layers hold 8.6 GB of bf16 cache
    caches = [torch.empty(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, 2 * HEAD_SIZE, dtype=DTYPE,
                          device="cuda") for _ in range(NUM_LAYERS)]
    slot_pos = torch.zeros(num_blocks * BLOCK_SIZE, dtype=torch.int32, device="cuda")
    slot_sep = torch.zeros(num_blocks * BLOCK_SIZE, dtype=torch.bool, device="cuda")
    has_op = load_compact_kv()
    return run_cases("compact", [
        functools.partial(compact_case, timer, has_op, caches, slot_pos, slot_sep, batch)
        for batch in BATCHES])


def bench_prefill(timer: Timer, fa) -> list[dict]:
    gen, rng = torch.Generator().manual_seed(1), random.Random(1)
    return run_cases("prefill", [functools.partial(prefill_case, timer, fa, batch, gen, rng)
                                 for batch in PREFILL_BATCHES])


def plot(results: dict, path: Path) -> bool:
    """Decode GB/s, compaction µs and prefill tokens/s; False where matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for length in CACHE_LENS:
        rows = [r for r in results["decode"] if r["cache_len"] == length]
        line, = ax.plot([r["batch"] for r in rows], [r["sepllm_gbps"] for r in rows], "o-",
                        label=f"SepLLM L={length}")
        if rows and "fa_gbps" in rows[0]:
            ax.plot([r["batch"] for r in rows], [r["fa_gbps"] for r in rows], "x--",
                    color=line.get_color(), label=f"FA L={length}")
    ax.set(xscale="log", xlabel="batch", ylabel="GB/s (KV read)", title="decode attention")
    ax.legend(fontsize=7)
    ax = axes[1]
    rows = results["compact"]
    for key, label in (("cuda_gpu_us", "CUDA op"), ("torch_gpu_us", "torch fallback")):
        if rows and key in rows[0]:
            ax.plot([r["batch"] for r in rows], [r[key] for r in rows], "o-", label=label)
    ax.set(xscale="log", yscale="log", xlabel="moves (batch)", ylabel="µs",
           title=f"compaction, {NUM_LAYERS} layers")
    ax.legend(fontsize=7)
    ax = axes[2]
    rows = results["prefill"]
    width = 0.4
    xs = range(len(rows))
    ax.bar([x - width / 2 for x in xs], [r["sepllm_tok_per_s"] for r in rows], width,
           label="SepLLM masked")
    if rows and "fa_tok_per_s" in rows[0]:
        ax.bar([x + width / 2 for x in xs], [r["fa_tok_per_s"] for r in rows], width,
               label="FA causal")
    ax.set_xticks(list(xs), [f"B={r['batch']}" for r in rows])
    cached = rows[0]["cached_keys"] if rows else 0
    ax.set(ylabel="query tokens/s (one layer)",
           title=f"prefill chunk {PREFILL_CHUNK} after {cached} cached keys")
    ax.legend(fontsize=7)
    fig.suptitle(f"{results['env'].get('gpu')}  commit {results['env'].get('commit')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def table(results: dict) -> str:
    """One line per case: decode GB/s, compaction µs, prefill tokens/s (SepLLM | FA)."""
    cols = {"decode": ["batch", "cache_len", "sepllm_gpu_us", "sepllm_gbps", "fa_gpu_us",
                       "fa_gbps", "max_diff"],
            "compact": ["batch", "layers", "cuda_gpu_us", "torch_gpu_us"],
            "prefill": ["batch", "chunk", "cached_keys", "meta_us", "sepllm_gpu_us",
                        "sepllm_tok_per_s", "fa_gpu_us", "fa_tok_per_s"],
            "decode_tune": ["batch", "mean_len", "heads", "kernel", "tile_n", "num_warps",
                            "num_stages", "gpu_us", "gbps", "max_diff"]}
    lines = [f"{results.get('env', {}).get('gpu')}, commit {results.get('env', {}).get('commit')}"]
    for name, keys in cols.items():
        rows = results.get(name) or []
        if rows:
            lines.append(f"{name}: " + " ".join(f"{k:>16}" for k in keys))
            lines += [" " * (len(name) + 2) + " ".join(f"{_fmt(r.get(k)):>16}" for k in keys)
                      for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="JSON path; the plot goes next to it (.png)")
    p.add_argument("--plot-only", metavar="JSON", type=Path,
                   help="reprint the table and redraw the PNG (next to it) of a result")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--only", nargs="*", choices=["decode", "compact", "prefill", "fa_paging",
                                             "decode_tune"],
                   default=["decode", "compact", "prefill"])
    args = p.parse_args()
    if args.plot_only:
        results = json.loads(args.plot_only.read_text())
        print(table(results))
        png = args.plot_only.with_suffix(".png")
        print(f"plot: {png}" if plot(results, png) else NO_PLOT)
        return
    if not args.out:
        p.error("--out is required (or --plot-only JSON)")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU")

    fa = flash_attention()
    timer = Timer(args.warmup, args.iters)
    results = {
        "env": environment(),
        "shape": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_size": HEAD_SIZE,
                  "block_size": BLOCK_SIZE, "dtype": str(DTYPE), "layers": NUM_LAYERS},
        "flash_attn_version": fa[1] if fa else None,
        "compact_kv_extension": load_compact_kv(),
        "sources": {"kernels": kernels.__file__, "vllm_sepllm": vllm_sepllm.__file__},
        "decode": bench_decode(timer, fa) if "decode" in args.only else [],
        "compact": bench_compact(timer) if "compact" in args.only else [],
        "prefill": bench_prefill(timer, fa) if "prefill" in args.only else [],
        "fa_paging": bench_fa_paging(timer, fa) if "fa_paging" in args.only and fa else [],
        "decode_tune": bench_decode_tune(timer, fa) if "decode_tune" in args.only else [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    png = out.with_suffix(".png")
    print(table(results))
    print(f"wrote {out}" + (f" and {png}" if plot(results, png) else
                            f"; {NO_PLOT} (--plot-only {out} draws it)"))


if __name__ == "__main__":
    main()
