"""Serving on CPU: `vllm-sepllm serve MODEL --attention-backend SEPLLM` (vLLM's OpenAI server),
a completion and a chat request, per-request settings through `vllm_xargs`, and a bad setting
answered with HTTP 400 naming the field while the server keeps serving. The server (a4 s16 w64,
float32, eager) is conftest's ``sepllm_http``, shared with test_metrics_cpu.py."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def server(sepllm_http):
    return sepllm_http


def test_completion_and_chat(server):
    base, model = server
    status, body = _post(base + "/v1/completions",
                         {"model": model, "prompt": "The capital of France is",
                          "max_tokens": 8, "temperature": 0})
    assert status == 200 and "Paris" in body["choices"][0]["text"]
    # per-request figures come back with the response
    assert body["kv_transfer_params"]["sepllm"]["tokens"] > 0
    status, body = _post(base + "/v1/chat/completions",
                         {"model": model, "max_tokens": 8, "temperature": 0,
                          "messages": [{"role": "user", "content": "Say hello."}]})
    assert status == 200 and body["choices"][0]["message"]["content"]


def test_per_request_settings_and_bad_values(server, tokenizer):
    base, model = server
    from vllm_sepllm.testing.texts import real_text_prompts

    prompt = real_text_prompts(tokenizer, 1, 300)[0]
    status, body = _post(base + "/v1/completions",
                         {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0,
                          "vllm_xargs": {"sepllm_window": 32, "sepllm_mode": "streamingllm"}})
    assert status == 200
    stats = body["kv_transfer_params"]["sepllm"]
    assert stats["kv_retained"] <= 4 + 32  # a + w: streamingllm keeps no separators
    status, body = _post(base + "/v1/completions",
                         {"model": model, "prompt": "Hi", "max_tokens": 4,
                          "vllm_xargs": {"sepllm_window": 0}})
    assert status == 400
    assert "sepllm.window must be a positive integer, got 0" in json.dumps(body)
    status, body = _post(base + "/v1/completions",
                         {"model": model, "prompt": "The capital of France is",
                          "max_tokens": 4, "temperature": 0})
    assert status == 200  # still serving
