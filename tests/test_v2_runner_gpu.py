"""SEPLLM on vLLM's V2 model runner (``vllm_sepllm.worker_v2``) against the V1 runner, on a CUDA
GPU: greedy tokens must be equal for the same random Llama checkpoint, with eviction, CUDA graphs
(FULL decode replays and mixed prefill + decode steps), prefix caching and chunked prefill.

The comparison is ``benchmarks/v2_check.py`` (run as a subprocess: each engine runs in its own
process, ``VLLM_USE_V2_MODEL_RUNNER=0`` / ``=1``); see its docstring for the requests and the
three configurations (exact eviction in float32 with the Triton decode kernel, exact and batched
eviction in bfloat16 with FlashAttention). About 3 minutes on the H200. Skipped without CUDA.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("exact_fp32", "exact_bf16", "batched_bf16")


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("v2_check")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "v2_check.py"), "--out",
                           str(out), "--configs", ",".join(CONFIGS)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    path = out / "v2_check.json"
    assert path.exists(), f"v2_check.py wrote no result (rc {proc.returncode}):\n" \
                          f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads(path.read_text())
    print(proc.stdout[-3000:])
    return res


@pytest.mark.parametrize("name", CONFIGS)
def test_v2_equals_v1(result, name):
    cfg = result["configs"][name]
    assert not cfg["errors"], cfg["errors"]
    runner = cfg["runner"]
    # Each side really ran the runner it was asked for, with the SepLLM mixin.
    assert runner["v1"]["v2"] is False and runner["v1"]["class"] == "SepLLMGPUModelRunner", runner
    assert runner["v2"]["v2"] is True and runner["v2"]["class"] == "SepLLMV2GPUModelRunner", runner
    # Eviction happened on every request, the same amount on both sides.
    assert cfg["evicted_tokens"]["v1"] > 0 and cfg["evicted_tokens"]["v2"] > 0
    assert all(r["evicted"][0] and r["evicted"][1] for r in cfg["per_request"]), \
        [r["evicted"] for r in cfg["per_request"]]
    assert cfg["phase2_prefix_hit_tokens"]["v2"] > 0
    stats = runner["v2"]["sepllm_v2_stats"]
    assert stats["cg_FULL"] > 0, stats  # all-decode steps replayed a FULL graph
    assert stats["cg_PIECEWISE"] + stats["cg_NONE"] > 0, stats  # mixed steps
    assert stats["shifted_steps"] > 0 and stats["compaction_steps"] > 0, stats
    assert stats["copy_outs"] > 0, stats  # prefix caching: first eviction copies out
    if name.startswith("exact"):
        assert stats["masked_single_steps"] > 0, stats
    mismatches = [(r["phase"], r["request"], r["first_divergence"], r.get("gaps"))
                  for r in cfg["per_request"] if not r["equal"]]
    assert cfg["verdict"] in ("equal", "tie_flips_only"), \
        f"{name}: {cfg['verdict']}; (phase, request, first divergence, log-prob gaps): " \
        f"{mismatches}; prefix drift {cfg['max_prefix_logprob_drift']}"
    assert cfg["passed"], cfg["failed_checks"]
