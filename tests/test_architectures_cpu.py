"""Exactness per architecture, end to end on CPU: vLLM + SEPLLM (real eviction) against the
independent Hugging Face oracle with the SepLLM mask, for the model families people serve.

Each family is a small checkpoint with seeded random weights, built here by transformers from
the family's own config class (so the family's particulars are real: Llama 3.1's ``llama3``
RoPE scaling, Qwen2's q/k/v bias, Qwen3's q/k RMSNorm, Phi-3's fused qkv and gate-up
projections, Qwen3-MoE's routed experts, Gemma's scaled embeddings, GeLU and ``1 + w`` norms),
in float32, with SmolLM2's tokenizer, so the prompts are real text and the separators real
tokens. vLLM loads it with its own model class for the family and runs float32 on CPU.

Both eviction rules run with prefix caching on (vLLM's default): exact eviction (the mask) and
batched eviction (``cache_size``; the prompt counts as one step). The requests must evict, and
SepLLM must change the greedy tokens against full attention for some request of every family,
so an engine that ignored the rule could not pass.

The engines run in one probe (``tests.arch_probe``, in the session's probe host
``tests.probe_host``); meanwhile this process computes the Hugging Face references
(``tests.engine.prefetch``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.common import SHAPES, make_random_model
from tests.engine import prefetch, probe_ok, start_probe
from tests.oracle_hf import greedy_generate

SEPLLM = {"num_sinks": 4, "sep_cap": 16, "window": 64}
#: Eviction rules: exact (the mask) and batched (cache size 120: the cache cycles between
#: a + s + w = 84 and 120 tokens).
RULES = {"exact": None, "batched": 120}
NUM_PROMPTS = 4
NEW_TOKENS = 32
#: A small size of every family: 2 layers, hidden 128, 4 query heads over 2 KV heads of 32.
_TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 49152,
         "max_position_embeddings": 16384, "torch_dtype": "float32", "bos_token_id": 1,
         "eos_token_id": 2, "tie_word_embeddings": False}


def _tiny(shape: str, **extra) -> dict:
    return dict(SHAPES[shape], **_TINY, **extra)


#: family -> config of its tiny checkpoint.
ARCHS: dict[str, dict] = {
    "llama3.1": _tiny("llama3.1-8b"),  # llama3 RoPE scaling
    "qwen2.5": _tiny("qwen2.5-7b"),  # q/k/v bias
    "qwen3": _tiny("qwen3-8b"),  # q/k norm
    "mistral": _tiny("mistral-7b"),
    "phi3": dict(_TINY, architectures=["Phi3ForCausalLM"], model_type="phi3",
                 hidden_act="silu", rope_theta=10000.0, rms_norm_eps=1e-5, pad_token_id=0,
                 original_max_position_embeddings=8192, sliding_window=None),
    "qwen3-moe": _tiny("qwen3-30b-a3b", num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=64),
    "gemma": dict(_TINY, architectures=["GemmaForCausalLM"], model_type="gemma",
                  hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                  rope_theta=10000.0, rms_norm_eps=1e-6, pad_token_id=0,
                  tie_word_embeddings=True,
                  # Gemma scales the embeddings by sqrt(hidden) and ties the output head, so at
                  # std 0.02 the input token's own embedding dominates and the model repeats
                  # it whatever it attends to; at 0.2 the layers decide the next token.
                  initializer_range=0.2),
}


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    from vllm_sepllm.testing.texts import real_text_prompts

    texts = real_text_prompts(tokenizer, NUM_PROMPTS, 1200, seed=11)
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return [p[:300 + 70 * i] for i, p in enumerate(ids)]  # 300 to 510 tokens


@pytest.fixture(scope="module")
def sep_ids(tokenizer) -> set[int]:
    from vllm_sepllm.config import SepLLMConfig
    from vllm_sepllm.separators import separator_token_ids

    return set(separator_token_ids(tokenizer, SepLLMConfig()))


def oracle(model: str, prompt: list[int], sep_ids, rule: str) -> list[int]:
    """The Hugging Face oracle of ``rule`` (a key of RULES, or "full": full attention)."""
    if rule == "full":
        return greedy_generate(model, prompt, NEW_TOKENS, sep_ids, 0, None, 1 << 30, mode="full")
    return greedy_generate(model, prompt, NEW_TOKENS, sep_ids, SEPLLM["num_sinks"],
                           SEPLLM["sep_cap"], SEPLLM["window"], cache_size=RULES[rule])


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, model_path, prompts, sep_ids) -> dict[str, tuple[str, list]]:
    """family -> (its checkpoint, per rule of RULES: the probe's result); the oracle calls of
    the selected tests are made meanwhile."""
    root = tmp_path_factory.mktemp("families")
    models = {name: str(make_random_model(root / name.replace(".", "_"), Path(model_path), shape,
                                          vary_vectors=0.1))
              for name, shape in ARCHS.items()}
    spec = root / "spec.json"
    spec.write_text(json.dumps({"models": models, "prompts": prompts, "new_tokens": NEW_TOKENS,
                                "configs": [dict(SEPLLM, cache_size=c) for c in RULES.values()]}))
    selected = [(item.callspec.params["name"], item.callspec.params["rule"])
                for item in request.session.items if item.module is request.module]
    calls = [lambda m=models[name], p=p, r=r: oracle(m, p, sep_ids, r)
             for name, rule in selected for r in (rule, "full") for p in prompts]
    with start_probe("tests.arch_probe", str(spec)) as probe:
        prefetch(probe, calls)
        res = probe.result()
    return {name: (models[name], res[name]) for name in ARCHS}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("name", list(ARCHS))
def test_family_equals_hf_oracle(runs, prompts, sep_ids, name, rule):
    model, per_rule = runs[name]
    run = per_rule[list(RULES).index(rule)]
    probe_ok(run, f"{name} {rule}")
    cache_size = RULES[rule]
    got = [(r["tokens"], r["kv"]) for r in run["requests"]]
    kept = cache_size or SEPLLM["num_sinks"] + SEPLLM["sep_cap"] + SEPLLM["window"]
    assert all(kv["kv_evicted"] > 0 and kv["kv_retained"] <= kept + 1 for _, kv in got), \
        [kv for _, kv in got]
    want = [oracle(model, p, sep_ids, rule) for p in prompts]
    mismatches = [(i, next(j for j, (a, b) in enumerate(zip(g, w)) if a != b))
                  for i, ((g, _), w) in enumerate(zip(got, want)) if g != w]
    assert not mismatches, f"{name}: (prompt, first differing token) pairs: {mismatches}"
    # The rule matters for this checkpoint: full attention gives other tokens somewhere.
    full = [oracle(model, p, sep_ids, "full") for p in prompts]
    assert full != want, f"{name}: SepLLM's oracle equals full attention on every prompt"
