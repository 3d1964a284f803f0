"""Seeded fuzz of the per-request settings surface (``extra_args`` / ``vllm_xargs``).

    .venv/bin/python benchmarks/fuzz_settings.py --payloads 10000 \\
        --out benchmarks/results/cpu_settings_fuzz.json

A request may carry SepLLM settings as ``extra_args={"sepllm": {...}}`` (Python API) or flat
``"sepllm_<key>"`` entries (what the OpenAI server's ``vllm_xargs`` become). This draws
``--payloads`` random payloads from a seed (valid and broken keys, every JSON value type,
negative, huge and boundary sizes, nested and flat forms, non-string keys, non-object values)
and sends each one through three paths:

1. **The contract.** An independent statement of what is valid (:func:`expected`, written from
   the documented rules, not by calling the plugin) says accept or reject and, if accepted,
   the effective (mode, a, s, w). ``patches.validate_request`` (the check vLLM's front end
   runs) must agree on every payload; a refusal is one ``ValueError`` line naming a field
   that really is bad.
2. **A live engine** (vLLM's ``LLMEngine`` with its engine core in its own process, as served;
   a tiny seeded Llama with SmolLM2's tokenizer, real-text prompts of 16-600 tokens, so small
   windows really evict): every payload goes in through ``add_request``. Refused ones must fail
   there with ``ValueError`` (the front end, before the engine core sees them); accepted ones
   must finish with all their tokens and KV figures that fit their own policy (evicted +
   retained = tokens; retained <= a + s + w, or a + w in streamingllm; nothing evicted in mode
   full).
3. **Past the front end.** ``--bypass`` refused payloads are sent again with vLLM's front-end
   hooks unwrapped, so they reach the engine core unvalidated (as from a client of the engine
   core itself); the core must serve them with the engine's settings and not fail.

Then the engine must still be alive and answer a plain request, and the SepLLM block manager
must hold nothing (``vllm:sepllm_kv_blocks_used`` and ``vllm:sepllm_num_requests`` 0 on the
engine's own Prometheus registry). Exit status 1 if anything disagrees; the JSON record lists
counts, every disagreement (capped) and the time taken.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: The engine's settings: a=4, s=16, w=64.
ENGINE = {"mode": "sepllm", "num_sinks": 4, "sep_cap": 16, "window": 64}
MAX_MODEL_LEN = 1024
PER_REQUEST = ("mode", "num_sinks", "sep_cap", "window")
MODES = ("sepllm", "streamingllm", "full")
#: A tiny Llama (2 layers, hidden 128): the fuzz is about the settings surface, not the model.
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "vocab_size": 49152, "max_position_embeddings": 4096, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
MAX_REPORTED = 50  # disagreements kept in the record


# ---------------------------------------------------------------------- payloads
def _value(rng: random.Random, key: str) -> Any:
    """A value for ``key``: mostly valid, else anything JSON (or Python) can carry."""
    if rng.random() < 0.6:
        if key == "mode":
            return rng.choice(MODES)
        if key == "sep_cap" and rng.random() < 0.15:
            return rng.choice([None, "none", "NULL", "null", "None"])
        lo = 1 if key == "window" else 0
        return rng.choice([lo, lo + 1, 2, 4, 8, 16, 32, 64, 100, 256, 511, 1000, MAX_MODEL_LEN])
    return rng.choice([
        -1, -5, 0, MAX_MODEL_LEN + 1, 2048, 10 ** 9, 2 ** 31, 2 ** 63, 10 ** 30,
        True, False, 0.5, 64.0, -1.0, float("nan"), float("inf"),
        "64", "none", "", "sepllm", "streamingllm ", "FULL", "x" * 40,
        None, [], [64], {}, {"window": 64},
    ])


def _key(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.85:
        return rng.choice(PER_REQUEST)
    if r < 0.93:
        return rng.choice(["separators", "separator_token_ids", "cache_size", "pe_shift"])
    return rng.choice(["windows", "Window", "", "mode ", "sinks"])


def random_payload(rng: random.Random) -> Any:
    """One random ``extra_args``."""
    form = rng.random()
    if form < 0.03:  # not an object at all
        return rng.choice([[], ["sepllm"], "sepllm_window=64", 5])
    if form < 0.06:  # unrelated extra_args only
        return rng.choice([{}, {"foo": 1}, {"replay_x": [1, 2]}, {"sepllmwindow": 3}])
    if form < 0.09:  # "sepllm" that is not an object, or has a non-string key
        return {"sepllm": rng.choice([64, "window=64", [1], None, True, {1: 64},
                                      {("window",): 64}])}
    nested: dict[Any, Any] = {}
    flat: dict[str, Any] = {}
    for _ in range(rng.choice([1, 1, 2, 2, 3, 4])):
        key = _key(rng)
        target = nested if form < 0.5 else flat if form < 0.9 else rng.choice([nested, flat])
        if target is nested:
            nested[key] = _value(rng, key)
        else:
            flat["sepllm_" + key] = _value(rng, key)
    payload: dict[str, Any] = dict(flat)
    if nested or form < 0.5:
        payload["sepllm"] = nested
    return payload


# ---------------------------------------------------------------------- the contract
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _value_ok(name: str, v: Any, max_len: int) -> bool:
    if name == "mode":
        return isinstance(v, str) and v in MODES
    if name == "sep_cap" and v is None:
        return True
    lo = 1 if name == "window" else 0
    return _is_int(v) and lo <= v <= max_len


def expected(payload: Any, engine: dict = ENGINE, max_len: int = MAX_MODEL_LEN
             ) -> tuple[bool, set[str], dict | None]:
    """What the documented rules say of ``payload``: (accepted, the fields a refusal may name,
    the effective mode/a/s/w if accepted). Rules (README "Per-request settings"): ``extra_args``
    is an object; ``extra_args["sepllm"]`` an object with string keys; ``sepllm_<key>``
    entries override it; only mode, num_sinks, sep_cap and window per request; every value
    given is valid on its own, also one that another entry overrides: mode one of
    sepllm/streamingllm/full; num_sinks an integer in [0, max_model_len]; sep_cap null (also
    the strings none/null in the flat form) or an integer in [0, max_model_len]; window an
    integer in [1, max_model_len]."""
    if payload is None:
        return True, set(), dict(engine)
    if not isinstance(payload, dict):
        return False, {"extra_args"}, None
    entries: list[tuple[Any, Any]] = []
    nested = payload.get("sepllm")
    if nested is not None:
        if not isinstance(nested, dict) or not all(isinstance(k, str) for k in nested):
            return False, {"sepllm"}, None
        entries += nested.items()
    for key, value in payload.items():
        if isinstance(key, str) and key.startswith("sepllm_"):
            name = key[len("sepllm_"):]
            if name == "sep_cap" and isinstance(value, str) and value.lower() in ("none", "null"):
                value = None
            entries.append((name, value))
    unknown = {k for k, _ in entries if k not in PER_REQUEST}
    if unknown:
        return False, {repr(k) for k in unknown}, None
    bad = {k for k, v in entries if not _value_ok(k, v, max_len)}
    if bad:
        return False, bad, None
    return True, set(), {**engine, **dict(entries)}


def retention_bound(cfg: dict) -> int | None:
    """The most KV tokens a finished request may hold under ``cfg`` (None: unbounded)."""
    if cfg["mode"] == "full" or (cfg["mode"] == "sepllm" and cfg["sep_cap"] is None):
        return None
    if cfg["mode"] == "streamingllm":
        return cfg["num_sinks"] + cfg["window"]
    return cfg["num_sinks"] + cfg["sep_cap"] + cfg["window"]


# ---------------------------------------------------------------------- the runs
def _fake_vllm_config(engine_cfg: dict) -> SimpleNamespace:
    """What ``validate_request`` reads of a VllmConfig."""
    return SimpleNamespace(additional_config={"sepllm": engine_cfg},
                           model_config=SimpleNamespace(max_model_len=MAX_MODEL_LEN))


def _names_a_bad_field(message: str, fields: set[str]) -> bool:
    return any(f in message for f in fields)


def check_contract(payloads: list[Any]) -> dict:
    """Path 1: ``validate_request`` against :func:`expected` for every payload."""
    from vllm_sepllm.config import SepLLMConfig
    from vllm_sepllm.patches import validate_request

    vcfg = _fake_vllm_config(SepLLMConfig(**ENGINE, separator_token_ids=(13,)).to_dict())
    accepted = 0
    disagreements = []
    for i, payload in enumerate(payloads):
        ok, fields, eff = expected(payload)
        try:
            cfg = validate_request(vcfg, payload)
            got = {k: getattr(cfg, k) for k in PER_REQUEST}
            if not ok or got != eff:
                disagreements.append({"i": i, "payload": repr(payload), "expected": fields,
                                      "got": got})
            accepted += 1
        except ValueError as e:
            msg = str(e)
            if ok or "\n" in msg or not _names_a_bad_field(msg, fields):
                disagreements.append({"i": i, "payload": repr(payload),
                                      "expected": sorted(fields) if not ok else eff,
                                      "got": msg})
        except Exception as e:  # noqa: BLE001 - any other exception is a finding
            disagreements.append({"i": i, "payload": repr(payload),
                                  "got": f"{type(e).__name__}: {e}"})
    return {"payloads": len(payloads), "accepted": accepted,
            "refused": len(payloads) - accepted, "disagreements": len(disagreements),
            "examples": disagreements[:MAX_REPORTED]}


def _prompts(tokenizer, rng: random.Random, n: int) -> list[list[int]]:
    from vllm_sepllm.testing.texts import real_text

    ids = tokenizer.encode(real_text(), add_special_tokens=False)
    out = []
    for _ in range(n):
        length = rng.choice([16, 40, 90, 150, 300, 600])
        start = rng.randrange(0, len(ids) - length)
        out.append(ids[start:start + length])
    return out


def _unwrap_front_end():
    """Undo the plugin's front-end hooks in this process (ledger item 5), so that requests
    reach the engine core unvalidated; returns a function that restores them."""
    from vllm.v1.engine.input_processor import InputProcessor

    saved = (InputProcessor._validate_params, InputProcessor.process_inputs)
    InputProcessor._validate_params = saved[0].__wrapped__
    InputProcessor.process_inputs = saved[1].__wrapped__

    def restore():
        InputProcessor._validate_params, InputProcessor.process_inputs = saved

    return restore


def run_engine(payloads: list[Any], model: str, tokenizer, seed: int, bypass: int,
               in_flight: int = 64) -> dict:
    """Paths 2 and 3 on a live engine; see the module docstring."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.llm_engine import LLMEngine

    from vllm_sepllm.metrics import SepLLMPrometheusStatLogger

    rng = random.Random(seed + 1)
    prompts = _prompts(tokenizer, rng, 64)
    # The engine core in its own process, as `vllm serve` and LLM() run it.
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=model, attention_backend="SEPLLM", dtype="float32",
                   max_model_len=MAX_MODEL_LEN, enforce_eager=True,
                   kv_cache_memory_bytes=1 << 28, max_num_seqs=in_flight,
                   max_num_batched_tokens=1024, seed=0, block_size=16,
                   additional_config={"sepllm": dict(ENGINE)}, disable_log_stats=False),
        stat_loggers=[SepLLMPrometheusStatLogger], enable_multiprocessing=True)
    problems: list[dict] = []
    counts = {"sent": 0, "refused_front_end": 0, "finished": 0, "evicting": 0,
              "bypassed": 0, "bypass_unsendable": 0, "bypassed_finished": 0,
              "other_errors": 0}
    pending: dict[str, tuple[int, int, dict | None]] = {}

    def drain(until: int) -> None:
        while len(pending) > until:
            for out in engine.step():
                if not out.finished:
                    continue
                i, want, cfg = pending.pop(out.request_id)
                toks = len(out.outputs[0].token_ids)
                kv = (out.kv_transfer_params or {}).get("sepllm") or {}
                counts["finished" if cfg is not None else "bypassed_finished"] += 1
                why = []
                if toks != want:
                    why.append(f"{toks} tokens, asked {want}")
                cfg = cfg or ENGINE  # a bypassed request runs with the engine's settings
                if kv.get("kv_retained", -1) + kv.get("kv_evicted", -1) != kv.get("tokens"):
                    why.append(f"evicted + retained != tokens: {kv}")
                # A request evicts down to its bound at each decode step; one that ends with
                # its first token (max_tokens 1) holds its whole prompt until freed (prefix
                # caching: prompts are held whole until computed).
                bound = retention_bound(cfg) if want > 1 else None
                if bound is not None and kv.get("kv_retained", 0) > bound:
                    why.append(f"retained {kv['kv_retained']} > {bound}")
                if cfg["mode"] == "full" and kv.get("kv_evicted"):
                    why.append(f"mode full evicted {kv['kv_evicted']}")
                if kv.get("kv_evicted"):
                    counts["evicting"] += 1
                if why:
                    problems.append({"i": i, "payload": repr(payloads[i])[:300], "why": why})

    def send(i: int, payload: Any, cfg: dict | None) -> None:
        prompt = prompts[i % len(prompts)]
        want = 1 + i % 4
        params = SamplingParams(max_tokens=want, temperature=0.0, ignore_eos=True,
                                extra_args=payload)
        rid = f"fuzz-{i}" if cfg is not None or payload is None else f"bypass-{i}"
        counts["sent"] += 1
        try:
            engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
        except ValueError as e:
            counts["refused_front_end"] += 1
            if cfg is not None:
                problems.append({"i": i, "payload": repr(payload)[:300],
                                 "why": [f"refused but valid: {e}"]})
            return
        except Exception as e:  # noqa: BLE001 - a non-ValueError from the front end
            counts["other_errors"] += 1
            problems.append({"i": i, "payload": repr(payload)[:300],
                             "why": [f"{type(e).__name__}: {e}"]})
            return
        if cfg is None:
            problems.append({"i": i, "payload": repr(payload)[:300],
                             "why": ["accepted by the front end but invalid"]})
        pending[rid] = (i, want, cfg)
        drain(in_flight)

    t0 = time.perf_counter()
    refused = []
    for i, payload in enumerate(payloads):
        ok, _, cfg = expected(payload)
        send(i, payload, cfg if ok else None)
        if not ok and isinstance(payload, dict):
            refused.append(i)
    drain(0)
    t_front = time.perf_counter() - t0

    # Path 3: refused payloads straight to the engine core.
    from vllm.v1.serial_utils import MsgpackEncoder

    wire = MsgpackEncoder()  # what carries requests to the engine core
    restore = _unwrap_front_end()
    try:
        for i in refused[:bypass]:
            prompt = prompts[i % len(prompts)]
            params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True,
                                    extra_args=payloads[i])
            try:
                wire.encode(params)
            except OverflowError:  # msgpack carries ints of 64 bits only: it never gets there
                counts["bypass_unsendable"] += 1
                continue
            engine.add_request(f"bypass-{i}", TokensPrompt(prompt_token_ids=prompt), params)
            counts["bypassed"] += 1
            pending[f"bypass-{i}"] = (i, 2, None)
            drain(in_flight)
        drain(0)
    finally:
        restore()

    # Still serving, and nothing held.
    engine.add_request("after", TokensPrompt(prompt_token_ids=prompts[0]),
                       SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    done = []
    while not done:  # (not has_unfinished_requests(): a request the front end failed to send
        done += [o for o in engine.step() if o.finished]  # would stay there, see other_errors)
    alive = len(done) == 1 and len(done[0].outputs[0].token_ids) == 4
    engine.do_log_stats()
    gauges = {m.name: m.value for m in engine.get_metrics()
              if m.name in ("vllm:sepllm_kv_blocks_used", "vllm:sepllm_num_requests",
                            "vllm:num_requests_running", "vllm:num_requests_waiting")}
    seconds = time.perf_counter() - t0
    engine.engine_core.shutdown()
    return {"counts": counts, "problems": len(problems), "examples": problems[:MAX_REPORTED],
            "alive_after": alive, "gauges_after": gauges, "seconds_front_and_engine": t_front,
            "seconds": seconds}


def tiny_model(workdir: Path) -> str:
    from benchmarks.common import SHAPES, make_random_model
    from vllm_sepllm.testing.model import smollm2_path

    return str(make_random_model(workdir / "tiny_llama", Path(smollm2_path()),
                                 dict(SHAPES["llama3-8b"], **TINY)))


def run(payload_count: int, seed: int, workdir: Path, bypass: int = 300) -> dict:
    from transformers import AutoTokenizer

    from benchmarks.common import environment

    rng = random.Random(seed)
    payloads = [random_payload(rng) for _ in range(payload_count)]
    contract = check_contract(payloads)
    model = tiny_model(workdir)
    tokenizer = AutoTokenizer.from_pretrained(model)
    live = run_engine(payloads, model, tokenizer, seed, bypass)
    gauges = live["gauges_after"]
    checks = {
        "contract": contract["disagreements"] == 0,
        "engine": live["problems"] == 0,
        "alive_after": live["alive_after"],
        "nothing_held": (len(gauges) == 4 and not any(gauges.values())),
        "bypass_served": live["counts"]["bypassed_finished"] == live["counts"]["bypassed"] > 0,
    }
    return {"seed": seed, "payloads": payload_count, "engine": ENGINE,
            "max_model_len": MAX_MODEL_LEN, "contract": contract, "live": live,
            "checks": checks, "passed": all(checks.values()), **environment()}


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_json_safe(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--payloads", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bypass", type=int, default=300,
                   help="refused payloads sent again past the front end")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        record = run(args.payloads, args.seed, Path(tmp), args.bypass)
    text = json.dumps(_json_safe(record), indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    summary = {k: record[k] for k in ("checks", "passed")}
    print(json.dumps({**summary, "contract": {k: record["contract"][k] for k in
                                              ("payloads", "accepted", "refused",
                                               "disagreements")},
                      "counts": record["live"]["counts"],
                      "seconds": round(record["live"]["seconds"], 1)}))
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
