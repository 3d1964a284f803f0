"""The batched cache table (``cache_table.CacheTable``) = ``policy.RequestCache`` per request.

Random requests (sinks, separator cap, window, separator density; exact eviction or a
``cache_size``) advance together on random step sizes: mostly decode steps, sometimes several
tokens, some requests idle, now and then a step longer than the table takes (the request then
leaves the table, advances through its ``RequestCache`` and comes back, as the manager does).
After every step each request's table row must equal its reference ``RequestCache``: the same
holes, the same moves in the same order, the same ``D``, cache contents, frontier, kept
separators; the row's inverse index and separator list must agree with its slots.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from vllm_sepllm.cache_table import CacheTable, seg_arange
from vllm_sepllm.policy import RequestCache, Retention

SEP_IDS = frozenset({1, 2, 7})
BS = 4


def test_seg_arange():
    counts = np.array([0, 3, 1, 0, 2], dtype=np.int64)
    assert seg_arange(counts).tolist() == [0, 1, 2, 0, 0, 1]
    assert seg_arange(np.zeros(3, dtype=np.int64)).size == 0


def random_tokens(rng: random.Random, n: int, density: float) -> list[int]:
    return [rng.choice(sorted(SEP_IDS)) if rng.random() < density else rng.randrange(10, 60)
            for _ in range(n)]


@pytest.mark.parametrize("seed", range(12))
def test_table_equals_request_cache(seed):
    rng = random.Random(seed)
    batched = seed % 3 == 2
    max_step = rng.choice([2, 8, 64] if not batched else [16, 64])
    retentions = [Retention(rng.randrange(0, 6), rng.randrange(0, 9), rng.randrange(1, 40))
                  for _ in range(rng.randrange(1, 24))]
    cache_size = None
    if batched:
        cache_size = max(r.num_sinks + r.sep_cap + r.window for r in retentions) \
            + rng.randrange(0, 12)
    table = CacheTable(SEP_IDS, cache_size, max_step=max_step)
    reqs = []
    for i, r in enumerate(retentions):
        toks = random_tokens(rng, 3000, rng.choice([0.0, 0.1, 0.3, 0.8]))
        reqs.append({"rid": f"r{i}", "r": r, "toks": toks, "n": 0,
                     "ref": RequestCache(r, SEP_IDS, cache_size)})
    steps = moved = evicted = fallbacks = 0
    for _ in range(150):
        # step sizes: a prompt-like first chunk, then mostly one token
        for q in reqs:
            if q["n"] == 0:
                q["n"] = rng.randrange(1, 120)
            else:
                q["n"] += rng.choice([0, 1, 1, 1, 1, 1, 2, 3, max_step, max_step + 5])
            q["n"] = min(q["n"], len(q["toks"]))
        # reference, and which requests the table advances
        expect = {}
        batch = []
        for q in reqs:
            ref, n = q["ref"], q["n"]
            in_table = q["rid"] in table
            due = (n > ref.num_computed) if cache_size is None \
                else (n - ref.num_evicted > cache_size)
            comp = ref.advance(n, q["toks"])
            expect[q["rid"]] = comp
            if not in_table:
                continue
            row = table.row_of[q["rid"]]
            if not due:
                assert not comp.num_evicted and not comp.src
                continue
            if table.fits(np.array([row]), np.array([n]))[0]:
                batch.append(q)
            else:  # leave the table, advance per request, come back
                fallbacks += 1
                cache, freed, comps = table.remove(q["rid"])
                got = cache.advance(n, q["toks"])
                assert (got.src, got.dst, got.num_evicted) == (comp.src, comp.dst,
                                                                comp.num_evicted)
                table.add(q["rid"], cache, list(range(100)))
        if batch:
            rows = np.array([table.row_of[q["rid"]] for q in batch], dtype=np.int64)
            ns = np.array([q["n"] for q in batch], dtype=np.int64)
            st = table.advance(rows, ns, [q["toks"] for q in batch])
            for i, q in enumerate(batch):
                comp = expect[q["rid"]]
                sel = st.move_batch == i
                assert st.evicted[i] == comp.num_evicted, q["rid"]
                assert st.src[sel].tolist() == comp.src, q["rid"]
                assert st.dst[sel].tolist() == comp.dst, q["rid"]
                assert st.length[i] == len(q["ref"])
                moved += len(comp.src)
                evicted += comp.num_evicted
        # newcomers join the table once they have a record (as the manager does)
        for q in reqs:
            if q["rid"] not in table:
                table.add(q["rid"], q["ref"], list(range(100)))
                q["ref"] = table.snapshot(table.row_of[q["rid"]])  # a copy to follow
        for q in reqs:
            row = table.row_of[q["rid"]]
            table.check_row(row)
            snap, ref = table.snapshot(row), q["ref"]
            assert snap.slots == ref.slots and snap.index == ref.index
            assert list(snap.seps) == list(ref.seps)
            assert (snap.frontier, snap.num_computed, snap.num_evicted) == \
                (ref.frontier, ref.num_computed, ref.num_evicted)
        steps += 1
    assert evicted > 0 or fallbacks > 0
    assert fallbacks > 0 or max_step == 64


def test_rows_are_reused_and_blocks_mirrored():
    table = CacheTable(SEP_IDS, None, max_step=4)
    r = Retention(1, 2, 3)
    caches = {}
    for i in range(70):  # past the initial capacity: the arrays grow
        c = RequestCache(r, SEP_IDS)
        c.advance(5, [0, 1, 0, 0, 0, 0])
        caches[f"q{i}"] = c
        table.add(f"q{i}", c, [i, i + 1])
    assert table.capacity >= 70 and len(table) == 70
    row = table.row_of["q5"]
    table.append_blocks(row, [99, 98])
    assert table.blk[row, : table.nb[row]].tolist() == [5, 6, 99, 98]
    assert table.physical(np.array([row, row]), np.array([1, 13]), BS).tolist() == \
        [5 * BS + 1, 98 * BS + 1]
    cache, freed, comps = table.remove("q5")
    assert cache.slots == caches["q5"].slots and (freed, comps) == (0, 0)
    assert "q5" not in table
    new_row = table.add("z", cache, [1])
    assert new_row == row
    assert table.rows_of(["z", "nope", "q0"]).tolist() == [row, -1, table.row_of["q0"]]


def test_unknown_token_raises_like_request_cache():
    table = CacheTable(SEP_IDS, None)
    r = Retention(0, 4, 2)
    c = RequestCache(r, SEP_IDS)
    c.advance(3, [0, 0, 0])
    row = table.add("a", c, [0])
    with pytest.raises(RuntimeError, match="not known yet"):
        table.advance(np.array([row]), np.array([6]), [[0, 0, 0]])
    with pytest.raises(RuntimeError, match="not known yet"):
        RequestCache(r, SEP_IDS).advance(6, [0, 0, 0])
