"""Scheduler side: the SepLLM KV-cache spec and its block manager.

Workers report :class:`SepLLMSpec` for every attention layer when SEPLLM is selected; vLLM's
KV-cache-spec registry then builds a :class:`SepLLMManager` for the group. The manager is
vLLM's full-attention manager plus, per request, a :class:`~vllm_sepllm.policy.RequestCache`:

* block demand counts cached tokens (``logical - D``), not logical tokens;
* :meth:`SepLLMManager.evict` runs the retention policy, compacts the request's cache into its
  lowest blocks and returns the freed tail blocks to vLLM's block pool;
* ``pop_blocks_for_free`` (finish, abort, preemption) drops the request's record with its
  blocks.

Prefix caching is off under SEPLLM (compaction rewrites blocks in place, so a block's content
no longer matches its hash); ``cache_blocks`` refuses to run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import (
    FullAttentionManager,
    register_all_kvcache_specs,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_sepllm.policy import Compaction, RequestCache, Retention


@dataclasses.dataclass(frozen=True, kw_only=True)
class SepLLMSpec(FullAttentionSpec):
    """A full-attention layer whose KV the SepLLM manager evicts and compacts."""

    @classmethod
    def from_full(cls, spec: FullAttentionSpec) -> SepLLMSpec:
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
        return cls(**fields)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        """KV one request can need: with a separator cap, at most a + s + w tokens plus one
        prefill chunk, whatever max_model_len is (vLLM's start-up check and its concurrency
        estimate use this). Without a cap, separators accumulate: the full-attention bound."""
        from vllm_sepllm.patches import engine_sepllm_config

        full = super().max_memory_usage_bytes(vllm_config)
        cap = engine_sepllm_config(vllm_config).max_cache_tokens
        if cap is None:
            return full
        tokens = cap + vllm_config.scheduler_config.max_num_batched_tokens
        return min(full, cdiv(tokens, self.block_size) * self.page_size_bytes)


class SepLLMManager(FullAttentionManager):
    """Full-attention block manager whose requests hold only their retained tokens."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.enable_caching:
            raise ValueError("SEPLLM requires prefix caching off (--no-enable-prefix-caching)")
        self.caches: dict[str, RequestCache] = {}
        #: Blocks returned to the pool by compaction since start-up (a metric).
        self.num_blocks_freed = 0
        #: Tokens a waiting request is assumed to need at admission (set by the scheduler):
        #: about a + s + w + one chunk instead of the whole prompt.
        self.admission_token_cap: int | None = None
        #: Most blocks each live request has held at once (reported when it finishes).
        self.peak_blocks: dict[str, int] = {}
        #: ``sepllm.cache_size`` (set by the scheduler): batched eviction, see policy.py.
        self.cache_size: int | None = None

    # -------------------------------------------------------------- SepLLM operations
    def evict(self, request_id: str, num_computed: int, token_ids: Sequence[int],
              retention: Retention, sep_ids: Collection[int],
              slot_moves: tuple[list[int], list[int]] | None = None) -> Compaction:
        """Evict what the request's next query cannot see, compact, free the tail blocks.

        ``slot_moves``: lists to which the moves are appended as physical KV slots
        (``block_id * block_size + offset``, through the block list *before* the tail is
        freed: the sources lie in the freed blocks), as the workers apply them.
        """
        cache = self.caches.get(request_id)
        if cache is None:
            cache = self.caches[request_id] = RequestCache(retention, sep_ids,
                                                           self.cache_size)
        compaction = cache.advance(num_computed, token_ids)
        if compaction.num_evicted:
            blocks = self.req_to_blocks[request_id]
            bs = self.block_size
            if slot_moves is not None and compaction.src:
                src_slots, dst_slots = slot_moves
                for i in compaction.src:
                    src_slots.append(blocks[i // bs].block_id * bs + i % bs)
                for i in compaction.dst:
                    dst_slots.append(blocks[i // bs].block_id * bs + i % bs)
            keep = cdiv(len(cache), bs)
            if keep < len(blocks):
                tail = blocks[keep:]
                del blocks[keep:]
                self.block_pool.free_blocks(reversed(tail))
                self.num_blocks_freed += len(tail)
        return compaction

    def num_dropped(self, request_id: str) -> int:
        """``D`` of the request (tokens dropped so far; 0 without a record)."""
        cache = self.caches.get(request_id)
        return 0 if cache is None else cache.num_evicted

    # -------------------------------------------------------------- vLLM overrides
    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   new_computed_blocks: Sequence, total_computed_tokens: int,
                                   num_local_computed_tokens: int, num_tokens_main_model: int,
                                   apply_admission_cap: bool = False) -> int:
        # vLLM's rule on the cached tokens (num_tokens - D), written out: it runs for every
        # scheduled request every step (benchmarks/host_step.py). With prefix caching off
        # (refused in __init__) there are no prefix hits, full attention skips nothing and
        # no held block is evictable, so vLLM's rule reduces to the blocks the cached tokens
        # need beyond those held (tests/test_manager_fuzz.py compares it with vLLM's own).
        assert not new_computed_blocks
        num_tokens -= self.num_dropped(request_id)
        if apply_admission_cap and self.admission_token_cap is not None:
            num_tokens = min(num_tokens, self.admission_token_cap)
        held = self.req_to_blocks.get(request_id)
        return max(cdiv(num_tokens, self.block_size) - (len(held) if held else 0), 0)

    def allocate_new_blocks(self, request_id: str, num_tokens: int,
                            num_tokens_main_model: int):
        dropped = self.num_dropped(request_id)
        held = self.req_to_blocks.get(request_id)
        if held is not None and cdiv(num_tokens - dropped, self.block_size) <= len(held):
            return []  # most decode steps: the last block has room (vLLM's rule, short-cut)
        new_blocks = super().allocate_new_blocks(
            request_id, num_tokens - dropped, num_tokens_main_model - dropped
        )
        if new_blocks:  # the count only grows here
            held = len(self.req_to_blocks[request_id])
            if held > self.peak_blocks.get(request_id, 0):
                self.peak_blocks[request_id] = held
        return new_blocks

    def request_stats(self, request_id: str, num_computed: int) -> dict[str, float] | None:
        """Per-request KV figures once ``num_computed`` tokens have KV: tokens, retained and
        evicted tokens, retained ratio, and the most blocks held at once."""
        if not num_computed:
            return None
        cache = self.caches.get(request_id)
        evicted = 0 if cache is None else cache.num_evicted
        # Tokens computed after the last eviction are retained (they are not evicted yet).
        retained = num_computed - evicted
        return {
            "tokens": num_computed,
            "kv_retained": retained,
            "kv_evicted": evicted,
            "retained_ratio": retained / num_computed,
            "peak_kv_blocks": self.peak_blocks.get(request_id, 0),
        }

    def pop_blocks_for_free(self, request_id: str):
        # Every way out (finish, abort, preemption, vLLM's deferred free) comes through here.
        self.caches.pop(request_id, None)
        self.peak_blocks.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def cache_blocks(self, request, num_tokens: int) -> None:  # noqa: ANN001
        raise RuntimeError("SEPLLM: prefix caching must be off; blocks are rewritten")


def _register() -> None:
    # The registry fills in vLLM's built-in specs only while it is empty: do that first.
    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(
        SepLLMSpec, SepLLMManager, uniform_type_base_spec=FullAttentionSpec
    )


# Registered on import: unpickling a SepLLMSpec (engine core receives the workers' specs)
# imports this module, so the registry knows the spec before KV-cache groups are formed.
_register()
