"""Torch reference of SepLLM attention against the pure-Python definition."""

import random

import pytest
import torch

from vllm_sepllm.policy import Retention, retained_positions, visible
from vllm_sepllm.reference import (
    cache_slots,
    masked_attention,
    move_slots,
    paged_sepllm_attention,
    sepllm_mask,
    write_kv,
)

SEP = 1


@pytest.mark.parametrize("seed", range(25))
def test_mask_matches_definition_on_full_sequence(seed):
    rng = random.Random(seed)
    L = rng.randint(1, 120)
    ids = [SEP if rng.random() < rng.choice([0.05, 0.3, 0.9]) else 0 for _ in range(L)]
    r = Retention(rng.randint(0, 5), rng.choice([None, 0, 1, 4]), rng.randint(1, 30))
    perm = list(range(L))
    rng.shuffle(perm)  # key order must not matter
    k_pos = torch.tensor(perm)
    k_sep = torch.tensor([ids[p] == SEP for p in perm])
    mask = sepllm_mask(torch.arange(L), k_pos, k_sep, r)
    for t in range(L):
        for j, p in enumerate(perm):
            assert bool(mask[t, j]) == visible(t, p, ids, {SEP}, r), (t, p)


@pytest.mark.parametrize("seed", range(25))
def test_mask_on_compacted_cache_matches_definition(seed):
    """Keys = R(n) plus a chunk [n, n+q): the chunk's queries see what the definition says."""
    rng = random.Random(100 + seed)
    L = rng.randint(2, 200)
    ids = [SEP if rng.random() < 0.25 else 0 for _ in range(L)]
    r = Retention(rng.randint(0, 4), rng.choice([None, 0, 2, 5]), rng.randint(1, 25))
    n = rng.randint(0, L - 1)
    keys = retained_positions(ids, n, {SEP}, r) + list(range(n, L))
    rng.shuffle(keys)
    mask = sepllm_mask(torch.arange(n, L), torch.tensor(keys),
                       torch.tensor([ids[p] == SEP for p in keys]), r)
    for i, t in enumerate(range(n, L)):
        for j, p in enumerate(keys):
            assert bool(mask[i, j]) == visible(t, p, ids, {SEP}, r)


def dense_reference(q, k, v, mask, scale):
    """Plain float64 softmax attention with GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(rep, dim=1)
    v = v.double().repeat_interleave(rep, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    s = s.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (9, 3)])
def test_masked_attention_gqa(hq, hkv):
    torch.manual_seed(0)
    q, k, v = torch.randn(7, hq, 16), torch.randn(11, hkv, 16), torch.randn(11, hkv, 16)
    mask = torch.rand(7, 11) < 0.5
    mask[:, 0] = True
    out = masked_attention(q, k, v, mask, 0.25)
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, mask, 0.25),
                               atol=1e-5, rtol=1e-5)


def test_paged_attention_equals_dense_on_shuffled_cache():
    """Scatter a compacted cache over random blocks in random order; paged attention with
    the per-slot metadata equals dense attention over the definition's visible set."""
    torch.manual_seed(0)
    rng = random.Random(0)
    bs, hkv, hq, d, nblocks = 4, 2, 4, 8, 64
    kv_cache = torch.zeros(nblocks, bs, hkv, 2 * d)
    num_slots = nblocks * bs
    slot_pos = torch.full((num_slots,), -1, dtype=torch.int32)
    slot_sep = torch.zeros(num_slots, dtype=torch.bool)
    free_blocks = list(range(1, nblocks))
    rng.shuffle(free_blocks)
    block_table = torch.zeros(2, 16, dtype=torch.int32)
    cache_lens, qsl, q_pos_all, queries, rets, expected = [], [0], [], [], [], []
    for b, (L, n) in enumerate([(60, 50), (30, 29)]):  # a chunk of 10 and a decode
        ids = [SEP if rng.random() < 0.3 else 0 for _ in range(L)]
        r = Retention(2, 3, 6)
        keys = retained_positions(ids, n, {SEP}, r)
        rng.shuffle(keys)
        keys += list(range(n, L))
        nb = (len(keys) + bs - 1) // bs
        block_table[b, :nb] = torch.tensor([free_blocks.pop() for _ in range(nb)])
        slots = cache_slots(block_table[b], len(keys), bs)
        k, v = torch.randn(len(keys), hkv, d), torch.randn(len(keys), hkv, d)
        write_kv(kv_cache, k, v, slots)
        slot_pos[slots] = torch.tensor(keys, dtype=torch.int32)
        slot_sep[slots] = torch.tensor([ids[p] == SEP for p in keys])
        q = torch.randn(L - n, hq, d)
        mask = torch.tensor([[visible(t, p, ids, {SEP}, r) for p in keys] for t in range(n, L)])
        expected.append(dense_reference(q, k, v, mask, 0.3))
        cache_lens.append(len(keys))
        qsl.append(qsl[-1] + L - n)
        q_pos_all += list(range(n, L))
        queries.append(q)
        rets.append(r)
    out = paged_sepllm_attention(
        torch.cat(queries), kv_cache, block_table, cache_lens, qsl,
        torch.tensor(q_pos_all), slot_pos, slot_sep, rets, 0.3, upcast=True)
    torch.testing.assert_close(out.double(), torch.cat(expected), atol=1e-5, rtol=1e-5)


def test_move_slots_exact_and_disjoint_semantics():
    kv = torch.randn(8, 4, 2, 6)
    slot_pos = torch.arange(32, dtype=torch.int32)
    before = kv.clone()
    src, dst = torch.tensor([30, 31, 20]), torch.tensor([1, 2, 3])
    move_slots([kv, slot_pos], src, dst)
    flat, flat0 = kv.view(32, 2, 6), before.view(32, 2, 6)
    assert torch.equal(flat[dst], flat0[src])
    assert torch.equal(slot_pos[dst], src.to(torch.int32))
    keep = torch.ones(32, dtype=torch.bool)
    keep[dst] = False
    assert torch.equal(flat[keep], flat0[keep])


def test_write_kv_skips_padding():
    kv = torch.zeros(2, 4, 1, 4)
    k, v = torch.ones(3, 1, 2), 2 * torch.ones(3, 1, 2)
    write_kv(kv, k, v, torch.tensor([5, -1, 0]))
    flat = kv.view(8, 1, 4)
    assert flat[5, 0].tolist() == [1, 1, 2, 2] and flat[0, 0].tolist() == [1, 1, 2, 2]
    assert flat[1:5].abs().sum() == 0


@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3)])
def test_batched_decode_equals_per_row(hq, hkv):
    from vllm_sepllm.reference import decode_attention

    torch.manual_seed(1)
    d, num_slots = 16, 200
    flat = torch.randn(num_slots, hkv, 2 * d)
    lens = [1, 7, 33]
    perm = torch.randperm(num_slots)
    slot_rows = [perm[sum(lens[:i]):sum(lens[:i + 1])] for i in range(3)]
    L = max(lens)
    slots = torch.zeros(3, L, dtype=torch.int64)
    valid = torch.zeros(3, L, dtype=torch.bool)
    for i, s in enumerate(slot_rows):
        slots[i, :len(s)] = s
        valid[i, :len(s)] = True
    q = torch.randn(3, hq, d)
    out = decode_attention(q, flat, slots, valid, 0.2)
    for i, s in enumerate(slot_rows):
        kv = flat[s]
        want = dense_reference(q[i:i + 1], kv[..., :d], kv[..., d:],
                               torch.ones(1, len(s), dtype=torch.bool), 0.2)
        torch.testing.assert_close(out[i:i + 1].double(), want, atol=1e-5, rtol=1e-5)
