"""Server faults, CI size (``benchmarks/faults.py`` runs the full size; its docstring lists every
check): the OpenAI server with SEPLLM on loopback, all four phases, smaller:

1. 16 clients drop their streams after 1-3 chunks (aiohttp close / socket RST), 4 right after the
   headers, while 4 well-behaved clients complete; drained to no KV block, no SepLLM record, no
   running or waiting request; "Paris" still comes back.
2. 35 bad inputs (malformed bodies, wrong types, per-request SepLLM settings out of range,
   prompts past max_model_len, absurd max_tokens, ...): 4xx naming the field, a good request
   after every batch, a streamed request in flight completes.
3. SIGTERM with 6 streams in flight (``--shutdown-timeout 60``): all complete, exit 0, no orphan.
4. SIGKILL of the EngineCore with 8 requests in flight: all end with an error, no hang,
   ``/health`` fails, the server exits, no orphan.

No phase is left to the script only. vLLM 0.26.0 itself fails two of the cases
(``faults.UPSTREAM``: a JSON array body answers 500 on completions and chat): those may fail,
but only as documented (500); every other check must pass, the exit status 1 after the engine
core died included (vLLM alone exits 0; patches.py, ledger item 8). About 3-4.5 min on 2 cores (two servers start
at once, on separate cores; start-up is most of it and stretches when the cores are busy).
"""

from __future__ import annotations

# Checks that aggregate the bad-input cases; the cases are checked one by one below.
_CASE_CHECKS = ("every_bad_input_4xx_naming_the_field", "no_5xx_or_hang")


def test_server_faults(model_path, tmp_path):
    from benchmarks.faults import CI, PHASES, UPSTREAM, run

    record = run(CI, tmp_path, model_path)
    phases = record["phases"]
    assert tuple(phases) == PHASES, record
    for name, rec in phases.items():
        assert "exception" not in rec, (name, rec["exception"])

    # 2. every case answers 4xx naming the field; a documented upstream one may answer 500
    for case in phases["bad_input"]["cases"]:
        upstream = f"bad_input:{case['name']}" in UPSTREAM
        assert case["ok"] or (upstream and case["status"] == 500), case
    # 4. the server exits non-zero within the bound: not a hang
    kill = phases["engine_kill"]
    assert kill["exit_code"] not in (None, 0) and kill["exit_after_kill_s"] <= 60, kill

    allowed = {f"bad_input:{c}" for c in _CASE_CHECKS}
    failed = {f"{name}:{check}" for name, rec in phases.items()
              for check, ok in rec["checks"].items() if not ok}
    assert failed <= allowed, {name: rec["checks"] for name, rec in phases.items()}
    assert all(f["upstream"] for f in record["findings"] if "observed" in f), record["findings"]

    # the figures the checks rest on, spelled out
    d = phases["disconnects"]
    assert all(d["gauges_after_drain"][g] == 0 for g in (
        "vllm:sepllm_kv_blocks_used", "vllm:sepllm_num_requests",
        "vllm:num_requests_running", "vllm:num_requests_waiting")), d["gauges_after_drain"]
    assert d["metric_deltas"]["vllm:sepllm_evicted_tokens_total"] > 0
    s = phases["sigterm"]
    assert s["exit_code"] == 0 and not s["survivors"]
    assert all(r["tokens"] == CI.drain_tokens for r in s["streams"]), s["streams"]
    assert kill["engine_core"]["name"] == "VLLM::EngineCore" and not kill["survivors"]
