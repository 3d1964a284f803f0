"""Masked prefill attention over SepLLM's compacted KV cache (Triton), and its mask metadata.

A chunk of new tokens attends its request's cache, whose last ``q_len`` indices hold the chunk's
own keys (already written). The SepLLM mask is evaluated per (query, key) inside the kernel from
small per-key and per-query integers, never materialised::

    visible(t, i) = key_pos[i] <= q_pos[t]
                    and (key_pos[i] < a                      # sink
                         or key_pos[i] > q_pos[t] - w        # local window
                         or key_rank[i] >= q_thresh[t])      # one of the s newest separators

``key_rank`` is a key's rank among its row's separators at positions >= a (-1 for any other
key) and ``q_thresh`` is the rank of the oldest separator the query still sees; the two are
built by :func:`prefill_key_meta`, consistently with :func:`vllm_sepllm.reference.sepllm_mask`
(the torch reference of the whole op is :func:`vllm_sepllm.reference.paged_sepllm_attention`).

Tile skipping. A row's cache is ``[retained keys of earlier steps (any order) | the chunk (in
order)]``. The retained part is small (at most a + s + w keys when the separators are capped)
and is scanned whole. In the chunk, a query sees only sinks, the separators from its oldest
visible one on, and its window, so ``q_kv_lo[t]`` (the first chunk index query t can see) cuts
the chunk scan of each query tile to ``[min q_kv_lo over the tile, its last query]``: about
w + (the span of s separators) + the tile, instead of the whole causal prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.decode import LOG2E, dot_precision, fp8_operands
from vllm_sepllm.policy import Retention
from vllm_sepllm.reference import is_fp8


def _launch_config(head_size: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(query rows per program, keys per tile, warps, pipeline stages).

    Rows are ``BLOCK_M // next_pow2(Hq / Hkv)`` query tokens times the group's heads. For
    16-bit head sizes <= 128 the sm_90 build runs two warpgroups of wgmma without spills in
    ~100 KB of shared memory; larger heads and fp32 (a correctness path: exact fp32 dots do not
    use tensor cores) take half-size tiles to stay within every GPU's shared memory.
    """
    if head_size <= 128 and dtype.itemsize == 2:
        return 128, 64, 8, 3
    return 64, 32, 4, 2


class PrefillKeyMeta(NamedTuple):
    """Mask metadata of one step, shared by all layers (see the module docstring)."""

    key_pos: torch.Tensor  # [B, Lmax] int32, logical position of each cache index
    key_rank: torch.Tensor  # [B, Lmax] int32, rank among the row's separators >= a, else -1
    q_thresh: torch.Tensor  # [T] int32, oldest separator rank each query sees (>= 0)
    q_kv_lo: torch.Tensor  # [T] int32, first cache index in the query's chunk it may see
    num_sinks: torch.Tensor  # [B] int32, a
    window: torch.Tensor  # [B] int32, w


def prefill_key_meta(
    slot_pos: torch.Tensor,
    slot_sep: torch.Tensor,
    block_table: torch.Tensor,
    cache_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    q_pos: torch.Tensor,
    retentions: Sequence[Retention],
    block_size: int,
    max_cache_len: int | None = None,
) -> PrefillKeyMeta:
    """Per-key ranks and per-query thresholds of the SepLLM mask, for :func:`sepllm_prefill`.

    Parameters
    ----------
    slot_pos : [num_slots] int32, logical position of the token in each slot (>= 0).
    slot_sep : [num_slots] bool, whether that token is a separator.
    block_table : [B, max_blocks] int32.
    cache_lens : [B] int32, keys per request including the chunk's new ones.
    query_start_loc : [B + 1] int32, offsets of each request's queries.
    q_pos : [T] int, logical positions of the queries, ``T = query_start_loc[-1]``.
    retentions : B retentions (a, s, w).
    block_size : tokens per cache page.
    max_cache_len : host-side ``max(cache_lens)``; without it, read back from the device.

    Returns
    -------
    PrefillKeyMeta on ``block_table``'s device. Entries past a row's ``cache_len`` hold
    ``key_pos = 0, key_rank = -1`` and are never read by the kernel.

    Ranks are among the separators present in the row, as in ``sepllm_mask``: the compacted
    cache drops separators oldest first, so they are the true ranks.
    """
    device = block_table.device
    batch = len(retentions)
    if max_cache_len is None:
        max_cache_len = int(cache_lens.max()) if batch else 0
    # One host tensor, one non-blocking copy: torch.tensor(list, device=cuda) would be a
    # pageable copy that waits for all queued GPU work, stalling the host every prefill step.
    host = torch.tensor([[r.num_sinks for r in retentions], [r.window for r in retentions],
                         [-1 if r.sep_cap is None else r.sep_cap for r in retentions]],
                        dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    num_sinks, window, sep_cap = host.to(device, non_blocking=True)

    idx = torch.arange(max_cache_len, device=device)
    valid = idx[None, :] < cache_lens[:, None]
    pages = block_table.to(torch.int64)[:, idx // block_size]
    slots = (pages * block_size + idx % block_size).masked_fill(~valid, 0)
    key_pos = slot_pos[slots].to(torch.int64).masked_fill(~valid, 0)
    cand = slot_sep[slots] & valid & (key_pos >= num_sinks[:, None])

    # Rank separators of all rows in one sort: key (row << 32) + pos orders by row, then
    # position (positions are < 2^31), and a row's ranks start after the earlier rows' count.
    # Other keys sort last as int64 max (no boolean indexing: no device sync).
    rows = torch.arange(batch, device=device)
    keyed = (rows[:, None] << 32) + key_pos
    sep_sorted = torch.sort(keyed.masked_fill(~cand, torch.iinfo(torch.int64).max).flatten()).values
    row_offset = torch.searchsorted(sep_sorted, rows << 32)
    key_rank = torch.where(cand, torch.searchsorted(sep_sorted, keyed) - row_offset[:, None], -1)

    # before_win: the row's separators older than the query's window, i.e. < t - w + 1.
    q_row = torch.repeat_interleave(rows, query_start_loc[1:] - query_start_loc[:-1],
                                    output_size=q_pos.shape[0])
    win_start = (q_pos.to(torch.int64) - window[q_row] + 1).clamp(min=0)
    before_win = torch.searchsorted(sep_sorted, (q_row << 32) + win_start) - row_offset[q_row]
    # s = None keeps every separator (threshold 0); the clamp keeps thresholds >= 0 so that
    # non-separators (rank -1) never pass.
    cap = sep_cap[q_row]
    q_thresh = torch.where(cap < 0, 0, (before_win - cap).clamp(min=0))

    # First chunk index each query may see (the kernel scans the chunk from the smallest of its
    # tile's). The chunk of row b starts at cache index c0 = cache_len - q_len with position
    # n = the row's first query position; chunk index c0 + i holds position n + i.
    q_len = query_start_loc[1:] - query_start_loc[:-1]
    c0 = (cache_lens - q_len).to(torch.int64)[q_row]
    first = q_pos[query_start_loc[:-1].clamp(max=max(q_pos.shape[0] - 1, 0)).long()]
    n = first.to(torch.int64)[q_row]
    big = torch.iinfo(torch.int32).max
    win_lo = c0 + (win_start - n).clamp(min=0)
    sink_lo = torch.where(n < num_sinks[q_row], c0, big)
    # The query sees, outside its window, the separators of ranks q_thresh .. before_win - 1;
    # the first of them in the chunk has rank max(q_thresh, separators before the chunk), and
    # its position is the low 32 bits of its sort key.
    before_chunk = torch.searchsorted(sep_sorted, (q_row << 32) + n) - row_offset[q_row]
    rank_lo = torch.maximum(q_thresh, before_chunk)
    has_sep = rank_lo < before_win
    at = (row_offset[q_row] + rank_lo).clamp(max=max(sep_sorted.shape[0] - 1, 0))
    sep_key_pos = sep_sorted[at] & 0xFFFFFFFF if sep_sorted.numel() else torch.zeros_like(at)
    sep_lo = torch.where(has_sep, c0 + sep_key_pos - n, big)
    q_kv_lo = torch.minimum(torch.minimum(win_lo, sink_lo), sep_lo)
    i32 = torch.int32
    return PrefillKeyMeta(key_pos.to(i32), key_rank.to(i32), q_thresh.to(i32),
                          q_kv_lo.to(i32), num_sinks.to(i32), window.to(i32))


@triton.jit
def _attend_tile(q, m_i, l_i, acc, tile_start, end, bt_row, kv_head_ptr, key_pos_ptr,
                 key_rank_ptr, meta_row, t_pos, thresh, win_floor, num_sinks, offs_d, d_mask,
                 qk_scale, stride_kv_block, stride_kv_slot, HEAD_SIZE: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 KV_FP8: tl.constexpr):
    """One key tile ``[tile_start, min(tile_start + TILE_N, end))`` of the online softmax."""
    idx = tile_start + tl.arange(0, TILE_N)
    valid = idx < end
    page = tl.load(bt_row + idx // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    row = page * stride_kv_block + (idx % BLOCK_SIZE).to(tl.int64) * stride_kv_slot
    kv_mask = valid[:, None] & d_mask[None, :]
    k = tl.load(kv_head_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(kv_head_ptr + row[:, None] + HEAD_SIZE + offs_d[None, :], mask=kv_mask,
                other=0.0)
    if KV_FP8:  # widening e4m3 is exact; the scales are applied by the caller
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    k_pos = tl.load(key_pos_ptr + meta_row + idx, mask=valid, other=0)
    k_rank = tl.load(key_rank_ptr + meta_row + idx, mask=valid, other=-1)

    kept = ((k_pos[None, :] < num_sinks) | (k_pos[None, :] > win_floor[:, None])
            | (k_rank[None, :] >= thresh[:, None]))
    visible = valid[None, :] & (k_pos[None, :] <= t_pos[:, None]) & kept
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    # A row may see nothing in a tile (or yet): keep the running max finite for exp2.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    kv_ptr,  # [num_blocks, block_size, Hkv, 2D]
    block_table_ptr,  # [B, max_blocks] int32
    cache_lens_ptr,  # [B] int32
    query_start_ptr,  # [B + 1] int32
    q_pos_ptr,  # [T] int32 / int64
    key_pos_ptr,  # [B, Lmax] int32
    key_rank_ptr,  # [B, Lmax] int32
    q_thresh_ptr,  # [T] int32
    q_kv_lo_ptr,  # [T] int32
    num_sinks_ptr,  # [B] int32
    window_ptr,  # [B] int32
    out_ptr,  # [T, Hq, D]
    k_scale_ptr, v_scale_ptr,  # [1] fp32 dequantization scales of an fp8 cache (KV_FP8)
    qk_scale,  # softmax scale * log2(e)
    stride_q_t, stride_q_h,
    stride_kv_block, stride_kv_slot, stride_kv_head,
    stride_bt_b,
    stride_meta_b,  # row stride of key_pos and key_rank
    stride_o_t, stride_o_h,
    HEAD_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_SIZE
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # next power of two >= GROUP
    BLOCK_Q: tl.constexpr,  # query tokens per program; BLOCK_Q * BLOCK_G rows
    BLOCK_SIZE: tl.constexpr,  # tokens per cache page
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,  # e4m3 cache: s = (q . k8) * k_scale, o = (p . v8) * v_scale
):
    q_tile = tl.program_id(0)
    b = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:  # the grid covers the longest chunk
        return
    length = tl.load(cache_lens_ptr + b)
    num_sinks = tl.load(num_sinks_ptr + b)
    window = tl.load(window_ptr + b)

    # Row m of the tile is query token m // BLOCK_G of the tile, head m % BLOCK_G of the group:
    # the group's heads share every K/V tile.
    offs_m = tl.arange(0, BLOCK_Q * BLOCK_G)
    tok = q_tile * BLOCK_Q + offs_m // BLOCK_G  # index within the chunk
    g = offs_m % BLOCK_G
    tok_mask = tok < q_len
    row_mask = tok_mask & (g < GROUP)
    t = (q_start + tok).to(tl.int64)
    head = (kv_head * GROUP + g).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_SIZE
    q = tl.load(q_ptr + t[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    t_pos = tl.load(q_pos_ptr + t, mask=tok_mask, other=0)
    thresh = tl.load(q_thresh_ptr + t, mask=tok_mask, other=0)
    win_floor = t_pos - window  # keys above this are in the query's window
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)

    # The chunk's keys sit in order at cache indices length - q_len ...; those after the tile's
    # last query are its future, so the scan stops there (the causal half of the work). Before
    # the chunk: the retained keys, scanned whole; in the chunk: from the tile's first visible.
    chunk_start = length - q_len
    kv_end = tl.minimum(length, chunk_start + (q_tile + 1) * BLOCK_Q)
    kv_lo = tl.load(q_kv_lo_ptr + t, mask=tok_mask, other=2147483647)
    chunk_lo = tl.maximum(tl.min(kv_lo, 0), chunk_start)

    m_i = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], dtype=tl.float32)
    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt_b
    meta_row = b.to(tl.int64) * stride_meta_b
    kv_head_ptr = kv_ptr + kv_head.to(tl.int64) * stride_kv_head
    for tile_start in range(0, chunk_start, TILE_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, tile_start, chunk_start, bt_row, kv_head_ptr, key_pos_ptr,
            key_rank_ptr, meta_row, t_pos, thresh, win_floor, num_sinks, offs_d, d_mask,
            qk_scale, stride_kv_block, stride_kv_slot, HEAD_SIZE, BLOCK_SIZE, TILE_N,
            DOT_PRECISION, KV_FP8)
    for tile_start in range(chunk_lo, kv_end, TILE_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, tile_start, kv_end, bt_row, kv_head_ptr, key_pos_ptr,
            key_rank_ptr, meta_row, t_pos, thresh, win_floor, num_sinks, offs_d, d_mask,
            qk_scale, stride_kv_block, stride_kv_slot, HEAD_SIZE, BLOCK_SIZE, TILE_N,
            DOT_PRECISION, KV_FP8)

    # Every real query sees its own key (l_i > 0); padding rows divide by 1 and are not stored.
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if KV_FP8:
        o = o * tl.load(v_scale_ptr)
    tl.store(out_ptr + t[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def sepllm_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    q_pos: torch.Tensor,
    meta: PrefillKeyMeta,
    scale: float,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """SepLLM-masked attention of chunks of new tokens over their paged, compacted caches.

    Parameters
    ----------
    q : [T, Hq, D] float16 / bfloat16 / float32, last dim contiguous; request after request.
    kv_cache : [num_blocks, block_size, Hkv, 2D], q's dtype or fp8 (e4m3, uint8 storage),
        K = ``[..., :D]``, V = ``[..., D:]``;
        request b's chunk of ``q_len`` keys is already written, in order, at cache indices
        ``cache_lens[b] - q_len .. cache_lens[b] - 1``.
    block_table : [B, max_blocks] int32.
    cache_lens : [B] int32, keys per request including the chunk.
    query_start_loc : [B + 1] int32, offsets of each request's queries in ``q`` (a row may have
        a single query: a decode).
    q_pos : [T] int32 / int64, logical positions of the queries.
    meta : mask metadata from :func:`prefill_key_meta`.
    scale : softmax scale.
    out : optional [T, Hq, D] output (any float dtype), written in place.
    max_query_len : host-side longest chunk, sizes the grid; without it, read back from the
        device (a sync).
    k_scale, v_scale : [1] float32 device tensors, an fp8 cache's scales; default 1.

    Returns
    -------
    out : [T, Hq, D].
    """
    num_tokens, num_heads, head_size = q.shape
    _, block_size, num_kv_heads, two_d = kv_cache.shape
    if two_d != 2 * head_size or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit kv_cache {tuple(kv_cache.shape)}")
    kv_cache, k_scale, v_scale = fp8_operands(kv_cache, q, k_scale, v_scale)
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("q and kv_cache need a contiguous last dimension")
    if meta.key_pos.stride() != meta.key_rank.stride() or meta.key_pos.stride(-1) != 1:
        raise ValueError("key_pos and key_rank need the same row-major layout")
    if out is None:
        out = torch.empty_like(q)
    batch = cache_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())

    block_m, tile_n, num_warps, num_stages = _launch_config(head_size, q.dtype)
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    block_q = max(block_m // block_g, 1)
    grid = (triton.cdiv(max_query_len, block_q), batch, num_kv_heads)
    _prefill_kernel[grid](
        q, kv_cache, block_table, cache_lens, query_start_loc, q_pos,
        meta.key_pos, meta.key_rank, meta.q_thresh, meta.q_kv_lo, meta.num_sinks, meta.window,
        out, k_scale, v_scale,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_table.stride(0),
        meta.key_pos.stride(0),
        out.stride(0), out.stride(1),
        HEAD_SIZE=head_size,
        BLOCK_D=triton.next_power_of_2(head_size),
        GROUP=group,
        BLOCK_G=block_g,
        BLOCK_Q=block_q,
        BLOCK_SIZE=block_size,
        TILE_N=tile_n,
        DOT_PRECISION=dot_precision(q.dtype),
        KV_FP8=is_fp8(kv_cache.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
