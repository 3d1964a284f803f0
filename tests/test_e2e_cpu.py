"""End to end on CPU with the real model: vLLM + SEPLLM (real eviction) against the
independent Hugging Face oracle, and against vLLM's own backend when nothing is evicted."""

from __future__ import annotations

import pytest

from tests.engine import greedy_ids, llm_engine
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


@pytest.fixture(scope="module")
def sepllm_run(model_path, prompts):
    with llm_engine(model_path, attention_backend="SEPLLM",
                    additional_config={"sepllm": SEPLLM}) as llm:
        sep_ids = llm.llm_engine.vllm_config.additional_config["sepllm"]["separator_token_ids"]
        return greedy_ids(llm, prompts, NEW_TOKENS), set(sep_ids)


def test_sepllm_equals_hf_oracle(model_path, prompts, sepllm_run):
    got, sep_ids = sepllm_run
    assert len(got) == NUM_PROMPTS and all(len(p) >= PROMPT_TOKENS for p in prompts)
    mismatches = []
    for i, prompt in enumerate(prompts):
        want = greedy_generate(model_path, prompt, NEW_TOKENS, sep_ids,
                               SEPLLM["num_sinks"], SEPLLM["sep_cap"], SEPLLM["window"])
        if got[i] != want:
            first = next(j for j, (a, b) in enumerate(zip(got[i], want)) if a != b)
            mismatches.append((i, first))
    assert not mismatches, f"(prompt, first differing token) pairs: {mismatches}"


def test_eviction_changes_output(model_path, prompts, sepllm_run):
    """The window matters: with w=64 the output differs from full attention somewhere."""
    got, sep_ids = sepllm_run
    full = [greedy_generate(model_path, p, NEW_TOKENS, sep_ids, 0, None, 1 << 30, mode="full")
            for p in prompts[:3]]
    assert any(g != f for g, f in zip(got[:3], full))


def test_large_window_equals_default_backend(model_path, prompts):
    half = prompts[::2]
    with llm_engine(model_path) as llm:
        default = greedy_ids(llm, half, NEW_TOKENS)
    with llm_engine(model_path, attention_backend="SEPLLM",
                    additional_config={"sepllm": {"window": 2048}}) as llm:
        sepllm = greedy_ids(llm, half, NEW_TOKENS)
    assert sepllm == default


def test_batched_eviction_equals_hf_oracle(model_path, prompts):
    """cache_size c (batched eviction, no mask): real eviction, token-exact against the oracle's
    batched rule. Prefix caching off, so eviction runs during the prompt too; each prompt runs
    alone, so vLLM's steps are known: prefill chunks of max_num_batched_tokens (256), then one
    token a step. (With prefix caching on, the prompt is one step: tests/test_prefix_cpu.py.)"""
    cfg = dict(SEPLLM, cache_size=SEPLLM["num_sinks"] + SEPLLM["sep_cap"] + SEPLLM["window"] + 36)
    chosen = prompts[::5]
    got, stats = [], []
    with llm_engine(model_path, attention_backend="SEPLLM", enable_prefix_caching=False,
                    additional_config={"sepllm": cfg}) as llm:
        sep_ids = set(llm.llm_engine.vllm_config.additional_config["sepllm"]["separator_token_ids"])
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        for p in chosen:
            out = llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)[0]
            got.append(list(out.outputs[0].token_ids))
            stats.append(out.kv_transfer_params["sepllm"])
    # Eviction really ran and the cache stayed within c (+ the last step's token).
    assert all(s["kv_evicted"] > 0 and s["kv_retained"] <= cfg["cache_size"] + 1 for s in stats)
    mismatches = []
    for i, prompt in enumerate(chosen):
        want = greedy_generate(model_path, prompt, NEW_TOKENS, sep_ids, SEPLLM["num_sinks"],
                               SEPLLM["sep_cap"], SEPLLM["window"],
                               cache_size=cfg["cache_size"], prefill_chunk=256)
        if got[i] != want:
            first = next(j for j, (a, b) in enumerate(zip(got[i], want)) if a != b)
            mismatches.append((i, first))
    assert not mismatches, f"(prompt, first differing token) pairs: {mismatches}"
    # ... and the batched rule is not the exact one: the oracle tells them apart here.
    exact = [greedy_generate(model_path, p, NEW_TOKENS, sep_ids, SEPLLM["num_sinks"],
                             SEPLLM["sep_cap"], SEPLLM["window"]) for p in chosen]
    assert exact != got
