"""The soak test's own checks (benchmarks/soak.py), no engine: its numpy count of the retained
set agrees with the policy's definition, the per-request KV check accepts what the plugin
reports and flags what it must not, and the plan keeps its promises (modes, aborts, long
requests first, prefix groups sharing a start)."""

from __future__ import annotations

import random

import numpy as np

from benchmarks.soak import Item, check_kv, make_plan, parser, retained_count
from vllm_sepllm.policy import Retention, retained_positions

SEPS = np.array([3, 7], dtype=np.int64)


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.choice([3, 7]) if rng.random() < 0.2 else rng.randrange(10, 60)
            for _ in range(n)]


def test_retained_count_matches_policy():
    rng = random.Random(0)
    for _ in range(300):
        ids = _ids(rng, rng.randint(1, 400))
        a, w = rng.randint(0, 8), rng.randint(1, 120)
        s = rng.choice([None, 0, 1, 5, 30])
        n = rng.randint(0, len(ids))
        expect = len(retained_positions(ids, n, set(SEPS.tolist()), Retention(a, s, w)))
        assert retained_count(np.isin(np.array(ids[:n], dtype=np.int64), SEPS), n, a, s, w) \
            == expect, (a, s, w, n)


def _item(prompt, cont, overrides):
    return Item(0, "soak-00000", prompt, cont, (overrides or {}).get("mode", "default"),
                overrides, 0.0, False, "short")


ENGINE = {"mode": "sepllm", "num_sinks": 4, "sep_cap": 64, "window": 256}


def _figures(it: Item, overrides, async_extra: int = 0):
    """What the plugin reports for a request that decoded to its end, one token a step."""
    r = Retention(overrides["num_sinks"], 0 if overrides["mode"] == "streamingllm"
                  else overrides["sep_cap"], overrides["window"])
    tokens = len(it.prompt) + it.max_tokens - 1 + async_extra
    ids = it.prompt + it.cont
    kept = len(retained_positions(ids, tokens - 1, set(SEPS.tolist()), r)) + 1
    return {"tokens": tokens, "kv_retained": kept, "kv_evicted": tokens - kept,
            "peak_kv_blocks": -(-kept // 16), "compactions": 5, "kv_blocks_freed": 1}


def test_check_kv_accepts_and_flags():
    rng = random.Random(1)
    ids = _ids(rng, 700)
    it = _item(ids[:200], ids[200:600], {"mode": "sepllm", "num_sinks": 2, "sep_cap": 8,
                                          "window": 40})
    good = _figures(it, it.overrides)
    assert check_kv(it, good, SEPS, ENGINE, 256, 16, 0, False) == ([], False)
    # async scheduling: one more token in flight
    assert check_kv(it, _figures(it, it.overrides, 1), SEPS, ENGINE, 256, 16, 0, True) \
        == ([], False)
    bad = dict(good, kv_retained=good["kv_retained"] + 1, kv_evicted=good["kv_evicted"] - 1)
    problems, waived = check_kv(it, bad, SEPS, ENGINE, 256, 16, 0, False)
    assert problems and not waived
    # preempted, the last step a recompute chunk: waived within a + s + w - 1 + chunk
    assert check_kv(it, bad, SEPS, ENGINE, 256, 16, 2, False) == ([], True)
    assert check_kv(it, dict(good, kv_evicted=good["kv_evicted"] + 1), SEPS, ENGINE, 256, 16,
                    0, False)[0]
    assert check_kv(it, dict(good, tokens=good["tokens"] + 1), SEPS, ENGINE, 256, 16, 0,
                    False)[0]
    assert check_kv(it, dict(good, compactions=0), SEPS, ENGINE, 256, 16, 0, False)[0]
    assert check_kv(it, dict(good, peak_kv_blocks=60), SEPS, ENGINE, 256, 16, 0, False)[0]
    assert check_kv(it, None, SEPS, ENGINE, 256, 16, 0, False)[0]
    stream = _item(ids[:50], ids[50:300], {"mode": "streamingllm", "num_sinks": 0,
                                           "window": 64})
    assert check_kv(stream, _figures(stream, dict(stream.overrides, sep_cap=None)), SEPS,
                    ENGINE, 256, 16, 0, False) == ([], False)
    full = _item(ids[:50], ids[50:300], {"mode": "full"})
    t = 50 + 250 - 1
    ok = {"tokens": t, "kv_retained": t, "kv_evicted": 0, "peak_kv_blocks": -(-t // 16),
          "compactions": 0, "kv_blocks_freed": 0}
    assert check_kv(full, ok, SEPS, ENGINE, 256, 16, 0, False) == ([], False)
    assert check_kv(full, dict(ok, kv_retained=t - 1, kv_evicted=1), SEPS, ENGINE, 256, 16,
                    0, False)[0]


def test_plan():
    rng = random.Random(2)
    ids = _ids(rng, 20000)
    args = parser().parse_args(["--requests", "300", "--max-output", "1024", "--long", "4",
                                "--prompt-range", "8", "512", "--arrival-s", "30"])
    items = make_plan(ids, args)
    assert len(items) == 300 and len({it.rid for it in items}) == 300
    assert sorted(it.idx for it in items) == list(range(300))
    long = [it for it in items if it.kind == "long"]
    assert len(long) == 4 and max(it.max_tokens for it in long) == 1024
    assert min(it.max_tokens for it in long) == 512 and all(it.arrival <= 1 for it in long)
    assert all(it.abort is None for it in long)
    assert sum(it.abort is not None for it in items) == 30
    assert all(it.stream for it in items if it.abort == "tokens")
    assert {it.mode for it in items} == {"sepllm", "streamingllm", "full", "default"}
    for it in items:
        start = next(k for k in range(len(ids)) if ids[k:k + len(it.prompt)] == it.prompt)
        assert ids[start + len(it.prompt):start + len(it.prompt) + it.max_tokens] == it.cont
        o = it.overrides or {}
        if o.get("mode") in ("sepllm", "streamingllm"):
            assert 64 <= o["window"] <= 1024
        if o.get("mode") == "sepllm":
            assert 8 <= o["sep_cap"] <= 64
    groups = {}
    for it in items:
        if it.group is not None:
            groups.setdefault(it.group, []).append(it)
    assert groups
    for members in groups.values():
        assert len({str(m.overrides) for m in members}) == 1
        k = min(len(m.prompt) for m in members)
        assert len({tuple(m.prompt[:k]) for m in members}) == 1


def test_check_kv_async_step_in_flight():
    """With async scheduling the cache may already be evicted for the discarded next query:
    R(tokens) without it, one token fewer here; accepted with async scheduling only, and no
    other count is."""
    rng = random.Random(2)
    ids = [rng.randrange(10, 60) for _ in range(700)]  # no separator: each step evicts one
    ov = {"mode": "sepllm", "num_sinks": 2, "sep_cap": 8, "window": 40}
    it = _item(ids[:200], ids[200:600], ov)
    fig = _figures(it, ov)
    ahead = dict(fig, kv_retained=fig["kv_retained"] - 1, kv_evicted=fig["kv_evicted"] + 1)
    assert check_kv(it, ahead, SEPS, ENGINE, 256, 16, 0, True) == ([], False)
    assert check_kv(it, ahead, SEPS, ENGINE, 256, 16, 0, False)[0]
    two = dict(fig, kv_retained=fig["kv_retained"] - 2, kv_evicted=fig["kv_evicted"] + 2)
    assert check_kv(it, two, SEPS, ENGINE, 256, 16, 0, True)[0]


def test_check_kv_finished_while_preempted():
    """A request whose last token was in flight when it was preempted reports no KV held."""
    rng = random.Random(3)
    ids = _ids(rng, 400)
    ov = {"mode": "sepllm", "num_sinks": 2, "sep_cap": 8, "window": 40}
    it = _item(ids[:200], ids[200:240], ov)
    none = {"tokens": 0, "kv_retained": 0, "kv_evicted": 0, "peak_kv_blocks": 0,
            "preempted_at_finish": True}
    assert check_kv(it, none, SEPS, ENGINE, 256, 16, 2, True) == ([], False)
    assert check_kv(it, none, SEPS, ENGINE, 256, 16, 2, False)[0]  # sync: its last step ran
    assert check_kv(it, none, SEPS, ENGINE, 256, 16, 0, True)[0]  # never preempted: flagged
    assert check_kv(it, dict(none, kv_retained=3), SEPS, ENGINE, 256, 16, 2, True)[0]
