"""Load test, CI size (benchmarks/load_test.py runs the full size): the OpenAI server with SEPLLM
on loopback, 64 concurrent clients, 128 completions of mixed lengths (real-text prompts of
48-160 tokens, so every one evicts with a=4 s=8 w=32), streamed and not, 8 dropped mid-stream.
No request fails, every completed greedy output equals offline ``LLM.generate`` (separate
process), and after the drain ``/metrics`` shows no KV block and no SepLLM record left.

128 requests: two per client, so all 64 run at once (``max_num_seqs`` = 64, prompts prefilled
in shared chunks of 256 tokens) and each client sends again on a kept connection; 200 took
~85 s longer (the offline reference and the load phase are each linear in the count)."""

from __future__ import annotations

import pytest


REQUESTS, CLIENTS, ABORTS = 128, 64, 8


def test_load_64_clients(model_path, tmp_path):
    from benchmarks.load_test import parser, run

    args = parser().parse_args([
        "--model", model_path, "--sepllm", '{"num_sinks": 4, "sep_cap": 8, "window": 32}',
        "--requests", str(REQUESTS), "--clients", str(CLIENTS), "--prompt-tokens", "48", "160",
        "--output-tokens", "2", "12", "--abort-frac", str(ABORTS / REQUESTS), "--chunk", "256",
        "--kv-cache-gib", "1", "--deadline", "400", "--request-timeout", "300",
        "--reference-timeout", "600"])
    args.max_num_seqs = args.clients
    record = run(args, tmp_path)

    assert record["status"]["failed"] == 0, record["failures"]
    assert record["status"]["aborted"] == ABORTS
    assert record["status"]["ok"] == REQUESTS - ABORTS
    assert record["num_mismatches"] == 0, record["mismatches"]
    for check, ok in record["checks"].items():
        assert ok, (check, record["metrics"], record["status"])
    m = record["metrics"]
    assert m["vllm:sepllm_kv_blocks_used"] == 0 and m["vllm:sepllm_num_requests"] == 0
    assert m["vllm:sepllm_evicted_tokens_total"] > 0
    assert m["vllm:prompt_tokens_total"] == pytest.approx(record["prompt_tokens"]["total"])
