"""Starting vLLM for tests: on CPU small, eager, float32 (token-exact comparisons)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_engine_kwargs(**overrides) -> dict:
    kwargs = dict(
        dtype="float32",
        max_model_len=2048,
        enforce_eager=True,
        kv_cache_memory_bytes=1 << 30,
        max_num_seqs=16,
        max_num_batched_tokens=256,
        seed=0,
    )
    kwargs.update(overrides)
    return kwargs


@contextlib.contextmanager
def llm_engine(model: str, **overrides) -> Iterator:
    """A CPU test engine (:func:`cpu_engine_kwargs` with ``overrides``), shut down on exit."""
    with engine(model, **cpu_engine_kwargs(**overrides)) as llm:
        yield llm


@contextlib.contextmanager
def engine(model: str, **kwargs) -> Iterator:
    """``LLM(model, **kwargs)``, shut down on exit."""
    from vllm import LLM

    llm = LLM(model=model, **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def greedy_ids(llm, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def each_or_error(items, fn) -> list:
    """``[fn(item) ...]`` in a probe process, an item that raises giving ``{"error": the end of
    its traceback}`` instead, so the other items still run and the test names the failure
    (:func:`probe_ok`)."""
    import traceback

    out = []
    for item in items:
        try:
            out.append(fn(item))
        except Exception:  # noqa: BLE001 - reported to the test, which shows it
            out.append({"error": traceback.format_exc()[-6000:]})
    return out


def probe_ok(result: dict, what: str) -> dict:
    """A probe's result for ``what``, failing the test with the probe's traceback if it raised."""
    assert "error" not in result, f"{what}: the engine failed in the probe:\n{result['error']}"
    return result


def run_probe(module: str, *args: str) -> dict:
    """Run ``python -m module args...`` from the repository root (an in-process engine kept
    out of the pytest process, whose CPU thread binding it would change) and return the JSON
    of its last ``PROBE `` line."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stderr[-6000:]
    return json.loads(lines[-1][len("PROBE "):])
