"""Pure-torch SepLLM attention and compaction: the CPU path and the oracle for the kernels.

KV cache layout (one tensor per layer, see ``SepLLMBackend.get_kv_cache_shape``)::

    kv_cache: [num_blocks, block_size, num_kv_heads, 2 * head_size]   K = [..., :D], V = [..., D:]

A request's cache indices ``i`` live at slot ``block_table[i // block_size] * block_size +
i % block_size``. Per slot the worker also keeps the logical position of the token there
(``slot_pos``, int32) and whether it is a separator (``slot_sep``, bool); the prefill mask is
computed from them, so the cache may hold keys in any order.

Mask semantics are those of :mod:`vllm_sepllm.policy` (query ``t`` sees key ``p`` iff
``p <= t`` and ``p`` is a sink, in the window ``p > t - w``, or one of the ``s`` newest
separators at ``a <= p <= t - w``).

An fp8 cache (``--kv-cache-dtype fp8``: e4m3, stored as uint8 as vLLM allocates it) holds
``fp8(x / scale)`` with the layer's per-tensor ``k_scale`` / ``v_scale``, saturated at +-448 as
vLLM's ``reshape_and_cache_flash`` writes it; readers dequantize ``fp8 * scale``. Compaction
moves the bytes unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_sepllm.policy import Retention

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether a cache of this tensor dtype holds fp8 KV (vLLM allocates fp8 caches as uint8)."""
    return dtype in (torch.uint8, FP8)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``x / scale`` as e4m3 bytes (uint8), round to nearest even, saturated at +-448."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)


def split_kv(kv: torch.Tensor, head_size: int, dtype: torch.dtype,
             k_scale: torch.Tensor | float | None = None,
             v_scale: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of cache rows ``kv`` [..., 2D] in ``dtype``; fp8 rows are dequantized
    (``fp8 * scale``, computed in float32)."""
    k, v = kv[..., :head_size], kv[..., head_size:]
    if not is_fp8(kv.dtype):
        return k, v
    k_scale = 1.0 if k_scale is None else k_scale
    v_scale = 1.0 if v_scale is None else v_scale
    return ((k.view(FP8).float() * k_scale).to(dtype),
            (v.view(FP8).float() * v_scale).to(dtype))


def sepllm_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, k_sep: torch.Tensor, r: Retention
) -> torch.Tensor:
    """Which keys each query sees.

    Args:
        q_pos: [Q] int, logical positions of the queries.
        k_pos: [K] int, logical positions of the keys (any order, no duplicates).
        k_sep: [K] bool, whether each key is a separator token.
        r: retention (a, s, w).

    Returns:
        [Q, K] bool, True where the query sees the key.

    The keys must contain every separator newer than the oldest separator among them (the
    compacted cache does: separators are evicted oldest first), so that ranks among the
    present separators are true ranks.
    """
    q = q_pos.to(torch.int64)[:, None]
    k = k_pos.to(torch.int64)[None, :]
    win_start = q - r.window + 1  # [Q, 1]; first position inside the window
    visible = (k < r.num_sinks) | (k >= win_start)
    cand = k_sep.bool() & (k_pos.to(torch.int64) >= r.num_sinks)  # [K]
    if r.sep_cap != 0:  # no .any() test: it would synchronise with the GPU
        sep_sorted = torch.sort(k_pos.to(torch.int64)[cand]).values  # [S]
        key_rank = torch.searchsorted(sep_sorted, k_pos.to(torch.int64))  # [K]
        before_win = torch.searchsorted(sep_sorted, win_start.squeeze(1))  # [Q]
        sep_vis = cand[None, :] & (k < win_start)
        if r.sep_cap is not None:
            sep_vis &= key_rank[None, :] >= (before_win[:, None] - r.sep_cap)
        visible |= sep_vis
    return visible & (k <= q)


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
    scale: float, upcast: bool = False,
) -> torch.Tensor:
    """Attention of queries over keys under a boolean mask (GQA by head repetition).

    Args:
        query: [Q, Hq, D]; key, value: [K, Hkv, D]; mask: [Q, K] bool (every row needs one
        True, which the query's own key provides); upcast: compute in float32.

    Returns:
        [Q, Hq, D] in the query's dtype.
    """
    dtype = query.dtype
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
        attn_mask=mask[None], scale=scale, enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(0, 1).to(dtype)


def cache_slots(block_table_row: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """[length] int64 slot ids of cache indices ``0..length-1`` of one request."""
    idx = torch.arange(length, device=block_table_row.device)
    blocks = block_table_row[: (length + block_size - 1) // block_size].to(torch.int64)
    return blocks[idx // block_size] * block_size + idx % block_size


def paged_sepllm_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_lens: list[int],
    query_start_loc: list[int],
    q_pos: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_sep: torch.Tensor,
    retentions: list[Retention],
    scale: float,
    out: torch.Tensor | None = None,
    upcast: bool = False,
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """SepLLM attention of a batch over a paged, compacted KV cache.

    Args:
        query: [T, Hq, D], the batch's new tokens, request after request.
        kv_cache: [num_blocks, block_size, Hkv, 2D] (new tokens already written).
        block_table: [B, max_blocks] int32.
        cache_lens: B ints, cached tokens per request *including* the new ones.
        query_start_loc: B + 1 ints, offsets of each request's queries in ``query``.
        q_pos: [T] logical positions of the queries.
        slot_pos: [num_slots] int32, logical position stored in each slot.
        slot_sep: [num_slots] bool, whether the token in each slot is a separator.
        retentions: B retentions.
        out: optional [T, Hq, D] output buffer.
        k_scale, v_scale: dequantization scales of an fp8 cache.

    Returns:
        [T, Hq, D]. A request with one query (decode) sees its whole cache: the cache holds
        exactly what that query sees. Longer chunks get the mask of :func:`sepllm_mask`.
    """
    block_size, head_size = kv_cache.shape[1], kv_cache.shape[3] // 2
    flat = kv_cache.view(-1, kv_cache.shape[2], kv_cache.shape[3])
    if out is None:
        out = torch.empty_like(query)
    for b, length in enumerate(cache_lens):
        q0, q1 = query_start_loc[b], query_start_loc[b + 1]
        if q1 == q0:
            continue
        slots = cache_slots(block_table[b], length, block_size)
        k, v = split_kv(flat[slots], head_size, query.dtype, k_scale, v_scale)
        if q1 - q0 == 1:
            mask = torch.ones(1, length, dtype=torch.bool, device=query.device)
        else:
            mask = sepllm_mask(q_pos[q0:q1], slot_pos[slots], slot_sep[slots], retentions[b])
        out[q0:q1] = masked_attention(query[q0:q1], k, v, mask, scale, upcast)
    return out


def decode_attention(query: torch.Tensor, flat_kv: torch.Tensor, slots: torch.Tensor,
                     valid: torch.Tensor, scale: float,
                     k_scale: torch.Tensor | float | None = None,
                     v_scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Batched decode over gathered caches: each row attends all its valid slots.

    Args:
        query: [B, Hq, D]; flat_kv: [num_slots, Hkv, 2D]; slots: [B, L] int64 (padding
        anywhere valid is False); valid: [B, L] bool; k_scale, v_scale: of an fp8 cache.

    Returns:
        [B, Hq, D].
    """
    d = query.shape[-1]
    k, v = split_kv(flat_kv[slots], d, query.dtype, k_scale, v_scale)  # [B, L, Hkv, D]
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    out = F.scaled_dot_product_attention(
        query[:, :, None, :], k, v, attn_mask=valid[:, None, None, :], scale=scale,
        enable_gqa=query.shape[1] != k.shape[1],
    )
    return out[:, :, 0, :]


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | float | None = None,
             v_scale: torch.Tensor | float | None = None) -> None:
    """Store new keys/values [T, Hkv, D] at ``slot_mapping`` [T] (negative = padding, skipped);
    into an fp8 cache as ``fp8(x / scale)`` (:func:`quantize_fp8`)."""
    flat = kv_cache.view(-1, kv_cache.shape[2], kv_cache.shape[3])
    head_size = kv_cache.shape[3] // 2
    n = slot_mapping.shape[0]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, key, value = slot_mapping[valid], key[:n][valid], value[:n][valid]
    else:
        key, value = key[:n], value[:n]
    if is_fp8(kv_cache.dtype):
        key = quantize_fp8(key, 1.0 if k_scale is None else k_scale).view(flat.dtype)
        value = quantize_fp8(value, 1.0 if v_scale is None else v_scale).view(flat.dtype)
    flat[slot_mapping, :, :head_size] = key.to(flat.dtype)
    flat[slot_mapping, :, head_size:] = value.to(flat.dtype)


def move_slots(tensors: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy slot ``src[i]`` to slot ``dst[i]`` in each tensor (first dims = slots after a
    flattening view of [num_blocks, block_size, ...]). Sources and destinations must be
    disjoint; all sources are read before any destination is written."""
    for t in tensors:
        flat = t.view(-1, *t.shape[2:]) if t.dim() >= 2 else t
        flat[dst] = flat[src]
