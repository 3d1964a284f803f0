"""The SepLLM retention policy: which tokens a query sees and which the cache keeps.

Pure Python (no torch): the scheduler runs it, and it is unit-tested on its own.

Semantics
---------
Token ids ``x[0..]``, separator id set ``S``, retention ``(a, s, w)``. A query at position
``t`` sees key position ``p`` iff ``p <= t`` and one of

* **sink**: ``p < a``;
* **window**: ``p > t - w`` (the ``w`` most recent tokens, the query itself included);
* **separator**: ``x[p] in S``, ``a <= p <= t - w``, and fewer than ``s`` separators lie
  strictly between ``p`` and ``t - w + 1`` (the ``s`` newest separators that left the window;
  ``s = None`` keeps all).

Visibility is monotone: a key a query cannot see, no later query sees. So the cache may drop
every token the *next* query cannot see. Before computing positions ``[n, n + q)`` the cache
holds exactly ``R(n) = {p < n : query n sees p}``; the chunk's later queries see a subset of
``R(n)`` plus the chunk (their mask is applied by the attention backend). During decoding
(``q = 1``) the cache plus the new token is exactly what the query sees, so decode attention
needs no mask.

Batched eviction (``cache_size``)
---------------------------------
With a cache size ``c`` (SepCache's and the official streaming code's ``c``) the cache is
not cut at every step: it grows by the computed tokens until it holds more than ``c``, and
only then drops to ``R(n)``. Before computing ``[n, n + q)`` the cache holds ``C(n)``:
``C(n) = R(n)`` if ``C(prev) + [prev, n)`` holds more than ``c`` tokens, else that union; a
query ``t`` of the step sees ``C(n)`` and the step's own tokens up to ``t``: plain causal
attention over the cache, no mask. Per request the eviction work (and the KV moves) come
once every ``c - |R|`` tokens instead of every step.

Compaction
----------
The cache of a request is a dense array of cache indices ``[0, len)``; index ``i`` holds the
token at logical position ``slots[i]`` (any order: attention does not depend on key order, and
RoPE was applied at the logical position). Evicting makes holes; live tokens from the tail
move into holes below the new length, so the array stays dense and the tail blocks can be
freed. New tokens are appended, so a token at position ``p`` computed after ``D`` tokens were
dropped is written at cache index ``p - D``.

Copy-out (prefix caching)
-------------------------
Blocks in vLLM's prefix cache (or held by other requests) must never be written. The first
eviction of a request that holds such blocks therefore lays the cache out anew instead of
compacting in place: the new cache is built from the request's *private* blocks (those holding
the most retained tokens first, then fresh blocks) and every retained token that does not
already sit in one of them is copied there; the request then lets go of every shared block.
Later evictions find only private blocks and compact in place.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Collection, Sequence

#: Window of the ``full`` mode: larger than any context.
FULL_WINDOW = 1 << 62


@dataclasses.dataclass(frozen=True)
class Retention:
    """``a`` sinks, cap ``s`` on separators (``None``: no cap), window ``w`` (query included)."""

    num_sinks: int
    sep_cap: int | None
    window: int


# ------------------------------------------------------------------ reference definitions
def visible(t: int, p: int, token_ids: Sequence[int], sep_ids: Collection[int],
            r: Retention) -> bool:
    """Whether the query at position ``t`` sees key position ``p`` (the definition, O(t))."""
    if p > t:
        return False
    if p < r.num_sinks or p > t - r.window:
        return True
    if token_ids[p] not in sep_ids:
        return False
    if r.sep_cap is None:
        return True
    newer = sum(1 for q in range(p + 1, t - r.window + 1) if token_ids[q] in sep_ids)
    return newer < r.sep_cap


def retained_positions(token_ids: Sequence[int], n: int, sep_ids: Collection[int],
                       r: Retention) -> list[int]:
    """``R(n)``: the positions below ``n`` that the query at ``n`` sees, ascending.

    Linear time; this is what :class:`RequestCache` must hold after :meth:`RequestCache.advance`.
    """
    a, w = r.num_sinks, r.window
    window_start = max(n - w + 1, 0)
    seps = [p for p in range(a, min(window_start, n)) if token_ids[p] in sep_ids]
    if r.sep_cap is not None:
        seps = seps[max(len(seps) - r.sep_cap, 0):] if r.sep_cap else []
    head = list(range(min(a, n)))
    tail = list(range(max(window_start, min(a, n)), n))
    return head + seps + tail


def batched_cache(token_ids: Sequence[int], step_starts: Sequence[int], sep_ids: Collection[int],
                  r: Retention, cache_size: int) -> list[list[int]]:
    """``C(n)`` (batched eviction, see the module docstring) at every step start ``n`` of
    ``step_starts`` (ascending, the first 0): the positions the cache holds, ascending.
    The definition, O(n) per step."""
    cache: list[int] = []
    out = []
    prev = 0
    for n in step_starts:
        cache = cache + list(range(prev, n))
        if len(cache) > cache_size:
            cache = retained_positions(token_ids, n, sep_ids, r)
        out.append(cache)
        prev = n
    return out


# ------------------------------------------------------------------ incremental cache state
@dataclasses.dataclass
class Compaction:
    """What one :meth:`RequestCache.advance` did.

    ``src[i] -> dst[i]``: cache-index moves, ``src >= new_len > dst``; sources and destinations
    are disjoint, so all moves may run at once. ``num_evicted``: tokens dropped.

    ``blocks`` (copy-out only, see the module docstring): the new layout's blocks, as indices
    into the old block list (``-1``: a fresh block). ``src`` then indexes the old layout and
    ``dst`` the new one; a source and a destination never share a physical slot.
    """

    src: list[int]
    dst: list[int]
    num_evicted: int
    blocks: list[int] | None = None


#: The no-op result (shared; callers only read it).
_NOTHING = Compaction([], [], 0)


class RequestCache:
    """Scheduler-side record of one request's compacted KV cache.

    ``slots[i]`` is the logical position held at cache index ``i``. ``num_computed`` is the
    logical length covered (KV of positions ``< num_computed`` was written or evicted).
    """

    __slots__ = ("retention", "sep_ids", "cache_size", "slots", "index", "frontier", "seps",
                 "num_computed", "num_evicted")

    def __init__(self, retention: Retention, sep_ids: Collection[int],
                 cache_size: int | None = None) -> None:
        self.retention = retention
        self.sep_ids = sep_ids
        #: ``c``: evict only once the cache holds more than this (None: every step).
        self.cache_size = cache_size
        self.slots: list[int] = []
        self.index: dict[int, int] = {}
        # Positions in [a, frontier) have been classified (kept as separator or evicted).
        self.frontier = retention.num_sinks
        # Kept separator positions in [a, frontier), oldest first.
        self.seps: deque[int] = deque()
        self.num_computed = 0
        self.num_evicted = 0

    @property
    def num_dropped(self) -> int:
        """``D``: tokens dropped so far (logical minus cached); new token ``p`` goes to cache
        index ``p - D``."""
        return self.num_evicted

    def __len__(self) -> int:
        return len(self.slots)

    def advance(self, n: int, token_ids: Sequence[int], block_size: int = 0,
                is_private: Callable[[int], bool] | None = None) -> Compaction:
        """Record that positions ``< n`` are computed, evict what query ``n`` cannot see and
        compact. ``token_ids`` must hold (at least) the ids of positions ``< n - w + 1``.

        With a ``cache_size`` nothing happens until the cache would hold more than ``c``
        tokens (``slots`` then catches up on the positions computed meanwhile).

        ``is_private(b)``: whether block ``b`` (cache indices ``[b * block_size, (b + 1) *
        block_size)``) may be written; when some block may not, an eviction copies out
        (module docstring) instead of compacting in place."""
        slots, index = self.slots, self.index
        if n < self.num_computed:
            raise ValueError(
                f"RequestCache.advance: n={n} is below num_computed={self.num_computed}"
            )
        if self.cache_size is not None and n - self.num_evicted <= self.cache_size:
            return _NOTHING
        for p in range(self.num_computed, n):
            index[p] = len(slots)
            slots.append(p)
        self.num_computed = n

        r = self.retention
        window_start = n - r.window + 1
        frontier = self.frontier
        if window_start <= frontier:
            return _NOTHING
        if window_start > len(token_ids):
            raise RuntimeError(
                f"sepllm: token id of position {len(token_ids)} is not known yet "
                f"(window start {window_start}); window too small for async scheduling"
            )
        self.frontier = window_start
        seps, sep_ids, cap = self.seps, self.sep_ids, r.sep_cap
        holes: list[int] = []
        for p in range(frontier, window_start):
            if token_ids[p] in sep_ids:
                seps.append(p)
                if cap is not None and len(seps) > cap:
                    holes.append(index.pop(seps.popleft()))
            else:
                holes.append(index.pop(p))
        if not holes:
            return _NOTHING
        self.num_evicted += len(holes)
        if is_private is not None:
            num_blocks = -(-len(slots) // block_size)
            if not all(is_private(b) for b in range(num_blocks)):
                return self._copy_out(holes, block_size, is_private, num_blocks)
        if len(holes) == 1:  # steady decode: one token leaves the window each step
            return self._fill_one(holes[0])
        return self._fill_holes(holes)

    def _fill_one(self, hole: int) -> Compaction:
        """One hole: the last slot moves into it (unless it is the last slot)."""
        slots = self.slots
        last = len(slots) - 1
        pos = slots.pop()
        if hole == last:
            return Compaction([], [], 1)
        slots[hole] = pos
        self.index[pos] = hole
        return Compaction([last], [hole], 1)

    def _fill_holes(self, holes: list[int]) -> Compaction:
        slots = self.slots
        new_len = len(slots) - len(holes)
        hole_set = set(holes)
        dst = sorted(h for h in holes if h < new_len)
        src = [i for i in range(new_len, len(slots)) if i not in hole_set]
        for s, d in zip(src, dst):
            pos = slots[s]
            slots[d] = pos
            self.index[pos] = d
        del slots[new_len:]
        return Compaction(src, dst, len(holes))

    def _copy_out(self, holes: list[int], block_size: int, is_private: Callable[[int], bool],
                  num_blocks: int) -> Compaction:
        """Lay the retained tokens out over private blocks only (module docstring): the
        private blocks holding the most retained tokens keep their place and their tokens;
        every other retained token is copied into a free slot below the new length."""
        slots, bs = self.slots, block_size
        old_len = len(slots)
        new_len = old_len - len(holes)
        hole_set = set(holes)
        live = [0] * num_blocks
        for i in range(old_len):
            if i not in hole_set:
                live[i // bs] += 1
        private = [b for b in range(num_blocks) if is_private(b)]
        private.sort(key=lambda b: -live[b])  # stable: lower blocks first among equals
        chosen = private[: -(-new_len // bs)]
        blocks = chosen + [-1] * (-(-new_len // bs) - len(chosen))
        new_slots = [-1] * new_len
        staying = set()
        for j, b in enumerate(chosen):
            for o in range(min(bs, new_len - j * bs)):
                i = b * bs + o
                if i < old_len and i not in hole_set:
                    new_slots[j * bs + o] = slots[i]
                    staying.add(i)
        src = [i for i in range(old_len) if i not in hole_set and i not in staying]
        dst = [k for k in range(new_len) if new_slots[k] < 0]
        for i, k in zip(src, dst, strict=True):
            new_slots[k] = slots[i]
        self.slots = new_slots
        self.index = {pos: k for k, pos in enumerate(new_slots)}
        return Compaction(src, dst, len(holes), blocks)
