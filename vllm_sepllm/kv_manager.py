"""Scheduler side: the SepLLM KV-cache spec and its block manager.

Workers report :class:`SepLLMSpec` for every attention layer when SEPLLM is selected; vLLM's
KV-cache-spec registry then builds a :class:`SepLLMManager` for the group. The manager is
vLLM's full-attention manager plus, per request, a :class:`~vllm_sepllm.policy.RequestCache`:

* block demand counts cached tokens (``logical - D``), not logical tokens;
* :meth:`SepLLMManager.evict` runs the retention policy, compacts the request's cache into its
  lowest blocks and returns the freed tail blocks to vLLM's block pool;
* ``pop_blocks_for_free`` (finish, abort, preemption) drops the request's record with its
  blocks.

Per step the scheduler evicts for all running requests at once (:meth:`SepLLMManager.
evict_batch`): requests whose records fit a :class:`~vllm_sepllm.cache_table.CacheTable` (a
separator cap, decode-sized steps, no shared blocks) advance in one batched numpy operation,
with their block ids mirrored in the table to turn moves into physical slots; the others go
through :meth:`SepLLMManager.evict` one by one (first eviction, copy-out, long prefill chunks,
no separator cap) and join the table afterwards where they can. ``D`` of every record is in
:attr:`SepLLMManager.dropped` (vLLM's per-request block hooks read it).

Prefix caching (vLLM's, unchanged: hashes, hits, LRU) works as long as no hashed or shared
block is ever written. A request registers blocks only while its cache is still laid out by
position (nothing evicted yet: ``D = 0``); its first eviction copies the retained tokens out
of every hashed or shared block into private ones and lets go of them
(:meth:`SepLLMManager.evict`, ``policy.RequestCache`` "Copy-out"), so they stay valid cache
entries for every other request. The scheduler defers eviction until the prompt is computed
(scheduler.py), so every full prompt block is registered.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence

import numpy as np

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.single_type_kv_cache_manager import (
    FullAttentionManager,
    register_all_kvcache_specs,
)
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_sepllm.cache_table import I64, CacheTable
from vllm_sepllm.policy import Compaction, RequestCache, Retention

#: Most positions a record in the cache table advances by in one batched step (a longer step,
#: e.g. a prefill chunk, goes through ``RequestCache``); with ``cache_size`` at least
#: ``c - (a + s + w)`` plus a few steps, up to this bound.
TABLE_MAX_STEP = 256
TABLE_MAX_STEP_CAP = 4096


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
        if cap is None or vllm_config.cache_config.enable_prefix_caching:
            return full  # with prefix caching a prompt is held whole until it is computed
        tokens = cap + vllm_config.scheduler_config.max_num_batched_tokens
        return min(full, cdiv(tokens, self.block_size) * self.page_size_bytes)


@dataclasses.dataclass
class BatchEviction:
    """What :meth:`SepLLMManager.evict_batch` did.

    ``rids[k]``: the requests that evicted tokens, with ``evicted[k]`` tokens dropped, ``D``
    (``dropped[k]``) now, ``kept[k]`` blocks kept and ``freed[k]`` blocks freed; ``src``/``dst``:
    all their KV moves as physical slots (``owner[j]``: index into ``rids`` of move ``j``).
    ``preempted``: indices (into the batch) of requests whose copy-out found no free block
    (the caller's ``preempt`` already ran for them). ``num_batched``: requests the cache table
    advanced (the others went through :meth:`SepLLMManager.evict`)."""

    rids: list[str]
    evicted: np.ndarray
    dropped: np.ndarray
    kept: np.ndarray
    freed: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    owner: np.ndarray
    preempted: list[int]
    num_batched: int = 0


class _Records(Mapping):
    """``SepLLMManager.caches``: every request's record as a ``RequestCache`` (read-only for
    records in the cache table: a snapshot). For tests, benchmarks and probes; the hot paths use
    the table and :attr:`SepLLMManager.dropped`."""

    def __init__(self, mgr: SepLLMManager) -> None:
        self._mgr = mgr

    def __getitem__(self, rid: str) -> RequestCache:
        mgr = self._mgr
        cache = mgr._py.get(rid)
        if cache is not None:
            return cache
        table = mgr.table
        if table is not None and rid in table.row_of:
            return table.snapshot(table.row_of[rid])
        raise KeyError(rid)

    def __contains__(self, rid: object) -> bool:
        return rid in self._mgr.dropped

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._mgr.dropped))

    def __len__(self) -> int:
        return len(self._mgr.dropped)


def _pick(seq: Sequence, idx: np.ndarray) -> list:
    """``[seq[i] for i in idx]`` in one C-level call (``seq.pick(idx)`` where it has one)."""
    pick = getattr(seq, "pick", None)
    if pick is not None:
        return pick(idx)
    if idx.size == len(seq):
        return seq if isinstance(seq, list) else list(seq)
    if idx.size == 1:
        return [seq[int(idx[0])]]
    if not idx.size:
        return []
    return list(operator.itemgetter(*idx.tolist())(seq))


class SepLLMManager(FullAttentionManager):
    """Full-attention block manager whose requests hold only their retained tokens."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: Records kept as ``RequestCache`` (the others are rows of :attr:`table`).
        self._py: dict[str, RequestCache] = {}
        #: Every record, read-only (see :class:`_Records`).
        self.caches = _Records(self)
        #: ``D`` of every request that has a record (the record registry).
        self.dropped: dict[str, int] = {}
        #: Batched records (created by the first :meth:`evict_batch`).
        self.table: CacheTable | None = None
        #: Per request [blocks freed by compaction, compactions] not counted in a table row
        #: (records outside the table, and rows that left it); see :meth:`take_counts`.
        self.py_counts: dict[str, list[int]] = {}
        #: Records dropped so far (the scheduler notices preemptions in vLLM's schedule()).
        self.num_records_popped = 0
        #: False: every record stays a ``RequestCache`` (the per-request path; tests compare).
        self.use_table = True
        #: Blocks returned to the pool by compaction since start-up (a metric).
        self.num_blocks_freed = 0
        #: Tokens a waiting request is assumed to need at admission (set by the scheduler):
        #: about a + s + w + one chunk instead of the whole prompt.
        self.admission_token_cap: int | None = None
        #: Most blocks each live request has held at once (reported when it finishes).
        self.peak_blocks: dict[str, int] = {}
        #: ``sepllm.cache_size`` (set by the scheduler): batched eviction, see policy.py.
        self.cache_size: int | None = None
        #: Requests whose cache was copied out of shared blocks since the scheduler last
        #: cleared this (their workers need the whole new block list).
        self.copied_out: set[str] = set()

    # -------------------------------------------------------------- SepLLM operations
    def evict(self, request_id: str, num_computed: int, token_ids: Sequence[int],
              retention: Retention, sep_ids: Collection[int],
              slot_moves: tuple[list[int], list[int]] | None = None,
              deferred_free: list[KVCacheBlock] | None = None) -> Compaction | None:
        """Evict what the request's next query cannot see, compact, free the tail blocks.

        ``slot_moves``: lists to which the moves are appended as physical KV slots
        (``block_id * block_size + offset``, through the block list *before* the tail is
        freed: the sources lie in the freed blocks), as the workers apply them.
        ``deferred_free``: blocks that hold move sources go here instead of back to the pool
        (the caller frees them once every request of the step has evicted, so that no other
        request's copy-out gets one of them as a destination of the same step's moves).

        Returns None when a copy-out needs fresh blocks the pool cannot give: the request's
        record is then inconsistent with its blocks and the caller must preempt it.
        """
        cache = self._py.get(request_id)
        if cache is None:
            if self.table is not None and request_id in self.table.row_of:
                cache = self._untable(request_id)
            else:
                cache = self._py[request_id] = RequestCache(retention, sep_ids,
                                                            self.cache_size)
                self.dropped[request_id] = 0
        blocks = self.req_to_blocks[request_id]
        is_private = None
        tight = False
        if self.enable_caching and cache.num_evicted == 0:
            # Only before the first eviction can the request hold hashed or shared blocks.
            # When the pool might not hold the copy-out's fresh blocks (at most those of the
            # retained a + s + w tokens), the blocks no other request holds count as private
            # too: their cache entries are dropped before they are written (else the request
            # would be preempted, come back through its own prefix hits and be short again).
            need = len(blocks)
            if retention.sep_cap is not None:
                kept = retention.num_sinks + retention.sep_cap + retention.window
                need = min(need, cdiv(kept, self.block_size) + 1)
            tight = self.block_pool.get_num_free_blocks() < need

            def is_private(b: int) -> bool:
                block = blocks[b]
                return block.ref_cnt == 1 and (tight or block.block_hash is None)
        compaction = cache.advance(num_computed, token_ids, self.block_size, is_private)
        if not compaction.num_evicted:
            return compaction
        self.dropped[request_id] = cache.num_evicted
        if compaction.blocks is not None:
            return self._copy_out(request_id, compaction, slot_moves, deferred_free, tight)
        bs = self.block_size
        if tight:
            self._uncache(blocks[:cdiv(len(cache), bs)])
        self._slot_moves(compaction, blocks, blocks, slot_moves)
        keep = cdiv(len(cache), bs)
        if keep < len(blocks):
            tail = blocks[keep:]
            del blocks[keep:]
            tail.reverse()  # the last block first: vLLM's order of eviction priority
            self._release(tail, deferred_free)
            self.num_blocks_freed += len(tail)
        return compaction

    def _slot_moves(self, compaction: Compaction, src_blocks: Sequence[KVCacheBlock],
                    dst_blocks: Sequence[KVCacheBlock],
                    slot_moves: tuple[list[int], list[int]] | None) -> None:
        """Append the compaction's moves to ``slot_moves`` as physical slots: sources through
        ``src_blocks``, destinations through ``dst_blocks``."""
        if slot_moves is None or not compaction.src:
            return
        bs = self.block_size
        src_slots, dst_slots = slot_moves
        src_slots.extend(src_blocks[i // bs].block_id * bs + i % bs for i in compaction.src)
        dst_slots.extend(dst_blocks[i // bs].block_id * bs + i % bs for i in compaction.dst)

    def _release(self, blocks: list[KVCacheBlock],
                 deferred_free: list[KVCacheBlock] | None) -> None:
        """Give up ``blocks``, which hold move sources: to the pool now, or to the caller's
        ``deferred_free`` (see :meth:`evict`)."""
        if deferred_free is None:
            self.block_pool.free_blocks(blocks)
        else:
            deferred_free.extend(blocks)

    def _copy_out(self, request_id: str, compaction: Compaction,
                  slot_moves: tuple[list[int], list[int]] | None,
                  deferred_free: list[KVCacheBlock] | None, tight: bool) -> Compaction | None:
        """Apply a copy-out layout (``compaction.blocks``): fresh blocks from the pool, moves
        as physical slots, and every block the new layout does not use released (hashed
        ones stay in vLLM's prefix cache)."""
        bs = self.block_size
        old = self.req_to_blocks[request_id]
        chosen = {b for b in compaction.blocks if b >= 0}
        sources = {i // bs for i in compaction.src}
        # Blocks the request lets go of and no move reads: free now, so that their room can
        # serve the fresh blocks.
        idle = [blk for b, blk in enumerate(old) if b not in chosen and b not in sources]
        busy = [old[b] for b in sorted(sources, reverse=True) if b not in chosen]
        idle.reverse()
        self.block_pool.free_blocks(idle)
        num_fresh = compaction.blocks.count(-1)
        if num_fresh > self.block_pool.get_num_free_blocks():
            old[:] = [blk for b, blk in enumerate(old) if b in chosen or b in sources]
            self.num_blocks_freed += len(idle)
            return None
        if tight:
            self._uncache([old[b] for b in chosen])
        fresh = iter(self.block_pool.get_new_blocks(num_fresh))
        new = [old[b] if b >= 0 else next(fresh) for b in compaction.blocks]
        self._slot_moves(compaction, old, new, slot_moves)
        self.num_blocks_freed += len(old) - len(new)
        old[:] = new
        self.copied_out.add(request_id)
        self._release(busy, deferred_free)
        return compaction

    def _uncache(self, blocks: Sequence[KVCacheBlock]) -> None:
        """Drop the prefix-cache entries of ``blocks`` (held by one request only), which are
        about to be written."""
        ids = {b.block_id for b in blocks if b.block_hash is not None}
        if ids:
            self.block_pool.evict_blocks(ids)

    def num_dropped(self, request_id: str) -> int:
        """``D`` of the request (tokens dropped so far; 0 without a record)."""
        return self.dropped.get(request_id, 0)

    def num_computed_of(self, request_id: str) -> int | None:
        """``num_computed`` of the request's record (None without one)."""
        cache = self._py.get(request_id)
        if cache is not None:
            return cache.num_computed
        table = self.table
        row = None if table is None else table.row_of.get(request_id)
        return None if row is None else int(table.n[row])

    # -------------------------------------------------------------- batched eviction
    def _untable(self, request_id: str) -> RequestCache:
        """Move the request's record out of the table (its counters to :attr:`py_counts`)."""
        cache, freed, comps = self.table.remove(request_id)
        if freed or comps:
            c = self.py_counts.setdefault(request_id, [0, 0])
            c[0] += freed
            c[1] += comps
        self._py[request_id] = cache
        return cache

    def _table_for(self, sep_ids: Collection[int]) -> CacheTable:
        if self.table is None:
            step = TABLE_MAX_STEP
            if self.cache_size is not None:
                step = min(max(step, self.cache_size + 64), TABLE_MAX_STEP_CAP)
            self.table = CacheTable(sep_ids, self.cache_size, max_step=step,
                                    max_window=(1 << 14) if self.use_table else -1)
        return self.table

    def evict_batch(self, rids: Sequence[str], num_computed: np.ndarray,
                    token_lists: Sequence[Sequence[int]],
                    retention_of: Callable[[int], Retention], sep_ids: Collection[int],
                    deferred_free: list[KVCacheBlock],
                    preempt: Callable[[int], None],
                    rows: np.ndarray | None = None) -> BatchEviction:
        """:meth:`evict` for every request ``rids[i]`` (``num_computed[i] > 0`` computed
        tokens, ids ``token_lists[i]``, retention ``retention_of(i)``, asked only where a
        record is created), as ``SepLLMScheduler.schedule`` needs it each step.
        ``token_lists`` is read only where needed (a sequence, or an object with
        ``pick(indices)`` giving their lists); ``rows``: ``table.rows_of(rids)`` if the caller
        has it (same table generation). Each request that evicted counts one compaction (see
        :meth:`uncount_compaction`).

        Records in the cache table advance together (no per-request Python beyond reading the
        token ids that leave the window); the others, and table rows whose step the table does
        not take (see :meth:`CacheTable.fits`; with prefix caching, a record that evicted
        nothing yet, which may hold shared blocks), go through :meth:`evict` in batch order
        and then join the table where their retention allows. Freed blocks go to
        ``deferred_free`` (see :meth:`evict`); ``preempt(i)`` runs at once for a request
        whose copy-out found no free block."""
        table = self._table_for(sep_ids)
        bs = self.block_size
        c = self.cache_size
        if rows is None:
            rows = table.rows_of(rids)
        in_table = rows >= 0
        # (rows -1 read the last row: masked out by in_table)
        k = num_computed - table.n[rows]
        if c is None:
            due = in_table & (k > 0)
        else:
            due = in_table & (num_computed - table.D[rows] > c)
        fast = due & table.fits(rows, num_computed)
        if self.enable_caching:
            fast &= table.D[rows] > 0
        # (num_computed below the record's: RequestCache.advance raises, let it)
        slow = np.flatnonzero(~(in_table & (k >= 0)) | (due & ~fast))

        # Per request, in batch order: records outside the table, long steps, copy-outs.
        out_rids: list[str] = []
        out_evicted: list[int] = []
        out_kept: list[int] = []
        out_freed: list[int] = []
        owners: list[int] = []
        src_l: list[int] = []
        dst_l: list[int] = []
        preempted: list[int] = []
        for i in slow.tolist():
            rid = rids[i]
            n = int(num_computed[i])
            if c is not None and not in_table[i]:
                cache = self._py.get(rid)
                if cache is not None and n - cache.num_evicted <= c:
                    # RequestCache.advance's own early return, without the call; a record
                    # that left the table (a per-request evict) comes back.
                    if table.accepts(cache.retention):
                        del self._py[rid]
                        table.add(rid, cache, [b.block_id for b in self.req_to_blocks[rid]])
                    continue
            j = len(src_l)
            freed = self.num_blocks_freed
            comp = self.evict(rid, n, _pick(token_lists, np.array([i]))[0], retention_of(i),
                              sep_ids, (src_l, dst_l), deferred_free)
            if comp is None:
                preempted.append(i)
                preempt(i)
                continue
            if comp.num_evicted:
                freed = self.num_blocks_freed - freed
                owners += [len(out_rids)] * (len(src_l) - j)
                out_rids.append(rid)
                out_evicted.append(comp.num_evicted)
                out_kept.append(len(self.req_to_blocks[rid]))
                out_freed.append(freed)
                counts = self.py_counts.setdefault(rid, [0, 0])
                counts[0] += freed
                counts[1] += 1
            cache = self._py[rid]
            if table.accepts(cache.retention):
                del self._py[rid]
                table.add(rid, cache, [b.block_id for b in self.req_to_blocks[rid]])
        n_py = len(out_rids)
        src = np.asarray(src_l, dtype=I64)
        dst = np.asarray(dst_l, dtype=I64)
        owner = np.asarray(owners, dtype=I64)
        evicted = np.asarray(out_evicted, dtype=I64)
        kept = np.asarray(out_kept, dtype=I64)
        freed_a = np.asarray(out_freed, dtype=I64)

        # The table's records, at once.
        bi = np.flatnonzero(fast)
        if bi.size:
            brows = rows[bi]
            st = table.advance(brows, num_computed[bi], _pick(token_lists, bi))
            hit = np.flatnonzero(st.evicted)
            if hit.size:
                hrows = brows[hit]
                # Moves as physical slots, through the block lists before the tail is freed.
                mrows = brows[st.move_batch]
                t_src = table.physical(mrows, st.src, bs)
                t_dst = table.physical(mrows, st.dst, bs)
                local = np.full(bi.size, -1, dtype=I64)
                local[hit] = np.arange(n_py, n_py + hit.size, dtype=I64)
                keep = -(-st.length[hit] // bs)
                t_freed = table.nb[hrows] - keep
                t_freed[t_freed < 0] = 0
                hrids = table.owner[hrows].tolist()
                for k in np.flatnonzero(t_freed).tolist():
                    rid, row, kk = hrids[k], int(hrows[k]), int(keep[k])
                    blocks = self.req_to_blocks[rid]
                    tail = blocks[kk:]
                    del blocks[kk:]
                    tail.reverse()  # the last block first: vLLM's order of eviction priority
                    self._release(tail, deferred_free)
                    table.nb[row] = kk
                total = int(t_freed.sum())
                self.num_blocks_freed += total
                table.freed[hrows] += t_freed
                table.comps[hrows] += 1
                t_dropped = table.D[hrows]
                self.dropped.update(zip(hrids, t_dropped.tolist()))
                out_rids += hrids
                src = np.concatenate((src, t_src))
                dst = np.concatenate((dst, t_dst))
                owner = np.concatenate((owner, local[st.move_batch]))
                evicted = np.concatenate((evicted, st.evicted[hit]))
                kept = np.concatenate((kept, table.nb[hrows]))
                freed_a = np.concatenate((freed_a, t_freed))
        dropped = np.fromiter(map(self.dropped.__getitem__, out_rids[:n_py]), dtype=I64,
                              count=n_py)
        if len(out_rids) > n_py:
            dropped = np.concatenate((dropped, t_dropped))
        return BatchEviction(out_rids, evicted, dropped, kept, freed_a, src, dst, owner,
                             preempted, int(bi.size))

    def uncount_compaction(self, request_id: str) -> None:
        """Take back the compaction :meth:`evict_batch` counted for a request whose record
        went since (preempted in the same step: its moves are not sent)."""
        counts = self.py_counts.get(request_id)
        if counts is not None and counts[1]:
            counts[1] -= 1

    def take_counts(self, request_id: str) -> tuple[int, int]:
        """(blocks freed by compaction, compactions) of the request so far, and reset."""
        freed, comps = self.py_counts.pop(request_id, (0, 0))
        table = self.table
        row = None if table is None else table.row_of.get(request_id)
        if row is not None:
            freed += int(table.freed[row])
            comps += int(table.comps[row])
            table.freed[row] = table.comps[row] = 0
        return freed, comps

    def check_table(self) -> None:
        """Assert every table row agrees with the request's block list and with itself
        (tests)."""
        table = self.table
        if table is None:
            return
        assert not set(table.row_of) & set(self._py)
        assert set(table.row_of) | set(self._py) == set(self.dropped)
        for rid, row in table.row_of.items():
            table.check_row(row)
            ids = [b.block_id for b in self.req_to_blocks.get(rid, ())]
            assert table.blk[row, : table.nb[row]].tolist() == ids, rid
            assert self.dropped[rid] == table.D[row], rid

    # -------------------------------------------------------------- vLLM overrides
    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   new_computed_blocks: Sequence, total_computed_tokens: int,
                                   num_local_computed_tokens: int, num_tokens_main_model: int,
                                   apply_admission_cap: bool = False, **kwargs) -> int:
        # kwargs: vLLM 0.32+'s ``prefill_end`` (a Mamba checkpoint rule; full attention
        # ignores it), passed on to vLLM's own rule.
        if new_computed_blocks:
            # Admission with prefix-cache hits (nothing evicted yet, D = 0): vLLM's own rule.
            return super().get_num_blocks_to_allocate(
                request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                num_local_computed_tokens, num_tokens_main_model, apply_admission_cap,
                **kwargs)
        # vLLM's rule on the cached tokens (num_tokens - D), written out: it runs for every
        # scheduled request every step (benchmarks/host_step.py). Without prefix hits, full
        # attention skips nothing and a request holds no evictable block, so vLLM's rule
        # reduces to the blocks the cached tokens need beyond those held
        # (tests/test_manager_fuzz.py compares it with vLLM's own).
        num_tokens -= self.dropped.get(request_id, 0)
        if apply_admission_cap and self.admission_token_cap is not None:
            num_tokens = min(num_tokens, self.admission_token_cap)
        held = self.req_to_blocks.get(request_id)
        return max(cdiv(num_tokens, self.block_size) - (len(held) if held else 0), 0)

    def allocate_new_blocks(self, request_id: str, num_tokens: int,
                            num_tokens_main_model: int):
        dropped = self.dropped.get(request_id, 0)
        held = self.req_to_blocks.get(request_id)
        if (held is not None and cdiv(num_tokens - dropped, self.block_size) <= len(held)
                and request_id not in self._partial_hit_reqs):
            return []  # most decode steps: the last block has room (vLLM's rule, short-cut)
        new_blocks = super().allocate_new_blocks(
            request_id, num_tokens - dropped, num_tokens_main_model - dropped
        )
        if new_blocks:  # the count only grows here
            table = self.table
            if table is not None and (row := table.row_of.get(request_id)) is not None:
                table.append_blocks(row, [b.block_id for b in new_blocks])
            held = len(self.req_to_blocks[request_id])
            if held > self.peak_blocks.get(request_id, 0):
                self.peak_blocks[request_id] = held
        return new_blocks

    def request_stats(self, request_id: str, num_computed: int) -> dict[str, float] | None:
        """Per-request KV figures once ``num_computed`` tokens have KV: tokens, retained and
        evicted tokens, retained ratio, and the most blocks held at once."""
        if not num_computed:
            return None
        evicted = self.dropped.get(request_id, 0)
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
        # A preempted request's counters stay in py_counts until it finishes (take_counts).
        if self.dropped.pop(request_id, None) is not None:
            self.num_records_popped += 1
            if self._py.pop(request_id, None) is None:
                self._untable(request_id)
                del self._py[request_id]
        self.peak_blocks.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:  # noqa: ANN001
        # Only a cache still laid out by position (nothing evicted: block i holds tokens
        # [i * block_size, (i + 1) * block_size)) matches the request's block hashes.
        if not self.num_dropped(request.request_id):
            super().cache_blocks(request, num_tokens, *args, **kwargs)


def fast_allocate_slots(kv_cache_manager, mgr: SepLLMManager) -> Callable:
    """``kv_cache_manager.allocate_slots`` with a short cut for the common decode step of a
    running request (SEPLLM's scheduler installs it on its own ``KVCacheManager``).

    vLLM's ``allocate_slots`` runs for every scheduled request every step; at 512 running
    requests its Python (coordinator, block-pool checks, ``cache_blocks``) was ~2.4 ms of the
    engine core's host time per decode step on the H200 (benchmarks/README.md, "Per-step host
    time").
    For a running request asking for new tokens only (no prefix hits, no external or encoder
    tokens, no lookahead past what it holds), whose held blocks already cover its cached tokens
    after this step (``cdiv(num_computed + new + lookahead - D, block_size) <= held``) and which
    registers nothing (prefix caching off, or ``D > 0``: ``SepLLMManager.cache_blocks`` does
    nothing then), vLLM's method does nothing and returns its empty ``KVCacheBlocks``: full
    attention skips no block, there is nothing to allocate, the free-block check passes (no
    watermark for a running request) and nothing is cached. The short cut returns the same
    object at once; every other call goes to vLLM's method. ``tests/test_manager_fuzz.py``
    runs both on every call of its prefix-caching fuzz and compares them."""
    from vllm.v1.request import RequestStatus

    allocate = kv_cache_manager.allocate_slots
    empty = kv_cache_manager.empty_kv_cache_blocks
    max_len = kv_cache_manager.max_model_len
    # (vLLM 0.26 asks the KVCacheManager's flag, 0.32+ the manager's before cache_blocks)
    caching = bool(kv_cache_manager.enable_caching or mgr.enable_caching)
    bs = mgr.block_size
    dropped = mgr.dropped
    held_of = mgr.req_to_blocks
    partial = mgr._partial_hit_reqs
    running = RequestStatus.RUNNING

    def allocate_slots(request, num_new_tokens, num_new_computed_tokens=0,
                       new_computed_blocks=None, num_lookahead_tokens=0, *args, **kwargs):
        if (new_computed_blocks is None and not num_new_computed_tokens and not args
                and not kwargs and num_new_tokens > 0 and request.status is running):
            rid = request.request_id
            d = dropped.get(rid, 0)
            held = held_of.get(rid)
            if held and (d or not caching) and rid not in partial:
                need = request.num_computed_tokens + num_new_tokens + num_lookahead_tokens
                if need > max_len:
                    need = max_len
                if need - d <= len(held) * bs:
                    return empty
        return allocate(request, num_new_tokens, num_new_computed_tokens, new_computed_blocks,
                        num_lookahead_tokens, *args, **kwargs)

    return allocate_slots


def _register() -> None:
    # The registry fills in vLLM's built-in specs only while it is empty: do that first.
    register_all_kvcache_specs(None)
    KVCacheSpecRegistry.register(
        SepLLMSpec, SepLLMManager, uniform_type_base_spec=FullAttentionSpec
    )


# Registered on import: unpickling a SepLLMSpec (engine core receives the workers' specs)
# imports this module, so the registry knows the spec before KV-cache groups are formed.
_register()
