"""The replay logits processor (benchmarks/replay.py): forced real-text decoding.

Unit part (no engine): batch bookkeeping under added/removed/moved/swapped rows, targets past
the continuation, mixed forced and free rows, bad ``extra_args``. Engine part: SmolLM2 with
real weights, vLLM's multiprocessing engine, CPU default backend and SEPLLM (with eviction):
more requests than ``max_num_seqs`` (rows move), different lengths, continuations given both
as ids and as rows of a file, two rounds of preempting every running request; the generated
ids must equal the continuations exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks.replay import FQCN, ReplayLogitsProcessor, continuation_of
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

VOCAB = 50


def _proc(max_num_seqs: int = 8) -> ReplayLogitsProcessor:
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
                          model_config=SimpleNamespace(get_vocab_size=lambda: VOCAB))
    return ReplayLogitsProcessor(cfg, torch.device("cpu"), False)


def _params(cont=None) -> SamplingParams:
    return SamplingParams(max_tokens=8, extra_args=None if cont is None else {"replay": cont})


def _sample(proc: ReplayLogitsProcessor, batch: int) -> list[int]:
    logits = torch.randn(batch, VOCAB)
    return proc.apply(logits).argmax(dim=1).tolist()


def test_targets_follow_rows_through_adds_moves_swaps_and_removals():
    proc = _proc()
    outs = {name: [] for name in "abcd"}
    conts = {"a": [1, 2, 3, 4, 5, 6], "b": [10, 11, 12, 13, 14, 15],
             "c": [20, 21, 22, 23, 24, 25], "d": [30, 31, 32]}
    proc.update_state(BatchUpdate(3, removed=[], moved=[], added=[
        (0, _params(conts["a"]), None, outs["a"]),
        (1, _params(), None, outs["b"]),  # not forced
        (2, _params(conts["c"]), None, outs["c"])]))
    assert proc.num_forced == 2
    free_logits = torch.randn(3, VOCAB)
    got = proc.apply(free_logits.clone())
    assert torch.equal(got[1], free_logits[1])  # the free row is untouched
    assert got.argmax(1).tolist()[::2] == [1, 20]
    assert torch.isinf(got[0]).sum() == VOCAB - 1

    outs["a"].append(1)
    outs["c"].append(20)
    proc.update_state(None)  # no batch change: targets advance with the output lists
    assert _sample(proc, 3)[::2] == [2, 21]

    # b (row 1) leaves and the new forced request d fills its row; then rows 1 and 2 swap
    outs["a"].append(2)
    outs["c"].append(21)
    proc.update_state(BatchUpdate(3, removed=[1], moved=[],
                                  added=[(1, _params(conts["d"]), None, outs["d"])]))
    assert _sample(proc, 3) == [3, 30, 22]
    proc.update_state(BatchUpdate(3, removed=[], added=[],
                                  moved=[(1, 2, MoveDirectionality.SWAP)]))
    assert _sample(proc, 3) == [3, 22, 30]
    # c (row 1) finishes; condense moves d one way from row 2 down to row 1
    proc.update_state(BatchUpdate(2, removed=[1], added=[],
                                  moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert proc.num_forced == 2 and proc.clen[2] == 0 and proc.outs[2] == ()
    assert _sample(proc, 2) == [3, 30]
    # a continuation longer than the buffer widens it; the other rows keep theirs
    long = [(7 * j) % VOCAB for j in range(150)]
    out_e = [0] * 120  # resumed after preemption: 120 tokens already generated
    proc.update_state(BatchUpdate(3, removed=[], moved=[], added=[(2, _params(long), None,
                                                                     out_e)]))
    assert proc.buf.shape[1] >= 150
    assert _sample(proc, 3) == [3, 30, long[120]]


def test_past_the_continuation_the_row_samples_freely_and_ids_are_checked():
    proc = _proc()
    out = [5, 6]  # already generated both tokens of the continuation
    proc.update_state(BatchUpdate(1, removed=[], moved=[], added=[(0, _params([5, 6]), None,
                                                                     out)]))
    logits = torch.randn(1, VOCAB)
    assert torch.equal(proc.apply(logits.clone()), logits)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        proc.update_state(BatchUpdate(1, removed=[], moved=[], added=[
            (0, _params([VOCAB]), None, [])]))


def test_bad_extra_args_are_refused_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="extra_args.replay must be a list"):
        ReplayLogitsProcessor.validate_params(_params("abc"))
    with pytest.raises(ValueError, match="extra_args.replay must be a list"):
        ReplayLogitsProcessor.validate_params(_params([1, -2]))
    with pytest.raises(ValueError, match="extra_args.replay.file: no such file"):
        continuation_of({"replay": {"file": str(tmp_path / "x.npy"), "row": 0}})
    path = tmp_path / "c.npy"
    np.save(path, np.arange(12, dtype=np.int32).reshape(3, 4))
    with pytest.raises(ValueError, match=r"extra_args.replay.row must be an integer in \[0, 3\)"):
        continuation_of({"replay": {"file": str(path), "row": 3}})
    assert continuation_of({"replay": {"file": str(path), "row": 2}}).tolist() == [8, 9, 10, 11]
    ReplayLogitsProcessor.validate_params(_params())  # no replay: fine


def test_apply_is_vectorised_over_a_large_batch():
    """512 rows × 49,152 vocab in one step: the forced rows cost two indexed kernels."""
    proc = _proc(max_num_seqs=512)
    conts = [list(range(i % 7, i % 7 + 4)) for i in range(512)]
    outs = [[] for _ in range(512)]
    proc.vocab_size = 49152
    proc.update_state(BatchUpdate(512, removed=[], moved=[], added=[
        (i, _params(c), None, o) for i, (c, o) in enumerate(zip(conts, outs))]))
    logits = torch.randn(512, 49152)
    assert proc.apply(logits).argmax(1).tolist() == [c[0] for c in conts]


# ---------------------------------------------------------------------------- engine
NUM_REQUESTS = 10
SEPLLM = {"num_sinks": 4, "sep_cap": 16, "window": 64}


@pytest.fixture(scope="module")
def workload(tokenizer, tmp_path_factory):
    """Real-text prompts (150–285 tokens) and the text that follows each (12–48 tokens)."""
    from vllm_sepllm.testing.texts import real_text

    ids = tokenizer.encode(real_text("alice29"), add_special_tokens=False)
    prompts, conts = [], []
    for i in range(NUM_REQUESTS):
        start = 3000 + 1500 * i
        plen, clen = 150 + 15 * i, 12 + 4 * i
        prompts.append(ids[start:start + plen])
        conts.append(ids[start + plen:start + plen + clen])
    table = np.zeros((NUM_REQUESTS, 48), dtype=np.int32)
    for i, c in enumerate(conts):
        table[i, :len(c)] = c
    path = tmp_path_factory.mktemp("replay") / "conts.npy"
    np.save(path, table)
    return prompts, conts, str(path)


def _run_replay(model_path, workload, **engine) -> tuple[list[list[int]], list[int]]:
    from vllm.inputs import TokensPrompt

    from tests.engine import llm_engine

    prompts, conts, path = workload
    with llm_engine(model_path, max_num_seqs=4, max_model_len=1024,
                    logits_processors=[FQCN], **engine) as llm:
        eng = llm.llm_engine
        for i, (p, c) in enumerate(zip(prompts, conts)):
            replay = {"file": path, "row": i} if i % 2 else c  # both ways of asking
            eng.add_request(f"r{i}", TokensPrompt(prompt_token_ids=p), SamplingParams(
                max_tokens=len(c), temperature=0.0, ignore_eos=True,
                extra_args={"replay": replay}))
        done, steps = {}, 0
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = list(out.outputs[0].token_ids)
            steps += 1
            if steps in (6, 20):  # vLLM's preemption path: every running request recomputes
                assert eng.reset_prefix_cache(reset_running_requests=True)
        got = [done[f"r{i}"] for i in range(NUM_REQUESTS)]
        # The same prompt without replay: the model's own greedy continuation differs.
        free = llm.generate([TokensPrompt(prompt_token_ids=prompts[3])], SamplingParams(
            max_tokens=len(conts[3]), temperature=0.0, ignore_eos=True), use_tqdm=False)
        return got, list(free[0].outputs[0].token_ids)


@pytest.mark.parametrize("engine", [{}, {"attention_backend": "SEPLLM",
                                         "additional_config": {"sepllm": SEPLLM}}],
                         ids=["cpu-default", "sepllm"])
def test_engine_emits_the_continuations_exactly(model_path, workload, engine):
    got, free = _run_replay(model_path, workload, **engine)
    _, conts, _ = workload
    assert got == conts
    assert free != conts[3]
