"""Engine-level behaviour with real eviction on the real model: preemption (recompute) gives
the same tokens, aborts return every block, nothing is left behind. Both scenarios run in one
probe (``tests.engine_probe``, in the session's probe host ``tests.probe_host``), each on a
fresh in-process engine; meanwhile this process computes the Hugging Face references
(``tests.engine.prefetch``)."""

from __future__ import annotations

import json

import pytest

from tests.engine import prefetch, probe_ok, start_probe
from tests.oracle_hf import greedy_generate

SEPLLM = {"num_sinks": 4, "sep_cap": 16, "window": 64}
#: Per-request settings of two requests in the preemption run (extra_args).
OVERRIDES = {1: {"window": 32, "sep_cap": 4}, 2: {"mode": "streamingllm"}}


@pytest.fixture(scope="module")
def prompts(tokenizer):
    from vllm_sepllm.testing.texts import real_text_prompts

    texts = real_text_prompts(tokenizer, 16, 400, seed=1)
    return [tokenizer.encode(t, add_special_tokens=False)[: 400 + 25 * i]
            for i, t in enumerate(texts)]


def oracle(model_path, prompts, i: int, sep_ids) -> list[int]:
    """The Hugging Face oracle of request ``i`` of the preemption run (its OVERRIDES)."""
    cfg = dict(SEPLLM, **OVERRIDES.get(i, {}))
    mode = cfg.pop("mode", "sepllm")
    return greedy_generate(model_path, prompts[i], 32, sep_ids, cfg["num_sinks"],
                           cfg["sep_cap"], cfg["window"], mode=mode)


@pytest.fixture(scope="module")
def probed(request, model_path, tokenizer, prompts, tmp_path_factory) -> dict[str, dict]:
    """mode -> the probe's result: "preempt" (32 new tokens, OVERRIDES), "abort" (48)."""
    runs = [{"mode": "preempt", "prompts": prompts, "sepllm": SEPLLM, "new_tokens": 32,
             "engine": {}, "overrides": OVERRIDES},
            {"mode": "abort", "prompts": prompts, "sepllm": SEPLLM, "new_tokens": 48,
             "engine": {}, "overrides": {}}]
    spec = tmp_path_factory.mktemp("engine-behaviour") / "spec.json"
    spec.write_text(json.dumps(runs))
    selected = {item.originalname for item in request.session.items
                if item.module is request.module}
    with start_probe("tests.engine_probe", model_path, str(spec)) as probe:
        if "test_preempted_requests_recompute_to_the_same_tokens" in selected:
            sep_ids = _separator_ids(tokenizer)
            prefetch(probe, [lambda i=i: oracle(model_path, prompts, i, sep_ids)
                             for i in range(len(prompts))])
        res = probe.result()
    return {r["mode"]: out for r, out in zip(runs, res)}


def test_preempted_requests_recompute_to_the_same_tokens(model_path, tokenizer, prompts,
                                                         probed):
    """Every running request is preempted four times (vLLM's own preemption path); all 16
    still equal the oracle. Two requests carry their own settings (extra_args), and a bad
    per-request setting is refused up front without disturbing the engine."""
    res = probe_ok(probed["preempt"], "preempt")
    assert res["bad_request_error"] == "sepllm.window must be a positive integer, got 0"
    assert res["preemptions"] >= 16  # four rounds of preempting every running request
    sep_ids = _separator_ids(tokenizer)
    assert all(t is not None for t in res["tokens"])
    for i, got in enumerate(res["tokens"]):
        want = oracle(model_path, prompts, i, sep_ids)
        assert got == want, f"request {i} ({OVERRIDES.get(i, {})})"
    assert res["free_blocks_end"] == res["total_blocks"]
    assert res["blocks_held_end"] == 0 and res["manager_records_end"] == 0


def test_abort_returns_every_block(prompts, probed):
    res = probe_ok(probed["abort"], "abort")
    assert res["aborted"] and res["unfinished_aborted"]
    done = [t for t in res["tokens"] if t is not None]
    assert len(done) >= len(prompts) - len(res["aborted"])
    assert res["free_blocks_end"] == res["total_blocks"]
    assert res["blocks_held_end"] == 0 and res["manager_records_end"] == 0


def _separator_ids(tokenizer):
    from vllm_sepllm.config import SepLLMConfig
    from vllm_sepllm.separators import separator_token_ids

    return separator_token_ids(tokenizer, SepLLMConfig())
