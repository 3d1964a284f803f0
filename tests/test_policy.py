"""Retention policy: the incremental cache equals the definition, under any chunking."""

import random

import pytest

from vllm_sepllm.policy import (
    FULL_WINDOW,
    RequestCache,
    Retention,
    batched_cache,
    retained_positions,
    visible,
)

SEP = 1  # token id 1 is the separator in these tests


def seq(text: str) -> list[int]:
    """'x' = ordinary token, '.' = separator."""
    return [SEP if c == "." else 0 for c in text]


def brute_retained(ids, n, r):
    return [p for p in range(n) if visible(n, p, ids, {SEP}, r)]


@pytest.mark.parametrize("r", [
    Retention(2, 2, 3), Retention(0, None, 1), Retention(4, 0, 5), Retention(1, 1, 1),
    Retention(3, None, 4), Retention(0, 0, 2),
])
@pytest.mark.parametrize("text", [
    "", "x", "xx.x", "." * 30, "x" * 30, "x.x.xx..x.xxx.x.x..xxxx.x.x", "..xx" * 9,
])
def test_retained_matches_definition(r, text):
    ids = seq(text)
    for n in range(len(ids) + 1):
        assert retained_positions(ids, n, {SEP}, r) == brute_retained(ids, n, r)


def test_hand_example():
    # a=2, s=1, w=3; positions 0..9 "xx.x.xx.xx"
    ids = seq("xx.x.xx.xx")
    r = Retention(2, 1, 3)
    # query 9: window = 7,8,9; separators before 7 at 2 and 4 -> only the newest (4) is kept.
    assert retained_positions(ids, 9, {SEP}, r) == [0, 1, 4, 7, 8]
    assert not visible(9, 2, ids, {SEP}, r) and visible(9, 4, ids, {SEP}, r)
    # no cap keeps both separators
    assert retained_positions(ids, 9, {SEP}, Retention(2, None, 3)) == [0, 1, 2, 4, 7, 8]


def test_short_sequence_keeps_everything():
    ids = seq("x.x")
    assert retained_positions(ids, 3, {SEP}, Retention(4, 64, 256)) == [0, 1, 2]


def test_full_window_keeps_everything():
    ids = seq("x.xx" * 50)
    r = Retention(0, None, FULL_WINDOW)
    assert retained_positions(ids, 200, {SEP}, r) == list(range(200))


def test_window_boundary():
    r = Retention(0, 0, 4)
    ids = seq("xxxxxxxx")
    # query 6 sees 3,4,5 (and itself): w=4 tokens including the query
    assert retained_positions(ids, 6, {SEP}, r) == [3, 4, 5]
    assert visible(6, 3, ids, {SEP}, r) and not visible(6, 2, ids, {SEP}, r)


def simulate(ids, r, chunks, check_every_step=True):
    """Run RequestCache through the chunks and mirror the worker: a dense array holding,
    at each cache index, the position whose KV was written there."""
    cache = RequestCache(r, {SEP})
    kv: list[int] = []  # the worker's view: cache index -> position
    n = 0
    for q in chunks:
        comp = cache.advance(n, ids)
        # worker: apply moves (all sources read before any write), then truncate
        assert len(comp.src) == len(comp.dst)
        vals = [kv[s] for s in comp.src]
        for d, v in zip(comp.dst, vals):
            kv[d] = v
        del kv[len(cache):]
        if check_every_step:
            assert sorted(cache.slots) == retained_positions(ids, n, {SEP}, r)
            assert kv == cache.slots
            assert len(set(cache.slots)) == len(cache.slots)
        # worker: the chunk's tokens are written at p - D
        D = cache.num_dropped
        for p in range(n, n + q):
            idx = p - D
            assert idx == len(kv)
            kv.append(p)
        n += q
    comp = cache.advance(n, ids)
    assert len(comp.src) == len(comp.dst)
    vals = [kv[s] for s in comp.src]
    for d, v in zip(comp.dst, vals):
        kv[d] = v
    del kv[len(cache):]
    assert kv == cache.slots
    assert sorted(cache.slots) == retained_positions(ids, n, {SEP}, r)
    return cache


@pytest.mark.parametrize("seed", range(40))
def test_random_chunking_matches_definition(seed):
    rng = random.Random(seed)
    length = rng.randint(1, 400)
    p_sep = rng.choice([0.0, 0.1, 0.3, 1.0])
    ids = [SEP if rng.random() < p_sep else 0 for _ in range(length)]
    r = Retention(rng.randint(0, 6), rng.choice([None, 0, 1, 3, 8]), rng.randint(1, 40))
    chunks = []
    left = length
    while left:
        q = min(left, rng.choice([1, 1, 1, 2, 7, 33, 128]))
        chunks.append(q)
        left -= q
    cache = simulate(ids, r, chunks)
    assert cache.num_evicted == length - len(cache)


@pytest.mark.parametrize("seed", range(40))
def test_batched_eviction_matches_definition(seed):
    """cache_size c: the cache (and the worker's dense KV mirror) equals C(n) of the
    definition at every step start, for any chunking; it never holds more than c between
    steps once past the first chunk, and it evicts less often than per-step eviction."""
    rng = random.Random(1000 + seed)
    length = rng.randint(1, 500)
    p_sep = rng.choice([0.0, 0.1, 0.3, 1.0])
    ids = [SEP if rng.random() < p_sep else 0 for _ in range(length)]
    r = Retention(rng.randint(0, 6), rng.choice([0, 1, 3, 8]), rng.randint(1, 40))
    c = r.num_sinks + r.sep_cap + r.window + rng.choice([0, 1, 5, 16, 64])
    starts = [0]
    while starts[-1] < length:
        starts.append(min(length, starts[-1] + rng.choice([1, 1, 1, 2, 7, 33, 128])))
    want = batched_cache(ids, starts, {SEP}, r, c)
    cache = RequestCache(r, {SEP}, cache_size=c)
    kv: list[int] = []
    evictions = 0
    for n, expect in zip(starts, want):
        comp = cache.advance(n, ids)
        evictions += bool(comp.num_evicted)
        vals = [kv[i] for i in comp.src]
        for d, v in zip(comp.dst, vals):
            kv[d] = v
        del kv[n - cache.num_dropped:]
        assert sorted(kv) == expect, n
        assert len(set(kv)) == len(kv)
        if n > starts[1]:
            assert len(kv) <= c
        kv.extend(range(n, n + (starts[starts.index(n) + 1] - n if n < length else 0)))
    per_step = RequestCache(r, {SEP})
    per_step_evictions = sum(bool(per_step.advance(n, ids).num_evicted) for n in starts)
    assert evictions <= per_step_evictions


def test_batched_eviction_waits_for_c():
    """Decode one token a step with c = a + s + w + 16: one eviction every 17 steps or so,
    and the cache cycles between at most a + s + w and c tokens."""
    ids = seq("xxx.xx.x,x" * 100)
    r = Retention(4, 8, 32)
    c = 4 + 8 + 32 + 16
    cache = RequestCache(r, {SEP}, cache_size=c)
    sizes, evictions = [], 0
    for n in range(1, len(ids) + 1):
        comp = cache.advance(n, ids)
        evictions += bool(comp.num_evicted)
        if comp.num_evicted:
            assert len(cache) <= 4 + 8 + 32
        sizes.append(n - cache.num_dropped)
    assert max(sizes) == c
    assert len(ids) // 20 <= evictions <= len(ids) // 16


def test_decode_steady_state_bounded():
    ids = seq("xxx.xx.x,x" * 200)
    r = Retention(4, 8, 32)
    cache = simulate(ids, r, [1] * len(ids), check_every_step=False)
    assert len(cache) <= 4 + 8 + 32


def test_prefill_chunks_bound_footprint():
    ids = seq("xxxx.xxxxxx" * 300)
    r = Retention(4, 16, 64)
    cache = RequestCache(r, {SEP})
    n = 0
    peak = 0
    for q in [256] * (len(ids) // 256):
        cache.advance(n, ids)
        peak = max(peak, len(cache) + q)
        n += q
    assert peak <= 4 + 16 + 64 + 256


def test_advance_rejects_going_back():
    cache = RequestCache(Retention(1, 1, 2), {SEP})
    cache.advance(5, seq("xxxxx"))
    with pytest.raises(ValueError, match="n=3"):
        cache.advance(3, seq("xxxxx"))


def test_unknown_token_ids_are_an_error():
    cache = RequestCache(Retention(0, 1, 2), {SEP})
    with pytest.raises(RuntimeError, match="not known"):
        cache.advance(10, seq("xxx"))
