"""Kernels (kernels/, csrc/) against their torch references (vllm_sepllm/reference.py).

* Attention kernels pass when their max error against an fp32 torch reference is at most twice
  that of the same-precision torch run, plus one ulp of the dtype at 1.0 (the output rounding).
* ``compact_kv`` is a copy: it must match :func:`vllm_sepllm.reference.move_slots` exactly.
* ``prefill_key_meta`` must give exactly the mask of :func:`vllm_sepllm.reference.sepllm_mask`.

GPU tests carry ``@pytest.mark.gpu``. On CPU, ``test_triton_kernels_under_interpreter`` re-runs
the ``test_interp_*`` tests (tiny fp32 shapes) in a subprocess with ``TRITON_INTERPRET=1``, so
CPU CI exercises the kernels' logic too.
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from kernels.decode import sepllm_decode  # noqa: E402
from kernels.prefill import prefill_key_meta, sepllm_prefill  # noqa: E402
from vllm_sepllm.policy import Retention, retained_positions  # noqa: E402
from vllm_sepllm.reference import (  # noqa: E402
    decode_attention,
    masked_attention,
    move_slots,
    paged_sepllm_attention,
    quantize_fp8,
    sepllm_mask,
)

HEAD_SIZES = [64, 128]
BLOCK_SIZES = [16, 32]
DTYPES = [torch.bfloat16, torch.float16]
GQA = [(8, 8), (32, 8), (9, 3), (28, 4)]  # (Hq, Hkv)
CACHE_LENS = [1, 3, 19, 1177]
NUM_SPLITS = [None, 1, 5]  # None: the heuristic
SEP = 1
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="runs under TRITON_INTERPRET=1")


def assert_close_to_fp32(out, out_torch, ref32):
    """``out`` (kernel) may be at most twice as far from ``ref32`` as ``out_torch`` (the torch
    reference in the kernel's dtype), plus one ulp at the largest output magnitude (the torch
    run can round exactly onto the fp32 result, leaving a zero bound otherwise)."""
    err = (out.float() - ref32).abs().max().item()
    err_torch = (out_torch.float() - ref32).abs().max().item()
    ulp = torch.finfo(out.dtype).eps * max(1.0, ref32.abs().max().item())
    bound = 2 * err_torch + ulp
    assert err <= bound, f"kernel error {err:.3g} > {bound:.3g} (torch error {err_torch:.3g})"


def paged_cache(cache_lens, num_kv_heads, head_size, block_size, dtype, device, gen):
    """A KV cache with shuffled pages for requests of ``cache_lens`` keys.

    Returns (kv_cache [num_blocks, block_size, Hkv, 2D], block_table [B, max_blocks] int32,
    slots [B, Lmax] int64 (0 past a row's end), valid [B, Lmax] bool). Unused block-table
    entries hold other (stale) page ids, as vLLM's may.
    """
    pages = [-(-n // block_size) for n in cache_lens]
    max_pages = max(pages) + 1
    num_blocks = sum(pages) + 3
    kv_cache = torch.randn(num_blocks, block_size, num_kv_heads, 2 * head_size, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = torch.randint(0, num_blocks, (len(cache_lens), max_pages), generator=gen)
    used = 0
    for b, n in enumerate(pages):
        block_table[b, :n] = perm[used:used + n]
        used += n
    lmax = max(cache_lens)
    idx = torch.arange(lmax)
    valid = idx[None, :] < torch.tensor(cache_lens)[:, None]
    slots = (block_table[:, idx // block_size] * block_size + idx % block_size)
    slots = slots.masked_fill(~valid, 0)
    return (kv_cache.to(device=device, dtype=dtype), block_table.to(device, torch.int32),
            slots.to(device), valid.to(device))


# ------------------------------------------------------------------------------ decode
#: fp8 scales: powers of two, so the dequantized K/V are exact in 16-bit and the torch
#: reference in the query's dtype sees the very values the kernels compute with.
FP8_SCALES = (0.5, 0.25)


def to_fp8(kv_cache, k_scale, v_scale):
    """A 16/32-bit cache quantized as vLLM's KV write does: e4m3 bytes of x / scale (uint8)."""
    d = kv_cache.shape[-1] // 2
    return torch.cat([quantize_fp8(kv_cache[..., :d], k_scale),
                      quantize_fp8(kv_cache[..., d:], v_scale)], dim=-1)


def check_decode(cache_lens, gqa, head_size, block_size, dtype, num_splits, device, seed=0,
                 fp8=False):
    """The Triton decode kernel equals the torch reference; ``fp8``: over an fp8 cache with
    scales FP8_SCALES, which the references dequantize."""
    gen = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads = gqa
    kv_cache, block_table, slots, valid = paged_cache(
        cache_lens, num_kv_heads, head_size, block_size, torch.float32 if fp8 else dtype,
        device, gen)
    scales = []
    if fp8:  # |x| / scale up to ~40: e4m3 reaches 448
        kv_cache = to_fp8(kv_cache * 2, *FP8_SCALES)
        scales = [torch.tensor([x], device=device) for x in FP8_SCALES]
    q = torch.randn(len(cache_lens), num_heads, head_size, generator=gen).to(device, dtype)
    lens = torch.tensor(cache_lens, dtype=torch.int32, device=device)
    scale = head_size ** -0.5

    out = sepllm_decode(q, kv_cache, block_table, lens, scale, num_splits=num_splits,
                        max_cache_len=max(cache_lens),
                        **dict(zip(("k_scale", "v_scale"), scales)))
    flat = kv_cache.view(-1, num_kv_heads, 2 * head_size)
    ref32 = decode_attention(q.float(), flat if fp8 else flat.float(), slots, valid, scale,
                             *scales)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, atol=1e-5, rtol=1e-5)
    else:
        assert_close_to_fp32(out, decode_attention(q, flat, slots, valid, scale, *scales), ref32)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 5])
@pytest.mark.parametrize("gqa", [(32, 8), (28, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 128])
def test_decode_fp8(head_size, dtype, gqa, num_splits):
    check_decode([1177, 654, 19, 1], gqa, head_size, 16, dtype, num_splits, "cuda", fp8=True)


@interpreter_only
@pytest.mark.parametrize("num_splits", [1, 3])
def test_interp_decode_fp8(num_splits):
    check_decode([150, 19, 3, 1], (9, 3), 64, 16, torch.float32, num_splits, "cpu", fp8=True)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", NUM_SPLITS)
@pytest.mark.parametrize("cache_len", CACHE_LENS)
@pytest.mark.parametrize("gqa", GQA)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_decode(head_size, block_size, dtype, gqa, cache_len, num_splits):
    # The longest row, a shorter one and a single key, batched together.
    lens = [cache_len, max(cache_len * 5 // 9, 1), 1]
    check_decode(lens, gqa, head_size, block_size, dtype, num_splits, "cuda")


def test_launch_settings_fill_the_gpu_rule(monkeypatch):
    """The many-rows launch (measured fastest at batched eviction's shape) is taken exactly
    when one split per (request, KV head) gives every SM 4 programs, heads are <= 128 wide and
    cache elements are at most 2 bytes."""
    from kernels import decode

    monkeypatch.setattr(decode, "_num_sms", lambda device: 132)
    dev = torch.device("cuda")  # a device object only
    assert decode.fills_gpu(66, 8, dev) and not decode.fills_gpu(65, 8, dev)
    assert decode.launch_settings(512, 8, 128, 1, dev) == decode._FULL_GPU_LAUNCH
    assert decode.launch_settings(66, 8, 64, 1, dev) == decode._FULL_GPU_LAUNCH
    default = (decode._tile_n(128), decode._NUM_WARPS, decode._NUM_STAGES)
    assert decode.launch_settings(65, 8, 128, 1, dev) == default
    assert decode.launch_settings(512, 8, 128, 2, dev) == default  # split: the merge's shape
    assert decode.launch_settings(512, 8, 256, 1, dev) == (decode._tile_n(256),
                                                           decode._NUM_WARPS, decode._NUM_STAGES)
    assert decode.launch_settings(512, 8, 128, 1, dev, kv_bytes=1) == decode._FULL_GPU_LAUNCH
    assert decode.launch_settings(512, 8, 128, 1, dev, kv_bytes=4) == default  # fp32 cache


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gqa", [(32, 8), (28, 4)])
@pytest.mark.parametrize("head_size", [64, 128])
def test_decode_many_rows_launch(head_size, gqa, dtype):
    """A batch that fills the GPU unsplit takes the many-rows launch settings: exact against
    the reference, rows of 1 to 400 keys (batched eviction's lengths and short rows)."""
    from kernels.decode import _FULL_GPU_LAUNCH, launch_settings

    batch = 4 * torch.cuda.get_device_properties(0).multi_processor_count // gqa[1] + 3
    assert launch_settings(batch, gqa[1], head_size, 1, torch.device("cuda")) == \
        _FULL_GPU_LAUNCH
    rng = torch.Generator().manual_seed(11)
    lens = torch.randint(1, 401, (batch,), generator=rng).tolist()
    lens[:3] = [1, 356, 400]
    check_decode(lens, gqa, head_size, 16, dtype, 1, "cuda")


def check_decode_into_view(num_splits, dtype, device):
    """``out`` may be a strided view (rows of a larger buffer): the kernel writes exactly what it
    writes into a fresh tensor, and nothing else."""
    gen = torch.Generator().manual_seed(1)
    kv_cache, block_table, _, _ = paged_cache([300, 7], 2, 64, 16, dtype, device, gen)
    q = torch.randn(2, 4, 64, generator=gen).to(device, dtype)
    lens = torch.tensor([300, 7], dtype=torch.int32, device=device)
    buf = torch.zeros(2, 6, 64, dtype=dtype, device=device)
    sepllm_decode(q, kv_cache, block_table, lens, 0.125, out=buf[:, 1:5], num_splits=num_splits)
    fresh = sepllm_decode(q, kv_cache, block_table, lens, 0.125, num_splits=num_splits)
    assert torch.equal(buf[:, 1:5], fresh)
    assert not buf[:, [0, 5]].any()


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_into_view(num_splits):
    check_decode_into_view(num_splits, torch.float16, "cuda")


@interpreter_only
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("head_size", [64, 80])
@pytest.mark.parametrize("gqa", [(4, 4), (9, 3)])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_interp_decode(block_size, gqa, head_size, num_splits):
    check_decode([150, 19, 3, 1], gqa, head_size, block_size, torch.float32, num_splits, "cpu")


@interpreter_only
@pytest.mark.parametrize("num_splits", [1, 3])
def test_interp_decode_into_view(num_splits):
    check_decode_into_view(num_splits, torch.float32, "cpu")


def check_decode_padded(num_splits, dtype, device):
    """Rows of length 0 (CUDA-graph padding: seq_len 0, null block) give zeros, not NaN, with
    any fixed split count, and leave the real rows exact."""
    gen = torch.Generator().manual_seed(2)
    lens_list = [150, 1, 19, 1]
    kv_cache, block_table, slots, valid = paged_cache(lens_list, 2, 64, 16, dtype, device, gen)
    q = torch.randn(4, 4, 64, generator=gen).to(device, dtype)
    lens = torch.tensor([150, 0, 19, 0], dtype=torch.int32, device=device)
    out = sepllm_decode(q, kv_cache, block_table, lens, 0.125, num_splits=num_splits)
    assert torch.isfinite(out).all()
    assert not out[[1, 3]].any()
    flat = kv_cache.view(-1, 2, 128)
    real = [0, 2]
    ref = decode_attention(q[real].float(), flat.float(), slots[real], valid[real], 0.125)
    if dtype == torch.float32:
        torch.testing.assert_close(out[real], ref, atol=1e-5, rtol=1e-5)
    else:
        ref_same = decode_attention(q[real], flat, slots[real], valid[real], 0.125)
        assert_close_to_fp32(out[real], ref_same, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3, 32])
def test_decode_padded_rows(num_splits):
    check_decode_padded(num_splits, torch.bfloat16, "cuda")


@interpreter_only
@pytest.mark.parametrize("num_splits", [1, 3])
def test_interp_decode_padded_rows(num_splits):
    check_decode_padded(num_splits, torch.float32, "cpu")


def _graph_decode_case(kernel, flash_splits=32, fp8=False, full_triton=False):
    """The backend's uniform-decode path (``SepLLMImpl._plain``) captured in a CUDA
    graph, then replayed after the persistent inputs changed in place (new lengths, pages,
    queries, KV): replay must equal the torch reference of the *new* inputs. FlashAttention
    with vLLM's split bound (32) and unsplit (1, what the builder gives large batches);
    ``full_triton``: FlashAttention's backend at a captured batch that fills the GPU, where
    the builder picks our unsplit Triton kernel (``SepLLMMetadata.decode_kernel``).

    ``fp8``: an e4m3 cache with scales (0.5, 0.25) and q_scale 0.5. The Triton kernel keeps bf16
    queries and meets the usual bound; FA3 reads e4m3 queries (quantized by the backend) and rounds the
    softmax weights to e4m3 before P.V, so it is held to 5% of the output's magnitude against
    the reference with the same quantized queries (a key read wrongly moves it by ~100%)."""
    from types import SimpleNamespace

    from vllm_sepllm.backend import SepLLMImpl, SepLLMMetadata, _flash_attn
    from vllm_sepllm.reference import FP8

    flash = _flash_attn()
    if kernel == "flash" and flash is None:
        pytest.skip("vLLM FlashAttention is not available")
    num_heads, num_kv_heads, head_size, block_size, dtype = 32, 8, 128, 16, torch.bfloat16
    max_len, batch, padded = 1177, 5, 8  # 5 live rows padded to a captured batch of 8
    if full_triton:  # FlashAttention backend, a captured batch that fills the GPU: Triton
        padded = 4 * torch.cuda.get_device_properties(0).multi_processor_count // 8 + 1
    gen = torch.Generator().manual_seed(3)
    capacity = padded * (-(-max_len // block_size)) + 4
    kv = torch.randn(capacity, block_size, num_kv_heads, 2 * head_size, generator=gen)
    kv = kv.to("cuda", dtype)
    scales = [torch.tensor([x], device="cuda") for x in FP8_SCALES] if fp8 else \
        [torch.ones(1, device="cuda")] * 2
    if fp8:
        kv = to_fp8(kv, *FP8_SCALES)
    q_scale = 0.5 if fp8 else 1.0  # FA3 reads e4m3 queries: fp8(q / q_scale), descaled
    layer = SimpleNamespace(_q_scale=torch.tensor([q_scale], device="cuda"), _k_scale=scales[0],
                            _v_scale=scales[1])
    table = torch.zeros(padded, -(-max_len // block_size), dtype=torch.int32, device="cuda")
    lens = torch.zeros(padded, dtype=torch.int32, device="cuda")
    qsl = torch.arange(padded + 1, dtype=torch.int32, device="cuda")
    q = torch.zeros(padded, num_heads, head_size, dtype=dtype, device="cuda")
    out = torch.zeros_like(q)

    def fill(cache_lens):
        perm = torch.randperm(capacity - 1, generator=gen) + 1  # block 0: the null block
        table.zero_()
        used = 0
        for b, n in enumerate(cache_lens):
            pages = -(-n // block_size)
            table[b, :pages] = perm[used:used + pages].to("cuda", torch.int32)
            used += pages
        lens.zero_()
        lens[:len(cache_lens)] = torch.tensor(cache_lens, dtype=torch.int32)
        q.copy_(torch.randn(q.shape, generator=gen))
        new_kv = torch.randn(kv.shape, generator=gen)
        kv.copy_(to_fp8(new_kv * 2, *FP8_SCALES) if fp8 else new_kv)

    impl = SepLLMImpl.__new__(SepLLMImpl)
    impl.num_heads, impl.head_size, impl.num_kv_heads = num_heads, head_size, num_kv_heads
    impl.scale, impl.flash, impl.decode_kernel = head_size ** -0.5, flash, kernel
    if full_triton:  # FA3 unreachable: ignoring SepLLMMetadata.decode_kernel would fail here
        impl.flash = None
    impl.fp8 = fp8
    sched_buf = torch.zeros(1 + 4 * 2 * 4, dtype=torch.int32, device="cuda") \
        if kernel == "flash" and flash.version == 3 and not full_triton else None

    def metadata(max_seq_len):
        splits, sched = (flash_splits, None) if kernel == "flash" else (9, None)
        if full_triton:
            splits = 1
        if sched_buf is not None:
            s = flash.scheduler_metadata(
                batch_size=padded, max_seqlen_q=1, max_seqlen_k=max_seq_len,
                num_heads_q=num_heads, num_heads_kv=num_kv_heads, headdim=head_size,
                cache_seqlens=lens, qkv_dtype=FP8 if fp8 else dtype, cu_seqlens_q=qsl,
                page_size=block_size,
                causal=True, window_size=(-1, -1), num_splits=splits)
            sched_buf[:s.shape[0]] = s
            sched_buf[s.shape[0]:] = 0
            sched = sched_buf[:s.shape[0]]
        return SepLLMMetadata(
            num_actual_tokens=padded, slot_mapping=torch.full((padded,), -1, device="cuda"),
            decode_rows=None, decode_block_table=table, decode_cache_lens=lens,
            decode_max_len=max_seq_len, decode_slots=None, decode_valid=None, prefills=[],
            query_start_loc=qsl, num_splits=splits, scheduler_metadata=sched,
            decode_kernel="triton" if full_triton else None)

    fill([max_len, 3, 300, 1, 19])
    md = metadata(max_len)
    impl._plain(layer, q, kv, md, out)  # warm-up (Triton compiles outside the capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        impl._plain(layer, q, kv, md, out)
    for cache_lens in ([19, 1177, 1, 700, 64], [1, 1, 2, 3, 5]):
        fill(cache_lens)
        metadata(max(cache_lens))  # refreshes the FA3 schedule buffer in place, as build() does
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        idx = torch.arange(max_len, device="cuda")
        valid = idx[None, :] < lens[:batch, None]
        slots = (table[:batch, idx // block_size].long() * block_size + idx % block_size)
        slots = slots.masked_fill(~valid, 0)
        flat = kv.view(-1, num_kv_heads, 2 * head_size)
        scale = head_size ** -0.5
        if fp8 and kernel == "flash":
            q8 = quantize_fp8(q[:batch], q_scale).view(FP8).float() * q_scale
            ref32 = decode_attention(q8, flat, slots, valid, scale, *scales)
            err = (out[:batch].float() - ref32).abs().max().item()
            assert err <= 0.05 * ref32.abs().max().item(), err
            continue
        flat32 = flat if fp8 else flat.float()
        ref32 = decode_attention(q[:batch].float(), flat32, slots, valid, scale, *scales)
        same = decode_attention(q[:batch], flat, slots, valid, scale, *scales)
        assert_close_to_fp32(out[:batch], same, ref32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plain_mixed_step_flash(dtype):
    """Batched eviction (``cache_size``): a step mixing prefill chunks and decodes runs as one
    FlashAttention call (``SepLLMImpl._plain``, ``max_query_len > 1``): row b's queries are the
    last ``q_b`` of its ``L_b`` cache indices, each sees the indices up to its own. Compared
    with the torch reference of exactly that visibility."""
    from types import SimpleNamespace

    from vllm_sepllm.backend import SepLLMImpl, SepLLMMetadata, _flash_attn

    flash = _flash_attn()
    if flash is None:
        pytest.skip("vLLM FlashAttention is not available")
    num_heads, num_kv_heads, head_size, block_size = 32, 8, 128, 16
    qlens = [1, 7, 130, 1, 512, 2]
    lens = [300, 7, 420, 1, 1500, 33]  # cache length after this step's writes
    gen = torch.Generator().manual_seed(5)
    max_blocks = -(-max(lens) // block_size)
    capacity = sum(-(-n // block_size) for n in lens) + 3
    kv = torch.randn(capacity, block_size, num_kv_heads, 2 * head_size, generator=gen)
    kv = kv.to("cuda", dtype)
    perm = (torch.randperm(capacity - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        pages = -(-n // block_size)
        table[b, :pages] = torch.tensor(perm[used:used + pages], dtype=torch.int32)
        used += pages
    table = table.cuda()
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32,
                       device="cuda")
    q = torch.randn(sum(qlens), num_heads, head_size, generator=gen).to("cuda", dtype)
    out = torch.full_like(q, float("nan"))
    impl = SepLLMImpl.__new__(SepLLMImpl)
    impl.num_heads, impl.head_size, impl.num_kv_heads = num_heads, head_size, num_kv_heads
    impl.scale, impl.flash, impl.decode_kernel = head_size ** -0.5, flash, "flash"
    impl.fp8 = False
    md = SepLLMMetadata(
        num_actual_tokens=q.shape[0], slot_mapping=torch.full((q.shape[0],), -1, device="cuda"),
        decode_rows=None, decode_block_table=table,
        decode_cache_lens=torch.tensor(lens, dtype=torch.int32, device="cuda"),
        decode_max_len=max(lens), decode_slots=None, decode_valid=None, prefills=[],
        query_start_loc=qsl, num_splits=0, scheduler_metadata=None, max_query_len=max(qlens))
    one = torch.ones(1, device="cuda")
    impl._plain(SimpleNamespace(_q_scale=one, _k_scale=one, _v_scale=one), q, kv, md, out)
    torch.cuda.synchronize()
    flat = kv.view(-1, num_kv_heads, 2 * head_size)
    for b, (ql, n) in enumerate(zip(qlens, lens)):
        idx = torch.arange(n, device="cuda")
        slots = table[b, idx // block_size].long() * block_size + idx % block_size
        k, v = flat[slots][..., :head_size], flat[slots][..., head_size:]
        mask = idx[None, :] <= (n - ql + torch.arange(ql, device="cuda"))[:, None]
        rows = slice(int(qsl[b]), int(qsl[b + 1]))
        ref32 = masked_attention(q[rows], k, v, mask, impl.scale, upcast=True)
        same = masked_attention(q[rows], k, v, mask, impl.scale)
        assert_close_to_fp32(out[rows], same, ref32)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,fp8", [
    (k, f) for k in ["flash", "triton", "flash-unsplit"] for f in (False, True)
] + [("flash-full-triton", False)])  # fp8 caches stay on FA3 (triton_full_decode)
def test_uniform_decode_under_cuda_graph(kernel, fp8):
    if kernel == "flash-unsplit":
        _graph_decode_case("flash", flash_splits=1, fp8=fp8)
    elif kernel == "flash-full-triton":
        _graph_decode_case("flash", full_triton=True)
    else:
        _graph_decode_case(kernel, fp8=fp8)


@pytest.mark.gpu
def test_flash_graph_splits_by_batch():
    """Captured decode batches large enough to fill the GPU get one FA3 split, or our unsplit
    Triton kernel where ``triton_full_decode`` is on; smaller ones FA3 with vLLM's bound (the
    choice depends only on the padded batch, fixed per graph)."""
    from types import SimpleNamespace

    from kernels.decode import min_full_batch
    from vllm_sepllm.backend import SepLLMMetadataBuilder, _flash_attn

    flash = _flash_attn()
    if flash is None or flash.version != 3:
        pytest.skip("FA3 is not available")
    b = SepLLMMetadataBuilder.__new__(SepLLMMetadataBuilder)
    b.decode_kernel, b.flash, b.full_graphs, b.max_graph_tokens = "flash", flash, True, 1024
    b.flash_graph_splits, b.num_heads_q, b.num_heads_kv, b.head_size = 32, 32, 8, 128
    b.block_size, b.kv_cache_spec = 16, SimpleNamespace(dtype=torch.bfloat16)
    b.unsplit_reqs = min_full_batch(8, torch.device("cuda"))
    if torch.cuda.get_device_properties(0).multi_processor_count == 132:  # H100 / H200
        assert b.unsplit_reqs == 66
    b.scheduler_metadata = torch.zeros(1 + 1024 * 4, dtype=torch.int32, device="cuda")
    for full_triton in (False, True):
        b.triton_full_decode = full_triton
        for reqs, want in [(8, 32), (b.unsplit_reqs - 1, 32), (b.unsplit_reqs, 1), (512, 1)]:
            cm = SimpleNamespace(
                num_actual_tokens=reqs, max_query_len=1, num_reqs=reqs, max_seq_len=340,
                seq_lens=torch.full((reqs,), 340, dtype=torch.int32, device="cuda"),
                query_start_loc=torch.arange(reqs + 1, dtype=torch.int32, device="cuda"),
                slot_mapping=None, block_table_tensor=None)
            md = b._build_plain(cm)
            assert md.num_splits == want, (reqs, full_triton)
            # Batches that fill the GPU: our unsplit Triton kernel where the default says so.
            triton = full_triton and reqs >= b.unsplit_reqs
            assert md.decode_kernel == ("triton" if triton else None), (reqs, full_triton)
            assert (md.scheduler_metadata is None) == triton, (reqs, full_triton)
    # A step with prefill chunks (batched eviction's plain path, max_query_len > 1) stays on
    # FlashAttention however many rows: the Triton kernel reads one query per row.
    reqs = 512
    cm = SimpleNamespace(
        num_actual_tokens=reqs + 63, max_query_len=64, num_reqs=reqs, max_seq_len=340,
        seq_lens=torch.full((reqs,), 340, dtype=torch.int32, device="cuda"),
        query_start_loc=torch.arange(reqs + 1, dtype=torch.int32, device="cuda"),
        slot_mapping=None, block_table_tensor=None)
    assert b._build_plain(cm).decode_kernel is None


@pytest.mark.gpu
def test_kv_write_skips_padding_like_reference():
    """CUDA KV write (vLLM's reshape_and_cache_flash on strided views of our layout) equals
    the torch reference ``write_kv``, padded slots (-1) included, with no host sync."""
    from types import SimpleNamespace

    from vllm_sepllm.backend import SepLLMImpl, _flash_attn
    from vllm_sepllm.reference import write_kv

    flash = _flash_attn()
    if flash is None:
        pytest.skip("vLLM FlashAttention ops are not available")
    gen = torch.Generator().manual_seed(4)
    for dtype, hkv, d, cache in [(torch.bfloat16, 8, 128, "auto"), (torch.float16, 3, 64, "auto"),
                                 (torch.bfloat16, 8, 128, "fp8")]:
        kv = torch.randn(40, 16, hkv, 2 * d, generator=gen).to("cuda", dtype)
        if cache == "fp8":  # e4m3 bytes; values past +-448 / scale saturate in both writers
            kv = to_fp8(kv, 1.0, 1.0)
        key = (torch.randn(37, hkv, d, generator=gen) * 300).to("cuda", dtype)
        value = torch.randn(37, hkv, d, generator=gen).to("cuda", dtype)
        slots = torch.randperm(40 * 16, generator=gen)[:33].to("cuda")
        slots[[0, 5, 32]] = -1  # padding
        k_scale, v_scale = (torch.tensor(0.5, device="cuda"), torch.tensor(0.25, device="cuda"))
        expected = kv.clone()
        write_kv(expected, key, value, slots, k_scale, v_scale)
        impl = SepLLMImpl.__new__(SepLLMImpl)
        impl.head_size, impl.flash, impl.kv_cache_dtype = d, flash, cache
        impl.do_kv_cache_update(SimpleNamespace(_k_scale=k_scale, _v_scale=v_scale), key, value,
                                kv, slots)
        assert torch.equal(kv, expected), cache


# ------------------------------------------------------------------------------ prefill
@dataclasses.dataclass
class PrefillBatch:
    """Requests whose compacted caches hold R(n) (shuffled) followed by a chunk [n, n + q)."""

    query_start_loc: list[int]
    cache_lens: list[int]
    q_pos: torch.Tensor  # [T] int64
    slot_pos: torch.Tensor  # [num_slots] int32
    slot_sep: torch.Tensor  # [num_slots] bool
    retentions: list[Retention]


def make_prefill_batch(rows, rng, gen, num_kv_heads, head_size, block_size, dtype, device):
    """``rows``: (n cached logical tokens, chunk length) per request. Returns the batch and
    (kv_cache, block_table)."""
    retentions, keys, seps, q_pos, qsl = [], [], [], [], [0]
    for n, q_len in rows:
        ids = [SEP if rng.random() < 0.2 else 0 for _ in range(n + q_len)]
        r = Retention(rng.randint(0, 4), rng.choice([None, 0, 3, 8]), rng.randint(1, 40))
        kept = retained_positions(ids, n, {SEP}, r)
        rng.shuffle(kept)  # compaction leaves retained keys in any order
        row_keys = kept + list(range(n, n + q_len))
        retentions.append(r)
        keys.append(row_keys)
        seps.append([ids[p] == SEP for p in row_keys])
        q_pos += range(n, n + q_len)
        qsl.append(qsl[-1] + q_len)
    cache_lens = [len(k) for k in keys]
    kv_cache, block_table, slots, valid = paged_cache(
        cache_lens, num_kv_heads, head_size, block_size, dtype, device, gen)
    num_slots = kv_cache.shape[0] * block_size
    # Unused slots hold junk records, as they may after compaction.
    slot_pos = torch.randint(0, 10_000, (num_slots,), dtype=torch.int32)
    slot_sep = torch.rand(num_slots, generator=gen) < 0.5
    for b, row_keys in enumerate(keys):
        s = slots[b, :len(row_keys)].cpu()
        slot_pos[s] = torch.tensor(row_keys, dtype=torch.int32)
        slot_sep[s] = torch.tensor(seps[b])
    batch = PrefillBatch(qsl, cache_lens, torch.tensor(q_pos, device=device),
                         slot_pos.to(device), slot_sep.to(device), retentions)
    return batch, kv_cache, block_table


def check_prefill(rows, gqa, head_size, block_size, dtype, device, seed=0, fp8=False):
    """The Triton masked prefill equals the torch reference; ``fp8``: over an fp8 cache (the
    references dequantize it)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads = gqa
    batch, kv_cache, block_table = make_prefill_batch(
        rows, rng, gen, num_kv_heads, head_size, block_size, dtype, device)
    scales = {}
    if fp8:
        kv_cache = to_fp8(kv_cache.float() * 2, *FP8_SCALES)
        scales = dict(zip(("k_scale", "v_scale"),
                          (torch.tensor([x], device=device) for x in FP8_SCALES)))
    q = torch.randn(batch.query_start_loc[-1], num_heads, head_size, generator=gen)
    q = q.to(device, dtype)
    lens = torch.tensor(batch.cache_lens, dtype=torch.int32, device=device)
    qsl = torch.tensor(batch.query_start_loc, dtype=torch.int32, device=device)
    scale = head_size ** -0.5

    meta = prefill_key_meta(batch.slot_pos, batch.slot_sep, block_table, lens, qsl, batch.q_pos,
                            batch.retentions, block_size)
    out = sepllm_prefill(q, kv_cache, block_table, lens, qsl, batch.q_pos, meta, scale,
                         **scales)

    def reference(upcast):
        return paged_sepllm_attention(
            q, kv_cache, block_table, batch.cache_lens, batch.query_start_loc, batch.q_pos,
            batch.slot_pos, batch.slot_sep, batch.retentions, scale, upcast=upcast, **scales)

    ref32 = reference(upcast=True).float()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, atol=1e-5, rtol=1e-5)
    else:
        assert_close_to_fp32(out, reference(upcast=False), ref32)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", CACHE_LENS)
@pytest.mark.parametrize("gqa", GQA)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_prefill(head_size, block_size, dtype, gqa, chunk):
    # A chunk after a long history, a first chunk, a decode row and a short chunk.
    rows = [(700, chunk), (0, chunk), (300, 1), (45, max(chunk // 3, 1))]
    check_prefill(rows, gqa, head_size, block_size, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("gqa", [(32, 8), (28, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 128])
def test_prefill_fp8(head_size, dtype, gqa):
    rows = [(700, 1177), (0, 19), (300, 1), (45, 392)]
    check_prefill(rows, gqa, head_size, 16, dtype, "cuda", fp8=True)


@interpreter_only
def test_interp_prefill_fp8():
    check_prefill([(90, 19), (0, 21), (60, 1)], (9, 3), 64, 16, torch.float32, "cpu", fp8=True)


@interpreter_only
@pytest.mark.parametrize("head_size", [64, 80])
@pytest.mark.parametrize("gqa", [(4, 4), (9, 3)])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_interp_prefill(block_size, gqa, head_size):
    rows = [(90, 19), (0, 21), (60, 1), (33, 3)]
    check_prefill(rows, gqa, head_size, block_size, torch.float32, "cpu")


def test_triton_kernels_under_interpreter():
    """Runs the ``test_interp_*`` tests on CPU with Triton's interpreter (in a subprocess:
    the switch is read when Triton's decorators run)."""
    if INTERPRETED:
        pytest.skip("already interpreting")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    # Triton's interpreter trips NumPy's array-to-scalar deprecation at every loop bound.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_interp_",
         "-W", "ignore::DeprecationWarning", str(Path(__file__).relative_to(root))],
        cwd=root, env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------------------ mask metadata
def mask_from_meta(meta, b, q_lo, q_hi, length, q_pos):
    """[q_hi - q_lo, length] bool: the kernel's mask rule, evaluated in torch."""
    kp = meta.key_pos[b, :length].long()[None, :]
    kr = meta.key_rank[b, :length].long()[None, :]
    tp = q_pos[q_lo:q_hi].long()[:, None]
    th = meta.q_thresh[q_lo:q_hi].long()[:, None]
    kept = (kp < meta.num_sinks[b]) | (kp > tp - meta.window[b]) | (kr >= th)
    return (kp <= tp) & kept


@pytest.mark.parametrize("seed", range(40))
def test_prefill_key_meta_gives_sepllm_mask(seed):
    """Arbitrary keys and queries (not just compacted states): the metadata's mask equals
    ``sepllm_mask`` entry for entry."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    block_size = rng.choice([4, 16])
    num_rows = rng.randint(1, 4)
    rows, retentions = [], []
    for _ in range(num_rows):
        horizon = rng.randint(1, 150)
        length = rng.randint(1, horizon)
        positions = rng.sample(range(horizon), length)  # any order, no duplicates
        num_q = rng.randint(1, 12)
        q = sorted(rng.sample(range(horizon), min(num_q, horizon)))
        sep_rate = rng.choice([0.0, 0.1, 0.5, 1.0])
        rows.append((positions, [rng.random() < sep_rate for _ in positions], q))
        retentions.append(Retention(rng.randint(0, 6), rng.choice([None, 0, 1, 2, 5, 50]),
                                    rng.randint(1, 40)))
    cache_lens = [len(p) for p, _, _ in rows]
    _, block_table, slots, _ = paged_cache(cache_lens, 1, 1, block_size, torch.float32, "cpu",
                                           gen)
    num_slots = (int(block_table.max()) + 1) * block_size
    slot_pos = torch.randint(0, 1000, (num_slots,), dtype=torch.int32, generator=gen)
    slot_sep = torch.rand(num_slots, generator=gen) < 0.5
    q_pos, qsl = [], [0]
    for b, (positions, seps, q) in enumerate(rows):
        slot_pos[slots[b, :len(positions)]] = torch.tensor(positions, dtype=torch.int32)
        slot_sep[slots[b, :len(positions)]] = torch.tensor(seps)
        q_pos += q
        qsl.append(qsl[-1] + len(q))
    q_pos = torch.tensor(q_pos)
    meta = prefill_key_meta(slot_pos, slot_sep, block_table,
                            torch.tensor(cache_lens, dtype=torch.int32),
                            torch.tensor(qsl, dtype=torch.int32), q_pos, retentions, block_size)
    assert meta.q_thresh.min() >= 0
    for b, (positions, seps, _) in enumerate(rows):
        expected = sepllm_mask(q_pos[qsl[b]:qsl[b + 1]], torch.tensor(positions),
                               torch.tensor(seps), retentions[b])
        got = mask_from_meta(meta, b, qsl[b], qsl[b + 1], len(positions), q_pos)
        assert torch.equal(got, expected), (b, retentions[b])


@pytest.mark.parametrize("seed", range(30))
def test_prefill_chunk_lower_bound_is_tight(seed):
    """``q_kv_lo`` (where the kernel starts scanning a query's chunk) is safe: no key of the
    chunk below it is visible to the query; and tight: the key at it is visible."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    rows = [(rng.choice([0, 2, 5, 40, 300]), rng.choice([1, 2, 17, 90, 260]))
            for _ in range(rng.randint(1, 4))]
    block_size = rng.choice([4, 16])
    batch, _, block_table = make_prefill_batch(rows, rng, gen, 1, 1, block_size, torch.float32,
                                               "cpu")
    lens = torch.tensor(batch.cache_lens, dtype=torch.int32)
    qsl = torch.tensor(batch.query_start_loc, dtype=torch.int32)
    meta = prefill_key_meta(batch.slot_pos, batch.slot_sep, block_table, lens, qsl,
                            batch.q_pos, batch.retentions, block_size)
    for b, (_, q_len) in enumerate(rows):
        length = batch.cache_lens[b]
        c0 = length - q_len
        idx = torch.arange(length)
        slots = block_table[b, idx // block_size].long() * block_size + idx % block_size
        mask = sepllm_mask(batch.q_pos[qsl[b]:qsl[b + 1]], batch.slot_pos[slots],
                           batch.slot_sep[slots], batch.retentions[b])
        for j in range(q_len):
            lo = int(meta.q_kv_lo[qsl[b] + j])
            assert c0 <= lo <= c0 + j, (b, j, lo, c0)
            assert not mask[j, c0:lo].any(), (b, j, lo)
            assert mask[j, lo], (b, j, lo)


# ------------------------------------------------------------------------------ compact_kv
ROW_SHAPES = [  # (Hkv, 2D, dtype): slot row bytes 4096 (16-byte vectors) down to 5 (bytes)
    (8, 256, torch.bfloat16), (3, 10, torch.float16), (1, 3, torch.float16),
    (2, 64, torch.float32), (1, 5, torch.uint8),
    (8, 256, torch.uint8),  # an fp8 cache (vLLM allocates e4m3 as uint8): 8 KV heads of 128
]


def make_caches(num_layers, num_blocks, block_size, row_shape, misalign, gen):
    """Per-layer caches, optionally starting one element past an aligned address (so the op
    must fall back to narrower vectors)."""
    hkv, width, dtype = row_shape
    caches = []
    for _ in range(num_layers):
        numel = num_blocks * block_size * hkv * width
        buf = (torch.randn(numel + 1, generator=gen) * 100).to(dtype)
        caches.append(buf[int(misalign):numel + int(misalign)].view(num_blocks, block_size, hkv,
                                                                    width))
    return caches


@pytest.mark.gpu
@pytest.mark.parametrize("num_moves", [0, 1, 37, 1000])
@pytest.mark.parametrize("misalign", [False, True])
@pytest.mark.parametrize("row_shape", ROW_SHAPES)
@pytest.mark.parametrize("num_layers", [0, 1, 32])
def test_compact_kv_matches_move_slots(num_layers, row_shape, misalign, num_moves):
    from kernels import load_compact_kv

    if not load_compact_kv():
        pytest.skip("vllm_sepllm._C is not built")
    gen = torch.Generator().manual_seed(num_moves + num_layers)
    num_blocks, block_size = 200, 16
    num_slots = num_blocks * block_size
    caches = make_caches(num_layers, num_blocks, block_size, row_shape, misalign, gen)
    slot_pos = torch.randint(0, 1 << 30, (num_slots,), dtype=torch.int32, generator=gen)
    slot_sep = torch.rand(num_slots, generator=gen) < 0.5
    perm = torch.randperm(num_slots, generator=gen)
    src, dst = perm[:num_moves], perm[num_moves:2 * num_moves]

    expected = [t.clone() for t in [*caches, slot_pos, slot_sep]]
    move_slots(expected, src, dst)
    got = [t.cuda() for t in [*caches, slot_pos, slot_sep]]
    torch.ops.vllm_sepllm.compact_kv(got[:-2], got[-2], got[-1], src.cuda(), dst.cuda())
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g.cpu())


@pytest.mark.gpu
def test_compact_kv_under_torch_compile():
    """The fake registration lets the op trace; functionalization must keep its writes."""
    from kernels import load_compact_kv

    if not load_compact_kv():
        pytest.skip("vllm_sepllm._C is not built")
    gen = torch.Generator().manual_seed(0)
    caches = [c.cuda() for c in make_caches(4, 8, 16, ROW_SHAPES[0], False, gen)]
    slot_pos = torch.arange(128, dtype=torch.int32, device="cuda")
    slot_sep = torch.arange(128, device="cuda") % 3 == 0
    src = torch.tensor([100, 7, 64], device="cuda")
    dst = torch.tensor([3, 90, 5], device="cuda")
    torch.library.opcheck(torch.ops.vllm_sepllm.compact_kv.default,
                          ([c.clone() for c in caches], slot_pos.clone(), slot_sep.clone(), src,
                           dst))

    expected = [t.clone() for t in [*caches, slot_pos, slot_sep]]
    move_slots(expected, src, dst)

    @torch.compile(fullgraph=True)
    def step(kv_caches, pos, sep, s, d):
        torch.ops.vllm_sepllm.compact_kv(kv_caches, pos, sep, s, d)

    step(caches, slot_pos, slot_sep, src, dst)
    for e, g in zip(expected, [*caches, slot_pos, slot_sep], strict=True):
        assert torch.equal(e, g)
