"""Device dispatch for the compaction op: the CUDA extension (csrc/) when it is built and the
tensors live on a GPU, the torch reference otherwise."""

from __future__ import annotations

import torch

from vllm_sepllm.reference import move_slots


def cuda_extension_available() -> bool:
    """Whether ``torch.ops.vllm_sepllm.compact_kv`` (csrc/) is built and loaded."""
    from kernels import load_compact_kv

    return load_compact_kv()


def compact_kv(kv_caches: list[torch.Tensor], slot_pos: torch.Tensor, slot_sep: torch.Tensor,
               src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy slot ``src[i]`` to ``dst[i]`` in every layer's KV cache and in the per-slot records.

    kv_caches: per layer [num_blocks, block_size, Hkv, 2D]; slot_pos [num_slots] int32;
    slot_sep [num_slots] bool; src, dst [M] int64, disjoint.
    """
    if src.is_cuda and cuda_extension_available():
        torch.ops.vllm_sepllm.compact_kv(kv_caches, slot_pos, slot_sep, src, dst)
        return
    move_slots([*kv_caches, slot_pos, slot_sep], src, dst)
