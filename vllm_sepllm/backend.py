"""The ``SEPLLM`` attention backend.

Four classes, as vLLM's backends have: metadata, builder, backend, impl. The cache is compacted
(see policy.py), so::

    request b:   cache indices 0 .......... cache_len[b]-1
                 |<-- retained tokens, any order -->|<- this step's new tokens ->|
                                                     ^ written by do_kv_cache_update at
                                                       slot(position - D)

    seq_lens[b] (from the runner) = cache_len[b]  = retained + new tokens
    query_start_loc                = offsets of each request's new tokens
    positions                      = logical positions (RoPE and the mask use them)

A request with one new token (decode) attends its whole cache: it holds exactly what that
query sees. A chunk of several tokens (prefill) applies the SepLLM mask, built from the
per-slot positions and separator flags the runner records.

The attention math is :mod:`vllm_sepllm.reference` (pure torch) on every device for now; the
Triton kernels replace it on CUDA when present (kernels/).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from vllm.config import VllmConfig
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_sepllm.policy import Retention
from vllm_sepllm.reference import paged_sepllm_attention, write_kv

BACKEND_NAME = "SEPLLM"


@dataclasses.dataclass
class SepLLMMetadata:
    """Per-step attention metadata (shared by all layers).

    Tensors: ``block_table`` [B, max_blocks] int32, ``slot_mapping`` [T] int64,
    ``q_pos`` [T] int64 logical positions, ``slot_pos`` [num_slots] int32 and ``slot_sep``
    [num_slots] bool (the runner's per-slot records). Lists are host-side copies.
    """

    num_actual_tokens: int
    query_start_loc: list[int]
    cache_lens: list[int]
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    q_pos: torch.Tensor
    slot_pos: torch.Tensor
    slot_sep: torch.Tensor
    retentions: list[Retention]


class SepLLMMetadataBuilder(AttentionMetadataBuilder[SepLLMMetadata]):
    # Per-step host lists and per-request loops: eager only (PIECEWISE graphs keep the
    # rest of the model captured; attention runs outside the graphs).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SepLLMMetadata:
        from vllm_sepllm.worker import SepLLMWorkerState

        cm = common_attn_metadata
        state = SepLLMWorkerState.current
        num_reqs = cm.num_reqs
        retentions = state.row_retention[:num_reqs] if state is not None else []
        return SepLLMMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            query_start_loc=cm.query_start_loc_cpu[: num_reqs + 1].tolist(),
            cache_lens=cm.seq_lens.cpu()[:num_reqs].tolist(),
            block_table=cm.block_table_tensor,
            slot_mapping=cm.slot_mapping,
            q_pos=cm.positions,
            slot_pos=state.slot_pos,
            slot_sep=state.slot_sep,
            retentions=retentions,
        )


class SepLLMBackend(AttentionBackend):
    """SepLLM attention over a compacted paged KV cache."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16, torch.bfloat16, torch.float32,
    ]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        # Must be a member name of AttentionBackendEnum: "SEPLLM" is registered as an alias
        # of CUSTOM by the plugin (see patches.py).
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[SepLLMImpl]:
        return SepLLMImpl

    @staticmethod
    def get_builder_cls() -> type[SepLLMMetadataBuilder]:
        return SepLLMMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                           head_size: int, cache_dtype_str: str = "auto") -> tuple[int, ...]:
        # [num_blocks, block_size, Hkv, 2D]: K in [..., :D], V in [..., D:]; a slot is one
        # contiguous [Hkv, 2D] row, so compaction moves whole rows.
        return (num_blocks, block_size, num_kv_heads, 2 * head_size)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 192, 256]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:  # noqa: ANN001
        return True

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False


class SepLLMImpl(AttentionImpl[SepLLMMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None,
                 kv_cache_dtype: str, logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None) -> None:
        unsupported = {
            "alibi_slopes": alibi_slopes, "sliding_window": sliding_window,
            "logits_soft_cap": logits_soft_cap or None, "sinks": sinks,
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name,
        }
        for name, value in unsupported.items():
            if value is not None:
                raise NotImplementedError(f"SEPLLM does not support {name}={value!r}")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"SEPLLM supports decoder attention only, not {attn_type}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads

    def do_kv_cache_update(self, layer: AttentionLayer, key: torch.Tensor,
                           value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """Write new keys/values [T, Hkv, D] into ``kv_cache`` at ``slot_mapping`` [T]."""
        write_kv(kv_cache, key, value, slot_mapping)

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: SepLLMMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """query [T, Hq, D], key/value [T, Hkv, D] (already in the cache), kv_cache
        [num_blocks, block_size, Hkv, 2D], output [T, Hq, D] (written in place)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("SEPLLM does not support fused output quantization")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        md = attn_metadata
        n = md.num_actual_tokens
        paged_sepllm_attention(
            query[:n], kv_cache, md.block_table, md.cache_lens, md.query_start_loc,
            md.q_pos[:n], md.slot_pos, md.slot_sep, md.retentions, self.scale,
            out=output[:n],
        )
        return output
