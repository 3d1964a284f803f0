"""PE shift (``sepllm.pe_shift``): the re-rotation op, the configuration, and the engine
streaming past the model's position table token-exactly against an independent reference.

The engine test runs SmolLM2 with its position table cut to 256 (a copy of its config with
``max_position_embeddings=256``; the same weights), so a request of 700 tokens is far past the
model's positions, as 200K tokens are for the real 8K table (benchmarks/ppl.py measures that).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from vllm_sepllm.config import SepLLMConfig, SepLLMConfigError, from_additional_config
from vllm_sepllm.rope_shift import (
    KEEP_ORIGIN_DTYPES,
    RopeParams,
    apply_rope_reference,
    ranks_by_position,
    rotate,
    shift_keys,
)

HEAD_SIZES = [64, 80, 128]


def _params(head_size: int, rotary_dim: int | None = None, neox: bool = True,
            theta: float = 10000.0) -> RopeParams:
    rd = rotary_dim or head_size
    inv_freq = 1.0 / theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd)
    return RopeParams(inv_freq=inv_freq, head_size=head_size, rotary_dim=rd, neox=neox)


# ---------------------------------------------------------------------------- the op
@pytest.mark.parametrize("head_size", HEAD_SIZES)
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("partial", [False, True])
def test_rotate_composes(head_size, neox, partial):
    """A key rotated at p, then shifted by d, is the key rotated at p + d."""
    params = _params(head_size, head_size // 2 if partial else None, neox, theta=500000.0)
    g = torch.Generator().manual_seed(head_size)
    x = torch.randn(37, 3, head_size, generator=g)
    p = torch.randint(0, 4000, (37,), generator=g)
    d = torch.randint(-1000, 0, (37,), generator=g)
    d[:5] = 0
    rotated = apply_rope_reference(x, p, params).float()
    shifted = rotate(rotated, d, params)
    expected = apply_rope_reference(x, p + d, params).float()
    # float32 angles (as vLLM computes its own cos/sin cache): |d * inv_freq| <= 1000 rad
    torch.testing.assert_close(shifted, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(shifted[:5], rotated[:5])  # delta 0 is an exact no-op
    if partial:
        assert torch.equal(shifted[..., head_size // 2:], rotated[..., head_size // 2:])


def test_shift_keys_touches_keys_of_given_slots_only():
    params = _params(64)
    g = torch.Generator().manual_seed(0)
    caches = [torch.randn(5, 16, 3, 128, generator=g) for _ in range(3)]
    before = [c.clone() for c in caches]
    slots = torch.tensor([3, 17, 40, 79])
    delta = torch.tensor([-1, -5, 0, -300])
    shift_keys(caches, slots, delta, params)
    for c, b in zip(caches, before):
        flat, fb = c.view(-1, 3, 128), b.view(-1, 3, 128)
        others = torch.ones(80, dtype=torch.bool)
        others[slots] = False
        assert torch.equal(flat[others], fb[others])
        assert torch.equal(flat[slots, :, 64:], fb[slots, :, 64:])  # values untouched
        torch.testing.assert_close(flat[slots, :, :64], rotate(fb[slots, :, :64], delta, params))


def test_shift_keys_from_origin():
    """16-bit path: the cached key becomes rotate(original key, delta); the originals (laid out
    like the cache, [num_blocks, block_size, Hkv, D]) are not modified."""
    params = _params(64)
    g = torch.Generator().manual_seed(2)
    caches = [torch.randn(5, 16, 3, 128, generator=g).to(torch.bfloat16) for _ in range(2)]
    origin = [torch.randn(5, 16, 3, 64, generator=g).to(torch.bfloat16) for _ in range(2)]
    kept = [o.clone() for o in origin]
    slots = torch.tensor([0, 21, 64, 79])
    delta = torch.tensor([-3, 0, -7, -100])
    shift_keys(caches, slots, delta, params, origin)
    for c, o, k in zip(caches, origin, kept):
        assert torch.equal(o, k)
        expected = rotate(o.view(-1, 3, 64)[slots], delta, params)
        assert torch.equal(c.view(-1, 3, 128)[slots, :, :64], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rerotation_precision(dtype):
    """A window key's rank falls by one at almost every step (320 times for a4 s64 w256). The
    worker re-rotates 16-bit keys from their original copy (rope_shift.KEEP_ORIGIN_DTYPES): the
    key stays within about one 16-bit rounding of a key rotated once at its final position.
    fp32 keys are re-rotated in place: each re-rotation adds at most about one fp32 rounding
    (measured: 6.1e-6 after 320, i.e. ~100 unit roundoffs). In-place 16-bit re-rotation would
    drift by many 16-bit roundings: measured here to show why the copy exists."""
    params = _params(64, theta=100000.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 3, 64, generator=g)
    steps = 320
    exact = apply_rope_reference(x, torch.zeros(256), params)
    origin = apply_rope_reference(x, torch.full((256,), steps), params).to(dtype)
    k = origin.clone()
    for i in range(1, steps + 1):
        if dtype in KEEP_ORIGIN_DTYPES:
            k = rotate(origin, torch.full((256,), -i), params)
        else:
            k = rotate(k, torch.full((256,), -1), params)
    one_rounding = float((exact.to(dtype).double() - exact).norm() / exact.norm())
    rel = float((k.double() - exact).norm() / exact.norm())
    print(f"{dtype}: relative error after {steps} re-rotations {rel:.2e} "
          f"(one rounding {one_rounding:.2e})")
    if dtype in KEEP_ORIGIN_DTYPES:
        assert rel < 3 * one_rounding
    else:  # in place: at most one unit roundoff per re-rotation (x = exactly fp32, so
        # one_rounding is 0 here)
        assert rel < steps * torch.finfo(dtype).eps / 2
    if dtype in KEEP_ORIGIN_DTYPES:  # what in-place would do
        k = origin.clone()
        for _ in range(steps):
            k = rotate(k, torch.full((256,), -1), params)
        assert float((k.double() - exact).norm() / exact.norm()) > 5 * one_rounding


def test_ranks_by_position():
    pos = torch.tensor([7, 0, 300, 5, 6, 1000])
    assert ranks_by_position(pos).tolist() == [3, 0, 4, 1, 2, 5]


# ---------------------------------------------------------------------------- config
def test_config_pe_shift():
    assert SepLLMConfig(pe_shift=True).max_cache_tokens == 4 + 64 + 256
    assert SepLLMConfig(mode="streamingllm", sep_cap=None, pe_shift=True).max_cache_tokens == 260
    cfg = from_additional_config({"sepllm": {"pe_shift": True}}, environ={})
    assert cfg.pe_shift
    assert from_additional_config({}, environ={"VLLM_SEPLLM_PE_SHIFT": "true"}).pe_shift
    with pytest.raises(SepLLMConfigError, match=r"sepllm.pe_shift must be true or false, got 1"):
        SepLLMConfig(pe_shift=1)
    with pytest.raises(SepLLMConfigError, match="needs a bounded cache .mode full"):
        SepLLMConfig(mode="full", pe_shift=True)
    with pytest.raises(SepLLMConfigError, match="needs a bounded cache .sep_cap null"):
        SepLLMConfig(sep_cap=None, pe_shift=True)
    # A request cannot unbound the cache of a PE-shift engine.
    with pytest.raises(SepLLMConfigError, match="bounded cache"):
        cfg.with_overrides({"mode": "full"})


# ---------------------------------------------------------------------------- engine
MAX_POS = 256
A, S, W, CHUNK = 4, 16, 64, 64  # a + s + w + chunk = 148 <= 256


@pytest.fixture(scope="module")
def short_model(model_path, tmp_path_factory) -> str:
    """SmolLM2 with ``max_position_embeddings`` = 256 (same weights, linked)."""
    out = tmp_path_factory.mktemp("smollm2-pos256")
    for f in Path(model_path).iterdir():
        if f.name != "config.json":
            os.symlink(f, out / f.name)
    config = json.loads((Path(model_path) / "config.json").read_text())
    config["max_position_embeddings"] = MAX_POS
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def test_engine_streams_past_positions_token_exact(short_model, tokenizer, monkeypatch):
    """Two requests of 700 and 613 prompt tokens + 24 generated (logical positions up to 724
    with a 256-entry position table): greedy tokens equal the un-rotated-key reference exactly
    and prompt log-probs agree to 1e-3; the second is StreamingLLM (per-request mode)."""
    from tests.engine import llm_engine
    from tests.oracle_pe_shift import stream
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_sepllm.testing.texts import real_text

    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    # The 16-bit path (re-rotate from the original keys, what bf16 GPUs run), in fp32 so that
    # tokens must match exactly. The in-place fp32 path differs only in the rotation's source.
    monkeypatch.setenv("VLLM_SEPLLM_PE_SHIFT_KEEP_ORIGIN", "1")
    ids = tokenizer.encode(real_text("botchan"), add_special_tokens=False)
    cases = [(ids[1000:1700], "sepllm"), (ids[9000:9613], "streamingllm")]
    new_tokens = 24
    with llm_engine(short_model, attention_backend="SEPLLM", max_model_len=1024,
                    max_num_batched_tokens=CHUNK, max_num_seqs=1,
                    additional_config={"sepllm": {"num_sinks": A, "sep_cap": S, "window": W,
                                                  "pe_shift": True}}) as llm:
        sep_ids = llm.llm_engine.vllm_config.additional_config["sepllm"]["separator_token_ids"]
        outs = []
        for prompt, mode in cases:  # one at a time: chunk boundaries are then [0, 64), ...
            params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                                    prompt_logprobs=0, extra_args={"sepllm": {"mode": mode}})
            outs.append(llm.generate([TokensPrompt(prompt_token_ids=prompt)], params,
                                     use_tqdm=False)[0])
    for (prompt, mode), out in zip(cases, outs):
        ref_lp, ref_gen = stream(short_model, prompt, sep_ids, A, S, W, CHUNK, len(prompt),
                                 new_tokens, mode=mode)
        assert list(out.outputs[0].token_ids) == ref_gen, mode
        got_lp = [d[t].logprob
                  for d, t in zip(out.prompt_logprobs[1:], prompt[1:])]
        torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(ref_lp),
                                   atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------- start-up checks
def _engine_config(model, **kwargs):
    import vllm.plugins
    from vllm.engine.arg_utils import EngineArgs

    vllm.plugins.load_general_plugins()
    return EngineArgs(model=model, **kwargs).create_engine_config()


def test_startup_accepts_long_max_model_len(short_model, monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    cfg = _engine_config(short_model, attention_backend="SEPLLM", max_model_len=100_000,
                         max_num_batched_tokens=CHUNK,
                         additional_config={"sepllm": {"num_sinks": A, "sep_cap": S,
                                                       "window": W, "pe_shift": True}})
    assert cfg.additional_config["sepllm"]["pe_shift"] is True
    assert cfg.model_config.max_model_len == 100_000


def test_startup_refuses_positions_past_the_table(short_model, monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    with pytest.raises(SepLLMConfigError, match=r"sepllm.pe_shift=true: a \+ s \+ w \+ "
                       r"max_num_batched_tokens = 452 is above max_position_embeddings=256"):
        _engine_config(short_model, attention_backend="SEPLLM", max_model_len=4096,
                       max_num_batched_tokens=128,
                       additional_config={"sepllm": {"num_sinks": 4, "sep_cap": 64,
                                                     "window": 256, "pe_shift": True}})
