"""Many requests' compacted KV caches in numpy arrays, advanced in one batched operation.

:class:`~vllm_sepllm.policy.RequestCache` is the reference: one request, pure Python, any
step. At 512 running requests, calling it per request on every decode step is most of the
scheduler's SepLLM time (exact eviction evicts one token per request per step). A
:class:`CacheTable` holds the same state for many requests, one row each, and advances a batch
of rows with a fixed number of numpy operations whatever the batch size; per step only the
token ids leaving the window are read per request (one C-level ``map``). It produces exactly
what ``RequestCache.advance`` would (the same holes, the same moves in the same order, the same
``D``; ``tests/test_cache_table.py`` compares them on random streams), for the steps it takes:

* ``n`` grows by at most :attr:`CacheTable.max_step` positions since the row's last advance
  (decode steps; batched eviction's catch-up of ``c - |R|`` tokens); a longer prefill chunk
  goes through ``RequestCache`` (the manager moves the row out and back);
* no copy-out (the manager keeps rows that may hold shared prefix blocks on the
  per-request path until their first eviction);
* a separator cap (``sep_cap`` not None) and a window of at most :attr:`CacheTable.max_window`.

State of row ``r`` (the request's ``RequestCache`` fields, as arrays):

* ``slots[r, :L[r]]``: the logical position held at each cache index;
* ``n[r]`` (``num_computed``), ``f[r]`` (``frontier``: positions in ``[a, f)`` are classified),
  ``D[r]`` (``num_evicted``), ``L[r]`` (cache length);
* the inverse, only where eviction looks things up: ``winv[r, p % M[r]]`` is the cache index of
  every unclassified position ``p`` in ``[f, n)`` (a ring of ``M = w + max_step`` entries, enough
  for one step's appended and classified positions), and the kept separators, a ring of
  ``s[r]`` entries holding ``sep_cnt[r]`` positions ``sep_pos`` (oldest at ``sep_head[r]``)
  with their cache indices ``sep_idx``;
* the request's block ids ``blk[r, :nb[r]]`` (the manager keeps them equal to vLLM's block
  list), so that moves become physical slots without a per-request walk;
* per-request counters ``freed``/``comps`` (blocks freed by compaction, compactions sent).
"""

from __future__ import annotations

import dataclasses
import operator
from collections import deque
from collections.abc import Collection, Sequence
from itertools import chain, repeat

import numpy as np

from vllm_sepllm.policy import RequestCache, Retention

I64 = np.int64
_EMPTY = np.empty(0, dtype=I64)


def seg_arange(counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(c) for c in counts])`` without the loop (``counts >= 0``)."""
    total = int(counts.sum())
    if not total:
        return _EMPTY
    starts = np.cumsum(counts) - counts
    return np.arange(total, dtype=I64) - np.repeat(starts, counts)


def segments(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment of each element, offset in its segment) of ``counts[i]`` elements per segment
    ``i``: ``repeat(arange(len(counts)), counts)`` and :func:`seg_arange`."""
    rep = np.repeat(np.arange(counts.shape[0], dtype=I64), counts)
    if not rep.size:
        return rep, _EMPTY
    starts = np.cumsum(counts) - counts
    return rep, np.arange(rep.size, dtype=I64) - starts[rep]


@dataclasses.dataclass
class TableStep:
    """What :meth:`CacheTable.advance` did to its batch (``rows``, in the given order).

    ``evicted[i]``: tokens dropped from ``rows[i]``; ``length[i]``: its cache length now.
    Moves, grouped by batch index (ascending) and within a row in ``RequestCache`` order:
    ``move_batch[j]`` (index into ``rows``), cache indices ``src[j] -> dst[j]``.
    """

    rows: np.ndarray
    evicted: np.ndarray
    length: np.ndarray
    move_batch: np.ndarray
    src: np.ndarray
    dst: np.ndarray


class CacheTable:
    """Rows of compacted-cache state for many requests (see the module docstring)."""

    _ROW_FIELDS = ("n", "f", "D", "L", "a", "s", "w", "M", "sep_cnt", "sep_head", "nb", "freed",
                   "comps")
    _COL_FIELDS = {"slots": "lw", "winv": "mw", "sep_pos": "sw", "sep_idx": "sw", "blk": "bw"}

    def __init__(self, sep_ids: Collection[int], cache_size: int | None = None,
                 max_step: int = 256, max_window: int = 1 << 14) -> None:
        self.sep_ids = sep_ids
        ids = np.fromiter((int(t) for t in sep_ids), dtype=I64)
        ids = ids[ids >= 0]
        # Separator lookup by token id; the last entry (never a separator) catches ids past
        # the largest separator id.
        self.sep_lut = np.zeros(int(ids.max()) + 2 if ids.size else 1, dtype=bool)
        self.sep_lut[ids] = True
        self.cache_size = cache_size
        #: Most positions a row may advance by in one batched step.
        self.max_step = max_step
        #: Largest window a row may have (ring memory: ``w + max_step`` per row).
        self.max_window = max_window
        self.capacity = 0
        self.lw = self.mw = self.sw = self.bw = 0
        for name in self._ROW_FIELDS:
            setattr(self, name, _EMPTY)
        for name in self._COL_FIELDS:
            setattr(self, name, np.empty((0, 0), dtype=I64))
        #: Request id of each row (None: free), as an object array (gathered in one call).
        self.owner = np.empty(0, dtype=object)
        self.retention: list[Retention | None] = []
        self.row_of: dict[str, int] = {}
        #: Bumped whenever a request gets or loses a row (callers may cache ``rows_of``).
        self.generation = 0
        self._free_rows: list[int] = []
        self._grow_rows(1)  # (row 0 exists: callers may index it for requests without a row)

    # ------------------------------------------------------------------ rows
    def __len__(self) -> int:
        return len(self.row_of)

    def __contains__(self, rid: str) -> bool:
        return rid in self.row_of

    def accepts(self, retention: Retention) -> bool:
        """Whether a request with ``retention`` may live in the table."""
        return retention.sep_cap is not None and retention.window <= self.max_window

    def _grow_rows(self, need: int) -> None:
        new = max(need, 2 * self.capacity, 64)
        for name in self._ROW_FIELDS:
            old = getattr(self, name)
            arr = np.zeros(new, dtype=I64)
            arr[: old.shape[0]] = old
            setattr(self, name, arr)
        for name, width in self._COL_FIELDS.items():
            old = getattr(self, name)
            arr = np.zeros((new, getattr(self, width)), dtype=I64)
            arr[: old.shape[0]] = old
            setattr(self, name, arr)
        owner = np.empty(new, dtype=object)
        owner[: self.capacity] = self.owner
        self.owner = owner
        self.retention += [None] * (new - self.capacity)
        self._free_rows.extend(range(new - 1, self.capacity - 1, -1))
        self.capacity = new

    def _grow_cols(self, width: str, need: int) -> None:
        old_w = getattr(self, width)
        if need <= old_w:
            return
        new_w = max(need, old_w + old_w // 2)
        for name, w in self._COL_FIELDS.items():
            if w != width:
                continue
            old = getattr(self, name)
            arr = np.zeros((self.capacity, new_w), dtype=I64)
            arr[:, :old_w] = old
            setattr(self, name, arr)
        setattr(self, width, new_w)

    def add(self, rid: str, cache: RequestCache, block_ids: Sequence[int]) -> int:
        """Take ``cache`` (a request's record, which the table then holds) and the request's
        block ids into a new row; returns the row."""
        r = cache.retention
        assert self.accepts(r) and rid not in self.row_of
        if not self._free_rows:
            self._grow_rows(self.capacity + 1)
        row = self._free_rows.pop()
        n, f, length = cache.num_computed, cache.frontier, len(cache.slots)
        m = r.window + self.max_step
        c = self.cache_size or 0
        self._grow_cols("lw", max(length, r.num_sinks + r.sep_cap + r.window, c)
                        + self.max_step + 1)
        self._grow_cols("mw", m)
        self._grow_cols("sw", r.sep_cap)
        self._grow_cols("bw", len(block_ids))
        self.n[row], self.f[row], self.D[row], self.L[row] = n, f, cache.num_evicted, length
        self.a[row], self.s[row], self.w[row], self.M[row] = (r.num_sinks, r.sep_cap, r.window,
                                                              m)
        slots = np.asarray(cache.slots, dtype=I64)
        self.slots[row, :length] = slots
        unclassified = np.flatnonzero(slots >= f)  # positions in [f, n): all still cached
        self.winv[row, slots[unclassified] % m] = unclassified
        seps = list(cache.seps)
        self.sep_cnt[row] = len(seps)
        self.sep_head[row] = 0
        self.sep_pos[row, : len(seps)] = seps
        self.sep_idx[row, : len(seps)] = [cache.index[p] for p in seps]
        self.nb[row] = len(block_ids)
        self.blk[row, : len(block_ids)] = block_ids
        self.freed[row] = self.comps[row] = 0
        self.owner[row] = rid
        self.retention[row] = r
        self.row_of[rid] = row
        self.generation += 1
        return row

    def snapshot(self, row: int) -> RequestCache:
        """The row as a ``RequestCache`` (a copy: the table is not changed)."""
        cache = RequestCache(self.retention[row], self.sep_ids, self.cache_size)
        cache.slots = self.slots[row, : self.L[row]].tolist()
        cache.index = {p: i for i, p in enumerate(cache.slots)}
        cache.frontier = int(self.f[row])
        cache.seps = deque(self.sep_pos[row, self._sep_cols(row)].tolist())
        cache.num_computed = int(self.n[row])
        cache.num_evicted = int(self.D[row])
        return cache

    def _sep_cols(self, row: int) -> np.ndarray:
        """Columns of the row's kept separators, oldest first."""
        cap = max(int(self.s[row]), 1)
        return (self.sep_head[row] + np.arange(self.sep_cnt[row], dtype=I64)) % cap

    def remove(self, rid: str) -> tuple[RequestCache, int, int]:
        """Drop ``rid``'s row; returns its record as a ``RequestCache`` and its counters
        (blocks freed, compactions)."""
        row = self.row_of.pop(rid)
        self.generation += 1
        out = self.snapshot(row), int(self.freed[row]), int(self.comps[row])
        self.owner[row] = self.retention[row] = None
        self._free_rows.append(row)
        return out

    def rows_of(self, rids: Sequence[str]) -> np.ndarray:
        """Row of each request id, -1 where it has none (one C-level pass)."""
        get = self.row_of.get
        return np.fromiter(map(get, rids, repeat(-1)), dtype=I64, count=len(rids))

    # ------------------------------------------------------------------ block ids
    def append_blocks(self, row: int, block_ids: Sequence[int]) -> None:
        nb = int(self.nb[row])
        self._grow_cols("bw", nb + len(block_ids))
        self.blk[row, nb: nb + len(block_ids)] = block_ids
        self.nb[row] = nb + len(block_ids)

    def physical(self, rows: np.ndarray, idx: np.ndarray, block_size: int) -> np.ndarray:
        """Physical KV slot of cache index ``idx[j]`` of row ``rows[j]``."""
        return self.blk[rows, idx // block_size] * block_size + idx % block_size

    # ------------------------------------------------------------------ the batched step
    def fits(self, rows: np.ndarray, ns: np.ndarray) -> np.ndarray:
        """Which rows :meth:`advance` can take to ``ns`` (the others need ``RequestCache``)."""
        k = ns - self.n[rows]
        return (k >= 0) & (k <= self.max_step) & (self.L[rows] + k < self.lw)

    def advance(self, rows: np.ndarray, ns: np.ndarray,
                token_lists: Sequence[Sequence[int]]) -> TableStep:
        """``RequestCache.advance(ns[i], token_lists[i])`` for every row ``rows[i]`` (distinct
        rows that :meth:`fits` ``ns``; with a ``cache_size``, rows that are due: ``ns - D >
        cache_size``), at once. Each row's moves come in ``RequestCache``'s order."""
        w, f0 = self.w[rows], self.f[rows]
        # Decode steps of exact eviction: one new position, one leaving the window.
        decode = (ns - self.n[rows] == 1) & (ns - w == f0) & (w > 1)
        if decode.all():
            return self._advance_decode(rows, ns, token_lists)
        if not decode.any():
            return self._advance_general(rows, ns, token_lists)
        i1, i2 = np.flatnonzero(decode), np.flatnonzero(~decode)
        a = self._advance_decode(rows[i1], ns[i1], [token_lists[i] for i in i1.tolist()])
        b = self._advance_general(rows[i2], ns[i2], [token_lists[i] for i in i2.tolist()])
        evicted = np.empty(rows.shape[0], dtype=I64)
        length = np.empty(rows.shape[0], dtype=I64)
        evicted[i1], evicted[i2] = a.evicted, b.evicted
        length[i1], length[i2] = a.length, b.length
        return TableStep(rows, evicted, length,
                         np.concatenate((i1[a.move_batch], i2[b.move_batch])),
                         np.concatenate((a.src, b.src)), np.concatenate((a.dst, b.dst)))

    def _tokens(self, token_lists: Sequence[Sequence[int]], start: np.ndarray,
                stop: np.ndarray, total: int) -> np.ndarray:
        """Token ids of positions ``[start[i], stop[i])`` of each list, concatenated; raises as
        ``RequestCache.advance`` does when one is not known yet (async scheduling)."""
        try:
            if total == len(token_lists):  # one position per row (decode steps)
                return np.fromiter(map(operator.getitem, token_lists, start.tolist()),
                                   dtype=I64, count=total)
            return np.fromiter(chain.from_iterable(map(
                operator.getitem, token_lists, map(slice, start.tolist(), stop.tolist()))),
                dtype=I64, count=total)
        except (IndexError, ValueError):  # a list too short (ValueError: fromiter's count)
            lens = np.fromiter(map(len, token_lists), dtype=I64, count=len(token_lists))
            if not (stop > lens).any():
                raise
            i = int(np.flatnonzero(stop > lens)[0])
            raise RuntimeError(
                f"sepllm: token id of position {int(lens[i])} is not known yet "
                f"(window start {int(stop[i])}); window too small for async scheduling"
            ) from None

    def _is_sep(self, toks: np.ndarray) -> np.ndarray:
        lut = self.sep_lut
        toks[(toks < 0) | (toks >= lut.shape[0])] = lut.shape[0] - 1
        return lut[toks]

    def _advance_decode(self, rows: np.ndarray, ns: np.ndarray,
                        token_lists: Sequence[Sequence[int]]) -> TableStep:
        """:meth:`advance` for rows that gained one position (``ns - 1``) and lose one from the
        window (``f``), ``w > 1`` (``RequestCache._fill_one``)."""
        pos = ns - 1
        length = self.L[rows]  # the new position's cache index (the last one)
        ring = self.M[rows]
        self.slots[rows, length] = pos
        self.winv[rows, pos % ring] = length
        p = self.f[rows]
        self.L[rows] = length + 1  # (as RequestCache: counted in even if a token is unknown)
        self.n[rows] = ns
        is_sep = self._is_sep(self._tokens(token_lists, p, p + 1, rows.shape[0]))
        idx_p = self.winv[rows, p % ring]
        hole = idx_p.copy()
        si = np.flatnonzero(is_sep)
        if si.size:
            rs, ps, ips = rows[si], p[si], idx_p[si]
            cnt, cap, head = self.sep_cnt[rs], self.s[rs], self.sep_head[rs]
            room = cnt < cap  # kept; else the oldest leaves (cap 0: the new one itself)
            if room.any():
                r1 = rs[room]
                col = (head[room] + cnt[room]) % cap[room]
                self.sep_pos[r1, col] = ps[room]
                self.sep_idx[r1, col] = ips[room]
                self.sep_cnt[r1] += 1
                hole[si[room]] = -1
            full = ~room & (cap > 0)
            if full.any():
                r2, h2 = rs[full], head[full]
                hole[si[full]] = self.sep_idx[r2, h2]
                self.sep_pos[r2, h2] = ps[full]
                self.sep_idx[r2, h2] = ips[full]
                self.sep_head[r2] = (h2 + 1) % cap[full]
        evicted = (hole >= 0).astype(I64)
        new_len = length + 1 - evicted
        mb = np.flatnonzero((hole >= 0) & (hole != length))
        if mb.size:  # the last slot (the new position, still in the window) fills the hole
            rm, dm = rows[mb], hole[mb]
            self.slots[rm, dm] = pos[mb]
            self.winv[rm, pos[mb] % ring[mb]] = dm
        self.L[rows] = new_len
        self.D[rows] += evicted
        self.f[rows] = p + 1
        return TableStep(rows, evicted, new_len, mb, length[mb], hole[mb])

    def _advance_general(self, rows: np.ndarray, ns: np.ndarray,
                         token_lists: Sequence[Sequence[int]]) -> TableStep:
        """:meth:`advance` for any steps that fit (``RequestCache._fill_holes``)."""
        b = rows.shape[0]
        n_old, f0, length0 = self.n[rows], self.f[rows], self.L[rows]
        w, ring = self.w[rows], self.M[rows]
        k = ns - n_old
        # 1. The positions computed since the row's last advance take the next cache indices.
        rep, off = segments(k)
        if rep.size:
            rr = rows[rep]
            ring_rep = ring[rep]
            pos = n_old[rep] + off
            idx = length0[rep] + off
            self.slots[rr, idx] = pos
            self.winv[rr, pos % ring_rep] = idx
        length = length0 + k
        self.n[rows] = ns
        ws = ns - w + 1  # window start of query n
        m = ws - f0  # positions leaving the window: [f, ws)
        m[m < 0] = 0
        if (m == k).all():  # a full window moved by the new positions (the usual step)
            cls = np.arange(b, dtype=I64) if k.all() else np.flatnonzero(k)
            rep_c, off_c = rep, off
        else:
            cls = np.flatnonzero(m)
            rep_c, off_c = segments(m)
            rr = rows[rep_c]
            ring_rep = ring[rep_c]
        if not rep_c.size:
            self.L[rows] = length
            z = np.zeros(b, dtype=I64)
            return TableStep(rows, z, length, _EMPTY, _EMPTY, _EMPTY)
        # 2. Their token ids (the one per-request read of the step).
        lists = token_lists if cls.size == b else [token_lists[i] for i in cls.tolist()]
        self.L[rows] = length  # (as RequestCache: counted in even if a token is unknown)
        is_sep = self._is_sep(self._tokens(lists, f0[cls], ws[cls], rep_c.size))
        p = f0[rep_c] + off_c
        idx_p = self.winv[rr, p % ring_rep]
        f_new = np.maximum(f0, ws)
        # 3. Separators join the kept ones; past the cap the oldest leave (holes).
        hole_b = [rep_c[~is_sep]]
        hole_i = [idx_p[~is_sep]]
        j = np.bincount(rep_c[is_sep], minlength=b)
        ch = np.flatnonzero(j)
        if ch.size:
            # Per row: the oldest kept ones leave first (pe), then, past the cap, the first
            # new ones (pn); the other new ones go to the back of the ring.
            rch = rows[ch]
            jc, cnt, cap, head = j[ch], self.sep_cnt[rch], self.s[rch], self.sep_head[rch]
            over = cnt + jc - cap
            over[over < 0] = 0
            pe = np.minimum(over, cnt)
            pn = over - pe
            capm = np.maximum(cap, 1)
            if pe.any():
                loc, t = segments(pe)
                col = (head[loc] + t) % capm[loc]
                hole_b.append(ch[loc])
                hole_i.append(self.sep_idx[rch[loc], col])
            loc, t = segments(jc)
            t -= pn[loc]  # rank among the new ones that stay (< 0: they leave at once)
            ps, ips = p[is_sep], idx_p[is_sep]
            gone = t < 0
            if gone.any():
                hole_b.append(ch[loc[gone]])
                hole_i.append(ips[gone])
                stay = ~gone
                loc, t, ps, ips = loc[stay], t[stay], ps[stay], ips[stay]
            col = (head[loc] + cnt[loc] + t) % capm[loc]
            self.sep_pos[rch[loc], col] = ps
            self.sep_idx[rch[loc], col] = ips
            self.sep_head[rch] = (head + pe) % capm
            self.sep_cnt[rch] = cnt + jc - over
        hb = np.concatenate(hole_b)
        hi = np.concatenate(hole_i)
        evicted = np.bincount(hb, minlength=b)
        self.f[rows] = f_new
        if not hb.size:
            self.L[rows] = length
            return TableStep(rows, evicted, length, _EMPTY, _EMPTY, _EMPTY)
        # 4. Fill: holes below the new length take the live tail slots, both ascending
        #    (RequestCache._fill_holes).
        new_len = length - evicted
        lw = self.lw
        key = hb * lw + hi
        key.sort()
        hb, hi = key // lw, key % lw
        below = hi < new_len[hb]
        dst_b, dst = hb[below], hi[below]
        rep_t, t = segments(evicted)
        t += new_len[rep_t]  # the tail [new_len, length)
        tkey = rep_t * lw + t
        at = np.searchsorted(key, tkey)
        at[at >= key.size] = key.size - 1
        live = key[at] != tkey
        src_b, src = rep_t[live], t[live]
        if src.size:
            rr = rows[src_b]
            moved = self.slots[rr, src]
            self.slots[rr, dst] = moved
            # The moved positions' inverse: unclassified ones in the ring, kept separators in
            # the separator list (sinks are never looked up).
            win = moved >= f_new[src_b]
            self.winv[rr[win], moved[win] % ring[src_b[win]]] = dst[win]
            sep = ~win & (moved >= self.a[rr])
            if sep.any():
                r2, q2 = rr[sep], moved[sep]
                hit = self.sep_pos[r2] == q2[:, None]
                age = (np.arange(self.sw, dtype=I64)[None, :] - self.sep_head[r2][:, None]) \
                    % np.maximum(self.s[r2], 1)[:, None]
                hit &= age < self.sep_cnt[r2][:, None]
                self.sep_idx[r2, hit.argmax(1)] = dst[sep]
        self.L[rows] = new_len
        self.D[rows] += evicted
        return TableStep(rows, evicted, new_len, src_b, src, dst)

    # ------------------------------------------------------------------ checks (tests)
    def check_row(self, row: int) -> None:
        """Assert the row's derived state (inverse ring, separator list) matches its
        ``slots`` (tests)."""
        length, f, a, ring = int(self.L[row]), int(self.f[row]), int(self.a[row]), int(self.M[row])
        slots = self.slots[row, :length]
        assert len(set(slots.tolist())) == length
        assert all(p < self.n[row] for p in slots.tolist())
        for i, p in enumerate(slots.tolist()):
            if p >= f:
                assert self.winv[row, p % ring] == i, (row, p, i)
        cnt = int(self.sep_cnt[row])
        cols = self._sep_cols(row)
        seps = self.sep_pos[row, cols].tolist()
        assert seps == sorted(p for p in slots.tolist() if a <= p < f), (row, seps)
        assert cnt <= self.s[row]
        for p, i in zip(seps, self.sep_idx[row, cols].tolist()):
            assert slots[i] == p
