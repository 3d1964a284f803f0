"""PE shift: re-rotating cached keys so that positions stay relative to the cache.

Semantics (``sepllm.pe_shift = true``)
--------------------------------------
The paper's streaming mode re-encodes positions relative to the cache: the retained keys, taken
in their logical order, sit at RoPE positions ``0, 1, ..., L-1`` and the next query at ``L``.
Positions then never exceed the cache size ``a + s + w`` (plus one prefill chunk), so a request
can run far past ``max_position_embeddings`` with bounded KV.

This plugin's cache is compacted and unordered (policy.py), so the rule is stated per key:

* a key's RoPE position is its **rank** among the request's retained keys by logical position;
* a new token at logical position ``p`` is fed to the model at ``p - D`` (its cache index, which
  is also its rank: every retained key is older than it);
* after an eviction, every retained key whose rank changed is re-rotated by
  ``delta = new_rank - old_rank`` (RoPE is a rotation: ``R(delta) R(old) = R(new)``), so the
  attention backend sees ordinary rotated keys and needs no change.

Ranks change only when older keys are evicted, so the query/key distance of window keys equals
their logical distance; sinks never move; a separator moves when an older separator is dropped.
Eviction happens between scheduler steps: within a prefill chunk the positions are those of the
chunk's start (the chunk's later queries mask keys that left their window, but do not renumber).
Decoding (one token per step) is exact per token, as in the paper's streaming evaluation.

Why re-rotate rather than store keys un-rotated (the official code's choice): un-rotated
storage would need RoPE inside every attention kernel (the backend, FlashAttention and the
Triton kernels read rotated keys). Re-rotation is one gather/rotate/scatter of the compacted
requests' keys per step, in torch (CPU and CUDA). Cost: see benchmarks/README.md
("PE shift"). Precision: a window key is re-rotated at almost every step (its rank falls by
one whenever an older token is evicted), up to about ``w + s`` times. Rotating a 16-bit key in
place by one position each time accumulates a systematic rounding error (14% relative after
320 steps in bf16), so for 16-bit caches the worker keeps each key as first written (one more
K plane: +50% KV memory) and rotates from it: one rounding per re-rotation, no drift. fp32
caches are re-rotated in place (relative error 6e-6 after 320 steps). Both: tests/test_pe_shift.py.

Supported RoPE: vLLM's ``RotaryEmbedding`` (default RoPE, any ``rope_theta``, partial rotary,
neox or GPT-J style) and ``Llama3RotaryEmbedding`` (``rope_type: llama3``): both are pure
rotations by ``position * inv_freq``. Anything else (yarn, dynamic NTK, longrope, linear
scaling, M-RoPE, ...) is refused at start-up with :class:`~vllm_sepllm.config.SepLLMConfigError`.
"""

from __future__ import annotations

import dataclasses

import torch

#: vLLM rotary classes whose cache is exactly ``cos/sin(position * inv_freq)``.
SUPPORTED_ROPE_CLASSES = ("RotaryEmbedding", "Llama3RotaryEmbedding")


@dataclasses.dataclass(frozen=True)
class RopeParams:
    """What re-rotation needs to know about the model's RoPE.

    ``inv_freq``: [rotary_dim / 2] float32 (CPU); ``head_size``: D; ``rotary_dim``: the rotated
    leading part of each head (``<= head_size``); ``neox``: rotate halves (True) or interleaved
    pairs (GPT-J style, False).
    """

    inv_freq: torch.Tensor
    head_size: int
    rotary_dim: int
    neox: bool


def rope_params_from_model(model: torch.nn.Module) -> RopeParams:
    """The RoPE of a vLLM model, read from its rotary-embedding modules.

    Raises ``SepLLMConfigError`` (one line) when the model has no rotary embedding, has several
    different ones, or uses a RoPE variant re-rotation does not support.
    """
    from vllm_sepllm.config import SepLLMConfigError

    found: dict[tuple, torch.nn.Module] = {}
    for module in model.modules():
        if hasattr(module, "cos_sin_cache") and hasattr(module, "rotary_dim"):
            key = (type(module).__name__, module.head_size, module.rotary_dim,
                   float(getattr(module, "base", 0.0)), bool(module.is_neox_style))
            found.setdefault(key, module)
    if not found:
        raise SepLLMConfigError("sepllm.pe_shift=true needs a RoPE model; no rotary embedding "
                                "found in the model")
    if len(found) > 1:
        raise SepLLMConfigError(f"sepllm.pe_shift=true supports one RoPE per model; found "
                                f"{sorted(k[0] for k in found)}")
    (name, head_size, rotary_dim, _, neox), module = next(iter(found.items()))
    if name not in SUPPORTED_ROPE_CLASSES:
        raise SepLLMConfigError(
            f"sepllm.pe_shift=true supports default and llama3 RoPE ({', '.join(SUPPORTED_ROPE_CLASSES)}); "
            f"the model uses {name}")
    inv_freq = module._compute_inv_freq(module.base).to(torch.float32).cpu()
    params = RopeParams(inv_freq=inv_freq, head_size=head_size, rotary_dim=rotary_dim, neox=neox)
    _check_against_cache(params, module.cos_sin_cache)
    return params


def _check_against_cache(params: RopeParams, cos_sin_cache: torch.Tensor) -> None:
    """Refuse a module whose cache is not ``cos/sin(p * inv_freq)`` (a subclass that scales it)."""
    from vllm_sepllm.config import SepLLMConfigError

    n = min(64, cos_sin_cache.shape[0])
    pos = torch.arange(n, dtype=torch.float32)
    freqs = pos[:, None] * params.inv_freq[None, :]
    expected = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    got = cos_sin_cache[:n].float().cpu()
    tol = 1e-2 if cos_sin_cache.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=tol, rtol=0):
        raise SepLLMConfigError("sepllm.pe_shift=true: the model's RoPE cache is not a pure "
                                "rotation by position * inv_freq; re-rotation would be wrong")


def rotate(x: torch.Tensor, delta: torch.Tensor, params: RopeParams) -> torch.Tensor:
    """Rotate the RoPE part of ``x`` by ``delta`` positions (computed in float32).

    Args:
        x: [M, H, head_size] keys (any float dtype).
        delta: [M] int, positions to add (negative: move toward 0).

    Returns:
        [M, H, head_size] in ``x``'s dtype; the last ``head_size - rotary_dim`` dims unchanged.
    """
    rd = params.rotary_dim
    angles = delta.to(torch.float32)[:, None] * params.inv_freq.to(x.device)[None, :]
    cos = angles.cos()[:, None, :]  # [M, 1, rd/2]
    sin = angles.sin()[:, None, :]
    rot = x[..., :rd].to(torch.float32)
    if params.neox:
        x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    if rd == x.shape[-1]:
        return out.to(x.dtype)
    return torch.cat((out.to(x.dtype), x[..., rd:]), dim=-1)


def shift_keys(kv_caches: list[torch.Tensor], slots: torch.Tensor, delta: torch.Tensor,
               params: RopeParams, origin: list[torch.Tensor] | None = None) -> None:
    """Re-rotate the keys in ``slots`` of every layer by ``delta`` positions.

    Args:
        kv_caches: per layer [num_blocks, block_size, Hkv, 2 * head_size]; K is ``[..., :D]``.
        slots: [M] int64 slot ids (distinct); delta: [M] int (0 is an exact no-op:
            cos 0 = 1, sin 0 = 0).
        origin: None: rotate the cached keys in place. Else per layer [num_blocks, block_size,
            Hkv, D]: the keys as first written; the cached key becomes ``rotate(origin, delta)``, so a key
            is rounded to the cache dtype once per re-rotation instead of accumulating one
            rounding per step (see :data:`KEEP_ORIGIN_DTYPES`).

    Torch only (CPU and CUDA): per layer one gather, the rotation, one scatter; no host sync.
    """
    d = params.head_size
    for i, kv in enumerate(kv_caches):
        flat = kv.view(-1, kv.shape[2], kv.shape[3])
        src = (flat[slots, :, :d] if origin is None
               else origin[i].view(-1, *origin[i].shape[2:])[slots])
        flat[slots, :, :d] = rotate(src, delta, params).to(flat.dtype)


#: Cache dtypes for which the worker keeps the original keys (one more K plane, +50% KV
#: memory): re-rotating a 16-bit key one position at a time rounds it each time, and the
#: rounding is systematic for small angles (measured: 14% relative error after 320 one-step
#: bf16 re-rotations, 2.3% in fp16, 6e-6 in fp32; tests/test_pe_shift.py).
KEEP_ORIGIN_DTYPES = (torch.bfloat16, torch.float16)


def ranks_by_position(positions: torch.Tensor) -> torch.Tensor:
    """[L] int64 rank of each entry of ``positions`` [L] (distinct ints) in ascending order."""
    order = torch.argsort(positions)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(positions.shape[0], device=positions.device)
    return ranks


# ---------------------------------------------------------------------------- reference
def apply_rope_reference(x: torch.Tensor, positions: torch.Tensor,
                         params: RopeParams) -> torch.Tensor:
    """RoPE of un-rotated ``x`` [M, H, head_size] at ``positions`` [M], in float64 (the test
    reference: a key rotated at ``p`` then shifted by ``d`` must equal this at ``p + d``)."""
    rd = params.rotary_dim
    angles = positions.to(torch.float64)[:, None] * params.inv_freq.to(torch.float64)[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    y = x.to(torch.float64)
    if params.neox:
        x1, x2 = y[..., : rd // 2], y[..., rd // 2: rd]
        rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = y[..., 0:rd:2], y[..., 1:rd:2]
        rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((rot, y[..., rd:]), dim=-1)
