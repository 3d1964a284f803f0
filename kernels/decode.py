"""Paged decode attention over SepLLM's compacted KV cache (Triton).

A decode query attends *every* key its request holds: SepLLM compaction leaves exactly the
visible keys in cache indices ``0 .. cache_len - 1``, so the kernel needs no mask, only the
lengths. One program handles one (request, KV head, split) and all ``Hq / Hkv`` query heads of
that KV head, so each KV byte is read once. Long caches with few programs are split along the
keys (split-KV); a second kernel merges the partial results with their log-sum-exps.

Torch reference: :func:`vllm_sepllm.reference.decode_attention`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vllm_sepllm.reference import FP8, is_fp8

#: Softmax runs in base 2 (``exp2`` is one instruction); scores are scaled by log2(e).
LOG2E = 1.4426950408889634
#: Launch settings: warps, and pipeline stages (the loads of the next tiles are in flight while
#: one is computed); see :func:`_tile_n` for the keys per loop iteration.
_NUM_WARPS = 4
_NUM_STAGES = 3
#: Launch settings (keys per tile, warps, stages) when one split per (request, KV head) already
#: fills the GPU (at least 4 programs per SM), heads are at most 128 wide and the cache is 16-bit
#: or fp8: batched eviction's steady decode. H200, Hq 32 / Hkv 8 / D 128, one layer (kernels.py
#: decode_tune, two sweeps; benchmarks/README.md): 512 rows of 324-356 keys 185 and 181 us,
#: against 185 and 195 us with 32/2/2, 215 and 193 us with the settings above and 219 us for
#: FA3; 256 rows 100 us (32/2/2 99, FA3 120); 512 rows of ~1K keys 497 us (32/2/2 495, FA3 532);
#: 128 rows of ~1K keys 141 us (32/2/2 135, FA3 148). Other head layouts not timed with it yet.
_FULL_GPU_LAUNCH = (128, 4, 3)
_FULL_GPU_PROGRAMS_PER_SM = 4
#: Splitting pays while it fills the GPU; below this many keys per split, launch and merge
#: costs dominate.
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 64


def _tile_n(head_size: int) -> int:
    """Keys per loop iteration (a tile may span several pages: slots are looked up per key).
    With these the sm_90 build neither spills nor needs more than ~80 KB of shared memory."""
    return 64 if head_size <= 128 else 32


@triton.jit
def _decode_kernel(
    q_ptr,  # [B, Hq, D]
    kv_ptr,  # [num_blocks, block_size, Hkv, 2D]
    block_table_ptr,  # [B, max_blocks] int32
    cache_lens_ptr,  # [B] int32
    out_ptr,  # [B, Hq, D], written when not SPLIT_KV
    part_out_ptr,  # [B, Hq, num_splits, D] fp32, written when SPLIT_KV
    part_lse_ptr,  # [B, Hq, num_splits] fp32 (base-2 log-sum-exp), written when SPLIT_KV
    k_scale_ptr, v_scale_ptr,  # [1] fp32 dequantization scales of an fp8 cache (KV_FP8)
    qk_scale,  # softmax scale * log2(e)
    num_splits,  # a runtime value: split counts vary step to step, without recompiling
    stride_q_b, stride_q_h,
    stride_kv_block, stride_kv_slot, stride_kv_head,
    stride_bt_b,
    stride_o_b, stride_o_h,
    SPLIT_KV: tl.constexpr,  # num_splits > 1
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_SIZE
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # next power of two >= GROUP, at least 16 (tl.dot's minimum)
    BLOCK_SIZE: tl.constexpr,  # tokens per cache page
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (TF32 would lose ~3 digits)
    KV_FP8: tl.constexpr,  # e4m3 cache: tiles widen to q's dtype (exact), scales applied after
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Each request divides its own keys into num_splits runs of whole tiles, so every split of
    # a long row does equal work whatever the other rows' lengths.
    length = tl.load(cache_lens_ptr + b)
    tiles_per_split = tl.cdiv(tl.cdiv(length, TILE_N), num_splits)
    start = split * tiles_per_split * TILE_N
    end = tl.minimum(start + tiles_per_split * TILE_N, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    head = kv_head * GROUP + offs_g  # query heads of this KV head
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_SIZE
    q_offs = b.to(tl.int64) * stride_q_b + head.to(tl.int64)[:, None] * stride_q_h
    q = tl.load(q_ptr + q_offs + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :],
                other=0.0)

    if KV_FP8:  # s = q . (k8 * k_scale) = (q . k8) * k_scale; likewise V after the sum
        qk_scale = qk_scale * tl.load(k_scale_ptr)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt_b
    kv_head_ptr = kv_ptr + kv_head.to(tl.int64) * stride_kv_head
    for tile_start in range(start, end, TILE_N):
        idx = tile_start + tl.arange(0, TILE_N)
        valid = idx < end
        page = tl.load(bt_row + idx // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = page * stride_kv_block + (idx % BLOCK_SIZE).to(tl.int64) * stride_kv_slot
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(kv_head_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(kv_head_ptr + row[:, None] + HEAD_SIZE + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        if KV_FP8:
            k = k.to(q.dtype)
            v = v.to(q.dtype)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        # Every tile holds at least one valid key, so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (a row shorter than num_splits tiles) has l_i == 0: it stores zeros and a
    # log-sum-exp of -inf, which the merge weighs by zero.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if KV_FP8:
        o = o * tl.load(v_scale_ptr)
    o_mask = g_mask[:, None] & d_mask[None, :]
    if not SPLIT_KV:
        o_offs = b.to(tl.int64) * stride_o_b + head.to(tl.int64)[:, None] * stride_o_h
        tl.store(out_ptr + o_offs + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=o_mask)
    else:
        # Partial buffers are contiguous: [B, Hq, num_splits(, D)].
        part = (b.to(tl.int64) * (GROUP * tl.num_programs(1)) + head.to(tl.int64)) * num_splits
        part += split
        tl.store(part_out_ptr + part[:, None] * HEAD_SIZE + offs_d[None, :], o, mask=o_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g_mask)


@triton.jit
def _merge_kernel(
    part_out_ptr,  # [B, Hq, num_splits, D] fp32
    part_lse_ptr,  # [B, Hq, num_splits] fp32
    out_ptr,  # [B, Hq, D]
    num_splits,
    stride_o_b, stride_o_h,
    BLOCK_S: tl.constexpr,  # next power of two >= num_splits
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_SIZE
    base = (b.to(tl.int64) * tl.num_programs(1) + head) * num_splits
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
    # A row of length 0 (CUDA-graph padding) has only empty splits: all log-sum-exps are -inf;
    # it merges to zeros instead of NaN.
    top = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    o = tl.load(part_out_ptr + (base + offs_s)[:, None] * HEAD_SIZE + offs_d[None, :],
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    total = tl.sum(weight, 0)
    merged = tl.sum(weight[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    o_offs = b.to(tl.int64) * stride_o_b + head.to(tl.int64) * stride_o_h
    tl.store(out_ptr + o_offs + offs_d, merged.to(out_ptr.dtype.element_ty), mask=d_mask)


def fp8_operands(kv_cache: torch.Tensor, q: torch.Tensor, k_scale: torch.Tensor | None,
                 v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cache as the kernels read it and its scales: an fp8 cache (uint8 storage) viewed as
    e4m3 with its scales (default 1); any other cache must have q's dtype (its scale
    arguments are placeholders the kernels never read)."""
    if is_fp8(kv_cache.dtype):
        ones = None if k_scale is not None and v_scale is not None else \
            torch.ones(1, dtype=torch.float32, device=q.device)
        return (kv_cache.view(FP8), ones if k_scale is None else k_scale,
                ones if v_scale is None else v_scale)
    if kv_cache.dtype != q.dtype:
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} != q dtype {q.dtype}")
    return kv_cache, q, q


def dot_precision(dtype: torch.dtype) -> str:
    """Exact fp32 dots for fp32 inputs; the setting is ignored for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def min_full_batch(num_kv_heads: int, device: torch.device) -> int:
    """Fewest rows whose unsplit (row, KV head) programs give every SM
    ``_FULL_GPU_PROGRAMS_PER_SM`` (66 with 8 KV heads on a 132-SM H200)."""
    return -(-_FULL_GPU_PROGRAMS_PER_SM * _num_sms(device) // num_kv_heads)


def fills_gpu(batch: int, num_kv_heads: int, device: torch.device) -> bool:
    """Whether ``batch`` rows fill the GPU unsplit (:func:`min_full_batch`)."""
    return batch >= min_full_batch(num_kv_heads, device)


def launch_settings(batch: int, num_kv_heads: int, head_size: int, num_splits: int,
                    device: torch.device, kv_bytes: int = 2) -> tuple[int, int, int]:
    """(keys per tile, warps, stages) of :func:`sepllm_decode`'s default launch; ``kv_bytes``:
    bytes per cache element. The many-rows launch is for 16-bit and fp8 caches: with fp32 its
    128-key tiles would need ~148 KB of shared memory (more than sm_86/89 GPUs have)."""
    if (num_splits == 1 and head_size <= 128 and kv_bytes <= 2
            and fills_gpu(batch, num_kv_heads, device)):
        return _FULL_GPU_LAUNCH
    return _tile_n(head_size), _NUM_WARPS, _NUM_STAGES


def default_num_splits(batch: int, num_kv_heads: int, max_cache_len: int,
                       device: torch.device) -> int:
    """Splits per request: enough programs for about two waves over the SMs, but no split
    shorter than ``_MIN_KEYS_PER_SPLIT`` keys (short caches are not worth merging)."""
    programs = batch * num_kv_heads
    wanted = triton.cdiv(2 * _num_sms(device), max(programs, 1))
    worth = max(max_cache_len // _MIN_KEYS_PER_SPLIT, 1)
    return max(1, min(wanted, worth, _MAX_SPLITS))


def sepllm_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    max_cache_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    tile_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Decode attention of one query per request over its whole (compacted) paged cache.

    Parameters
    ----------
    q : [B, Hq, D] float16 / bfloat16 / float32, last dim contiguous.
    kv_cache : [num_blocks, block_size, Hkv, 2D], q's dtype, or fp8 (e4m3, uint8 storage as
        vLLM allocates it); K = ``[..., :D]``, V = ``[..., D:]``.
        ``Hq`` must be a multiple of ``Hkv``; any block size and head size work.
    block_table : [B, max_blocks] int32; cache index ``i`` of request ``b`` lives in slot
        ``block_table[b, i // block_size] * block_size + i % block_size``.
    cache_lens : [B] int32, keys per request (>= 1); the query attends all of them.
    scale : softmax scale.
    out : optional [B, Hq, D] output (any float dtype), written in place.
    num_splits : splits of each request's keys; default :func:`default_num_splits`.
    max_cache_len : host-side ``max(cache_lens)`` for the default split count; without it the
        default reads ``cache_lens`` back from the device (a sync).
    k_scale, v_scale : [1] float32 device tensors, an fp8 cache's dequantization scales
        (vLLM's ``layer._k_scale`` / ``_v_scale``); default 1.
    tile_n, num_warps, num_stages : launch settings (keys per loop iteration, warps, pipeline
        stages); default :func:`launch_settings`.

    Returns
    -------
    out : [B, Hq, D].
    """
    batch, num_heads, head_size = q.shape
    _, block_size, num_kv_heads, two_d = kv_cache.shape
    if two_d != 2 * head_size or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit kv_cache {tuple(kv_cache.shape)}")
    kv_cache, k_scale, v_scale = fp8_operands(kv_cache, q, k_scale, v_scale)
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("q and kv_cache need a contiguous last dimension")
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    if num_splits is None:
        if max_cache_len is None:
            max_cache_len = int(cache_lens.max())
        num_splits = default_num_splits(batch, num_kv_heads, max_cache_len, q.device)

    default = launch_settings(batch, num_kv_heads, head_size, num_splits, q.device,
                              kv_cache.element_size())
    tile_n, num_warps, num_stages = (tile_n or default[0], num_warps or default[1],
                                     num_stages or default[2])
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_size)
    common = dict(HEAD_SIZE=head_size, BLOCK_D=block_d)
    if num_splits > 1:
        part_out = torch.empty(batch, num_heads, num_splits, head_size, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32,
                               device=q.device)
    else:  # the kernel writes out directly; the partial pointers are never read
        part_out = part_lse = out
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, kv_cache, block_table, cache_lens, out, part_out, part_lse, k_scale, v_scale,
        scale * LOG2E,
        num_splits,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_table.stride(0),
        out.stride(0), out.stride(1),
        SPLIT_KV=num_splits > 1,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_SIZE=block_size,
        TILE_N=tile_n,
        DOT_PRECISION=dot_precision(q.dtype),
        KV_FP8=is_fp8(kv_cache.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
        **common,
    )
    if num_splits > 1:
        _merge_kernel[(batch, num_heads)](
            part_out, part_lse, out, num_splits, out.stride(0), out.stride(1),
            BLOCK_S=triton.next_power_of_2(num_splits), **common,
        )
    return out
