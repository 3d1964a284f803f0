"""benchmarks/serve.py on CPU: `vllm serve` per backend in turn (vLLM's CPU attention, then
SEPLLM), `vllm bench serve` with replayed real text, records with goodput at the SLO, KV usage
from /metrics, and the chat-like request builder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_chat_requests_are_contiguous_real_text(tokenizer):
    from benchmarks.serve import build_requests, length_stats

    prompts, conts = build_requests("tiny-chat", tokenizer, 40, seed=3, chat_max_prompt=None)
    assert len(prompts) == len(conts) == 40
    assert all(4 <= len(p) <= 600 for p in prompts)
    assert all(8 <= len(c) <= 48 for c in conts)
    # lengths vary (a distribution, not one size), and the reply follows the prompt in the book
    assert len({len(p) for p in prompts}) > 10 and len({len(c) for c in conts}) > 5
    from benchmarks.common import load_texts

    books = {k: v for k, v in load_texts().items() if k in ("alice29", "lcet10")}
    for p, c in zip(prompts[:10], conts[:10]):
        tail = tokenizer.decode(p[-20:]).strip().split("\n\n")[-1][-40:]
        head = tokenizer.decode(c[:12]).strip()[:30]
        assert any(tail in b.replace("\r", "") and head in b for b in books.values())
    again = build_requests("tiny-chat", tokenizer, 40, seed=3, chat_max_prompt=None)
    assert again == (prompts, conts)  # seeded: identical requests for every backend
    assert length_stats([[0] * 3, [0] * 5]) == {"mean": 4.0, "p50": 5, "p90": 5, "min": 3,
                                                "max": 5}


def test_summary_best_goodput_and_rate_at_slo():
    from benchmarks.serve import summary

    slo = {"ttft_ms": 2000, "tpot_ms": 50}
    recs = [{"backend": "FLASH_ATTN", "config": "-", "request_rate": r, "goodput": g,
             "p99_ttft_ms": t, "p99_tpot_ms": 20, "slo": slo}
            for r, g, t in ((1, 0.5, 100), (2, 0.8, 1900), (4, 0.6, 9000))]
    recs += [{"backend": "SEPLLM", "config": "c", "request_rate": r, "goodput": g,
              "p99_ttft_ms": 300, "p99_tpot_ms": p, "slo": slo}
             for r, g, p in ((2, 1.0, 15), (4, 2.4, 49), (8, 1.9, 51))]
    recs.append({"backend": "SEPLLM", "config": "c", "request_rate": 16, "skipped": "budget"})
    s = summary(recs)
    assert s["FLASH_ATTN -"] == {"best_goodput": 0.8, "best_goodput_rate": 2,
                                 "max_rate_at_slo": 2, "best_goodput_vs_baseline": 1.0}
    assert s["SEPLLM c"]["best_goodput"] == 2.4 and s["SEPLLM c"]["max_rate_at_slo"] == 4
    assert s["SEPLLM c"]["best_goodput_vs_baseline"] == 3.0


def test_merge_keeps_every_point_once_with_its_source(tmp_path):
    from benchmarks.serve import main

    slo = {"ttft_ms": 2000, "tpot_ms": 50}

    def rec(backend, config, rate, goodput, workload="long-gen"):
        return {"workload": workload, "backend": backend, "config": config,
                "request_rate": rate, "goodput": goodput, "slo_attainment": 1.0,
                "out_tok_per_s": 1.0, "p99_ttft_ms": 100, "p99_tpot_ms": 20, "p99_itl_ms": 30,
                "kv_usage_peak": 0.1, "preemptions": 0, "slo": slo}

    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps({"records": [rec("FLASH_ATTN", "-", 1.5, 1.0),
                                         rec("SEPLLM", "c356", 5, 3.4)]}))
    b.write_text(json.dumps({"records": [rec("FLASH_ATTN", "-", 2, 1.3),
                                         rec("SEPLLM", "c356", 5, 3.5)]}))
    out = tmp_path / "all.json"
    assert main(["--merge", str(a), str(b), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    got = [(r["backend"], r["request_rate"], r["goodput"], r["source"]) for r in data["records"]]
    assert got == [("FLASH_ATTN", 1.5, 1.0, "a.json"), ("FLASH_ATTN", 2, 1.3, "b.json"),
                   ("SEPLLM", 5, 3.5, "b.json")]
    assert data["summary"]["SEPLLM c356"]["best_goodput_vs_baseline"] == round(3.5 / 1.3, 2)
    # a later file's skipped point does not replace a measured one; notes are kept
    c.write_text(json.dumps({"note": "third call", "records": [
        {"workload": "long-gen", "backend": "SEPLLM", "config": "c356", "request_rate": 5,
         "skipped": "backend budget", "slo": slo}, rec("FLASH_ATTN", "-", 2.5, 1.4)]}))
    assert main(["--merge", str(a), str(b), str(c), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["request_rate"], r["goodput"]) for r in data["records"]] == [
        (1.5, 1.0), (2, 1.3), (2.5, 1.4), (5, 3.5)]
    assert data["sources"][2] == {"file": "c.json", "note": "third call"}
    # points of another workload or other server flags are not one sweep
    for other, field in ((dict(rec("FLASH_ATTN", "-", 1, 0.9), workload="chat"), "workload"),
                         (dict(rec("FLASH_ATTN", "-", 1, 0.9),
                               server_args=["--data-parallel-size=2"]), "server_args")):
        c.write_text(json.dumps({"records": [other]}))
        with pytest.raises(SystemExit, match=f"has {field}"):
            main(["--merge", str(a), str(c), "--out", str(out)])
    with pytest.raises(SystemExit, match="needs --out"):
        main(["--merge", str(a)])


def test_serve_sweep_default_vs_sepllm(tmp_path):
    out = tmp_path / "cpu_serve_tiny.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--cpu", "--workload", "tiny",
           "--backends", "default", "SEPLLM:a4s16w64c100", "--rates", "4",
           "--num-prompts", "6", "--slo-ttft-ms", "600000", "--slo-tpot-ms", "60000",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    recs = {r["backend"]: r for r in data["records"]}
    assert set(recs) == {"default", "SEPLLM"}
    for r in recs.values():
        assert r["completed"] == 6 and r["failed"] == 0
        assert r["replay_exact"] == 1.0  # every output is its real continuation
        assert r["slo_attainment"] == 1.0 and r["goodput"] > 0 and r["meets_slo"]
        # vLLM's goodput is the in-SLO requests over the run's duration
        assert r["goodput"] == pytest.approx(6 / r["duration_s"], rel=0.02)
        assert r["out_tok_per_s"] > 0 and r["p99_ttft_ms"] >= r["p50_ttft_ms"] > 0
        assert 0 < r["kv_usage_peak"] <= 1 and r["metric_samples"] > 0
        assert r["preemptions"] == 0 and r["running_peak"] >= 1
        assert 0.1 < r["output_separator_rate"] < 0.4
        for key in ("workload", "backend", "config", "request_rate", "goodput",
                    "out_tok_per_s", "p99_ttft_ms", "p99_tpot_ms", "gpu", "commit"):
            assert key in r
    sep, base = recs["SEPLLM"], recs["default"]
    assert sep["counters"]["sepllm_evicted_tokens"] > 0 and sep["counters"]["sepllm_freed_blocks"] > 0
    assert sep["kv_usage_peak"] < base["kv_usage_peak"]  # evicted KV went back to the pool
    assert "SEPLLM a4s16w64c100" in data["summary"]
    assert "best_goodput_vs_baseline" in data["summary"]["SEPLLM a4s16w64c100"]
    # plotting is optional: without matplotlib the run says so and still exits 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in proc.stdout
    else:
        assert out.with_suffix(".png").exists()


def test_point_against_a_dead_server_is_an_error_record(tmp_path):
    """A server that died between points gives an error record (the sweep goes on), not a
    crash of the whole run."""
    import argparse
    import types

    from benchmarks.serve import free_port, point_line, run_point

    dead = types.SimpleNamespace(base=f"http://127.0.0.1:{free_port()}")
    ns = argparse.Namespace(poll_s=1.0, seed=0, slo_ttft_ms=2000.0, slo_tpot_ms=50.0)
    rec = run_point(ns, dead, "m", tmp_path / "r.json", 4, 2.0,
                    30, tmp_path, "t")
    assert rec["error"].startswith("server unreachable") and rec["request_rate"] == 2.0
    assert "server unreachable" in point_line(dict(rec, backend="SEPLLM", config="-"))


def test_metrics_of_data_parallel_engines():
    """Counters and request counts add up over the engines; KV usage is a share of each
    engine's own pool, so the server's figure is their mean (and the fullest engine's kept)."""
    from benchmarks.serve import parse_metrics

    text = "\n".join([
        '# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.',
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5',
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25',
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
        'vllm:num_requests_running{engine="1",model_name="m"} 4.0',
        'vllm:sepllm_evicted_tokens_total{engine="0",model_name="m"} 10.0',
        'vllm:sepllm_evicted_tokens_total{engine="1",model_name="m"} 5.0',
        'python_gc_objects_collected_total{generation="0"} 7.0'])
    m = parse_metrics(text)
    assert m["vllm:kv_cache_usage_perc"] == 0.375
    assert m["vllm:kv_cache_usage_perc:max_engine"] == 0.5
    assert m["vllm:num_requests_running"] == 7.0
    assert m["vllm:sepllm_evicted_tokens_total"] == 15.0
    assert not any(k.startswith("python") for k in m)
    one = parse_metrics('vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5')
    assert one == {"vllm:kv_cache_usage_perc": 0.5, "vllm:kv_cache_usage_perc:max_engine": 0.5}
