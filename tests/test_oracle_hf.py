"""Self-tests of the Hugging Face SepLLM oracle: the mask on hand-made cases, the model against plain HF."""

from __future__ import annotations

import random

import pytest
import torch

from tests.oracle_hf import greedy_generate, load_model, sepllm_mask
from vllm_sepllm.testing.texts import real_text_prompts

SEP = 9  # the separator id in the hand-made sequences
PERIOD, QUESTION = 30, 47  # SmolLM2 ids of '.' and '?'


def visible(mask: torch.Tensor, t: int) -> list[int]:
    """Key positions query ``t`` sees."""
    return mask[t].nonzero().flatten().tolist()


def test_causal_and_shape():
    mask = sepllm_mask([1, 2, 3, 4, 5], {SEP}, a=1, s=None, w=2)
    assert mask.shape == (5, 5) and mask.dtype == torch.bool
    assert not mask.triu(1).any()
    assert mask.diagonal().all()


def test_sinks_and_window():
    mask = sepllm_mask(list(range(10, 20)), {SEP}, a=2, s=None, w=3)
    assert visible(mask, 0) == [0]
    assert visible(mask, 3) == [0, 1, 2, 3]
    assert visible(mask, 9) == [0, 1, 7, 8, 9]


def test_separators_uncapped_and_window_edge():
    #        0  1  2    3  4    5  6    7  8  9
    tokens = [1, 2, SEP, 3, SEP, 4, SEP, 5, 6, 7]
    mask = sepllm_mask(tokens, {SEP}, a=1, s=None, w=3)
    assert visible(mask, 9) == [0, 2, 4, 6, 7, 8, 9]
    # Query 6: the window is 4..6, so separator 4 is in it and separator 2 has left it.
    assert visible(mask, 6) == [0, 2, 4, 5, 6]


def test_separator_cap_counts_only_separators_outside_window():
    #        0    1  2    3  4    5  6    7  8    9
    tokens = [SEP, 1, SEP, 2, SEP, 3, SEP, 4, SEP, 5]
    # Query 9, w=2: window 8..9 holds separator 8; out of it, separators 2, 4, 6 (0 is a sink).
    assert visible(sepllm_mask(tokens, {SEP}, a=1, s=2, w=2), 9) == [0, 4, 6, 8, 9]
    assert visible(sepllm_mask(tokens, {SEP}, a=1, s=1, w=2), 9) == [0, 6, 8, 9]
    assert visible(sepllm_mask(tokens, {SEP}, a=1, s=0, w=2), 9) == [0, 8, 9]
    assert visible(sepllm_mask(tokens, {SEP}, a=1, s=None, w=2), 9) == [0, 2, 4, 6, 8, 9]
    # A separator among the sinks neither counts against the cap nor needs it.
    assert visible(sepllm_mask(tokens, {SEP}, a=3, s=1, w=2), 9) == [0, 1, 2, 6, 8, 9]


def test_streamingllm_is_an_empty_separator_set():
    tokens = [1, SEP, 2, SEP, 3, SEP, 4, 5]
    mask = sepllm_mask(tokens, set(), a=1, s=None, w=2)
    assert visible(mask, 7) == [0, 6, 7]


def test_huge_window_is_causal():
    mask = sepllm_mask([1, SEP, 2, 3], {SEP}, a=0, s=0, w=100)
    assert torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).tril())


def brute_force_visible(x: list[int], seps: set[int], a: int, s: int | None, w: int, t: int, p: int) -> bool:
    """The definition, literally, for one (query, key) pair."""
    if p > t:
        return False
    if p < a or p > t - w:
        return True
    newer = sum(1 for q in range(p + 1, t - w + 1) if q >= a and x[q] in seps)
    return x[p] in seps and (s is None or newer < s)


@pytest.mark.parametrize("seed", range(20))
def test_mask_matches_brute_force_definition(seed):
    rng = random.Random(seed)
    x = [rng.choice([SEP, 1, 2, 3]) for _ in range(rng.randint(1, 40))]
    a, w, s = rng.randint(0, 5), rng.randint(1, 12), rng.choice([None, 0, 1, 2, 5])
    mask = sepllm_mask(x, {SEP}, a, s, w)
    expected = [[brute_force_visible(x, {SEP}, a, s, w, t, p) for p in range(len(x))] for t in range(len(x))]
    assert mask.tolist() == expected


@pytest.mark.parametrize("seed", range(20))
def test_batched_rows_match_the_plugin_definition(seed):
    """Batched eviction: the oracle's rows (written on their own, numpy) agree with the
    plugin's pure-Python definition (policy.batched_cache): two independent writings."""
    from tests.oracle_hf import _batched_rows
    from vllm_sepllm.policy import Retention, batched_cache

    rng = random.Random(100 + seed)
    x = [rng.choice([SEP, 1, 2, 3]) for _ in range(rng.randint(1, 120))]
    a, w, s = rng.randint(0, 5), rng.randint(1, 12), rng.choice([0, 1, 2, 5])
    c = a + s + w + rng.choice([0, 1, 4, 9])
    starts = sorted({0, *rng.sample(range(1, len(x) + 1), min(len(x), rng.randint(0, 30)))})
    starts = [n for n in starts if n < len(x)]
    rows = _batched_rows(x, {SEP}, a, s, w, c, starts, first_query=0)
    caches = batched_cache(x, starts, {SEP}, Retention(a, s, w), c)
    bounds = [*starts, len(x)]
    for n, nxt, cache in zip(bounds[:-1], bounds[1:], caches):
        for t in range(n, nxt):
            assert rows[t].nonzero()[0].tolist() == cache + list(range(n, t + 1)), (n, t)


# `model_path` (from `smollm2_path()`) and `tokenizer` are session fixtures of conftest.py.
@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[int]:
    (prompt,) = real_text_prompts(tokenizer, n=1, min_tokens=100)
    return tokenizer(prompt)["input_ids"]


def test_full_window_equals_plain_hf_greedy(model_path, prompt_ids):
    model = load_model(model_path)
    eos = model.generation_config.eos_token_id  # HF generate stops after it; so does the oracle
    reference = model.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False)
    reference = reference[0, len(prompt_ids) :].tolist()
    window = len(prompt_ids) + 8
    sepllm = greedy_generate(model_path, prompt_ids, 8, {PERIOD}, 4, 2, window, eos_token_id=eos)
    full = greedy_generate(model_path, prompt_ids, 8, (), 0, None, 1, mode="full", eos_token_id=eos)
    assert sepllm == full == reference


def test_mask_is_honoured_and_decoding_matches_one_full_pass(model_path, prompt_ids):
    """A small window changes the output, and one forward pass over prompt + output under the
    whole-sequence mask predicts every generated token (so the incremental mask rows are right)."""
    sep_ids, a, s, w = {PERIOD, QUESTION}, 4, 8, 16
    new = greedy_generate(model_path, prompt_ids, 8, sep_ids, a, s, w)
    assert new != greedy_generate(model_path, prompt_ids, 8, (), 0, None, 1, mode="full")

    tokens = prompt_ids + new
    hidden = ~sepllm_mask(tokens, sep_ids, a, s, w)
    additive = torch.zeros(len(tokens), len(tokens)).masked_fill(hidden, -torch.inf)
    with torch.inference_mode():
        logits = load_model(model_path)(torch.tensor([tokens]), attention_mask=additive[None, None]).logits
    assert logits[0, len(prompt_ids) - 1 : -1].argmax(-1).tolist() == new
