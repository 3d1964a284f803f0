"""The workers apply a step's plan batched (``worker.SepLLMRunnerMixin._sepllm_compact``,
``worker_v2.SepLLMV2RunnerMixin._sepllm_compact_v2``): the same block lists, block-table row
lengths and copy-out rewrites as the per-request loops they replaced (kept below as the
reference), on random plans: requests in the persistent batch or not (or gone), cuts below,
at and above the held length, copy-outs; and ``D`` per batch row as the list it replaced.
No model, no device: stand-in runners carry just what the hooks read."""

from __future__ import annotations

import copy
import random
from itertools import repeat
from types import SimpleNamespace

import numpy as np
import pytest

from vllm_sepllm.scheduler import StepPlan
from vllm_sepllm.worker import SepLLMRunnerMixin
from vllm_sepllm.worker_v2 import SepLLMV2RunnerMixin


class _BlockTable:
    """V1 ``BlockTable`` of one group: row lengths and the rows ``add_row`` wrote."""

    def __init__(self, max_reqs: int) -> None:
        self.num_blocks_per_row = np.zeros(max_reqs, dtype=np.int32)
        self.rows: dict[int, list[int]] = {}

    def add_row(self, block_ids: list[int], row: int) -> None:
        self.num_blocks_per_row[row] = len(block_ids)
        self.rows[row] = list(block_ids)


class _Tables:
    def __init__(self, table: _BlockTable) -> None:
        self.table = table

    def __getitem__(self, group: int) -> _BlockTable:
        return self.table


class _V1(SepLLMRunnerMixin):
    def _sepllm_move_kv(self, plan: StepPlan) -> None:
        self.moved.append(plan)


def _old_v1(runner, plan: StepPlan) -> None:
    """``_sepllm_compact`` before it was batched (commit e4a4c89)."""
    table = runner.input_batch.block_table[0]
    for req_id, num_blocks in plan.compactions.items():
        req_state = runner.requests.get(req_id)
        if req_state is None:
            continue
        blocks = req_state.block_ids[0]
        new_ids = plan.block_ids.get(req_id)
        if new_ids is not None:
            blocks[:] = new_ids
            row = runner.input_batch.req_id_to_index.get(req_id)
            if row is not None:
                table.add_row(new_ids, row)
        elif num_blocks < len(blocks):
            del blocks[num_blocks:]
            row = runner.input_batch.req_id_to_index.get(req_id)
            if row is not None:
                table.num_blocks_per_row[row] = min(table.num_blocks_per_row[row], num_blocks)
    runner._sepllm_move_kv(plan)


def _random_case(rng: random.Random, max_reqs: int = 64):
    """Requests (some in the persistent batch), and a plan over some of them."""
    rids = [f"q{i}" for i in range(rng.randrange(1, max_reqs))]
    requests, index = {}, {}
    rows = rng.sample(range(max_reqs), len(rids))
    table = _BlockTable(max_reqs)
    for rid, row in zip(rids, rows):
        if rng.random() < 0.1:
            continue  # finished: no state
        ids = [rng.randrange(1, 1000) for _ in range(rng.randrange(0, 12))]
        requests[rid] = SimpleNamespace(block_ids=(ids,))
        if rng.random() < 0.85:  # in the persistent batch
            index[rid] = row
            table.num_blocks_per_row[row] = len(ids)
    compactions, block_ids = {}, {}
    for rid in rng.sample(rids, rng.randrange(0, len(rids) + 1)):
        held = len(requests[rid].block_ids[0]) if rid in requests else 3
        compactions[rid] = rng.randrange(0, held + 3)
        if rng.random() < 0.1:
            block_ids[rid] = [rng.randrange(1000, 2000) for _ in range(compactions[rid])]
    plan = StepPlan({}, {}, compactions, np.array([1, 2]), np.array([3, 4]), block_ids)
    return requests, index, table, plan


@pytest.mark.parametrize("seed", range(40))
def test_v1_compaction_equals_per_request_loop(seed):
    rng = random.Random(seed)
    requests, index, table, plan = _random_case(rng)
    runners = []
    for _ in range(2):
        r = object.__new__(_V1)
        t = copy.deepcopy(table)
        r.input_batch = SimpleNamespace(block_table=_Tables(t), req_id_to_index=dict(index))
        r.requests = copy.deepcopy(requests)
        r.moved = []
        runners.append(r)
    runners[0]._sepllm_compact(plan)
    _old_v1(runners[1], plan)
    a, b = runners
    assert {k: v.block_ids[0] for k, v in a.requests.items()} == \
        {k: v.block_ids[0] for k, v in b.requests.items()}
    ta, tb = a.input_batch.block_table[0], b.input_batch.block_table[0]
    assert ta.num_blocks_per_row.tolist() == tb.num_blocks_per_row.tolist()
    assert ta.rows == tb.rows
    assert a.moved == b.moved == [plan]


class _V2Tables:
    """V2 ``BlockTables``: host row lengths and the staged overwrites."""

    def __init__(self, max_reqs: int, per_block: int) -> None:
        self.num_blocks = SimpleNamespace(np=np.zeros((1, max_reqs), dtype=np.int32))
        self.blocks_per_kv_block = [per_block]
        self.writes: list[tuple[int, list[int]]] = []

    def append_block_ids(self, idx: int, ids: tuple[list[int], ...], overwrite: bool) -> None:
        assert overwrite
        self.writes.append((idx, list(ids[0])))
        self.num_blocks.np[0, idx] = len(ids[0]) * self.blocks_per_kv_block[0]


class _V2(SepLLMV2RunnerMixin):
    def _sepllm_move_kv(self, plan: StepPlan) -> None:
        self.moved.append(plan)


def _old_v2(runner, plan: StepPlan) -> None:
    """``_sepllm_compact_v2`` before it was batched (commit e4a4c89)."""
    tables = runner.block_tables
    num_blocks = tables.num_blocks.np
    per_block = tables.blocks_per_kv_block[0]
    index_of = runner.req_states.req_id_to_index
    stats = runner.sepllm_v2_stats
    for req_id, kept in plan.compactions.items():
        idx = index_of.get(req_id)
        if idx is None:
            continue
        new_ids = plan.block_ids.get(req_id)
        if new_ids is not None:
            tables.append_block_ids(idx, (new_ids,), overwrite=True)
            stats["copy_outs"] += 1
        else:
            num_blocks[0, idx] = min(int(num_blocks[0, idx]), kept * per_block)
    stats["compaction_steps"] += 1
    stats["moved_slots"] += len(plan.src)
    runner._sepllm_move_kv(plan)


@pytest.mark.parametrize("seed", range(40))
def test_v2_compaction_equals_per_request_loop(seed):
    rng = random.Random(seed)
    requests, index, _, plan = _random_case(rng)
    per_block = rng.choice([1, 2])
    runners = []
    for _ in range(2):
        r = object.__new__(_V2)
        r.block_tables = t = _V2Tables(64, per_block)
        for rid, row in index.items():
            t.num_blocks.np[0, row] = len(requests[rid].block_ids[0]) * per_block
        r.req_states = SimpleNamespace(req_id_to_index=dict(index))
        r.sepllm_v2_stats = dict.fromkeys(("copy_outs", "compaction_steps", "moved_slots"), 0)
        r.moved = []
        runners.append(r)
    runners[0]._sepllm_compact_v2(plan)
    _old_v2(runners[1], plan)
    a, b = runners
    assert a.block_tables.num_blocks.np.tolist() == b.block_tables.num_blocks.np.tolist()
    assert sorted(a.block_tables.writes) == sorted(b.block_tables.writes)
    assert a.sepllm_v2_stats == b.sepllm_v2_stats
    assert a.moved == b.moved == [plan]


def test_row_dropped_equals_per_row_lookup():
    """``D`` per batch row (V1 ``_prepare_inputs``, V2 ``prepare_inputs``): one C-level map
    of dictionary look-ups = the per-row list it replaced."""
    rng = random.Random(0)
    dropped = {f"q{i}": rng.randrange(0, 500) for i in range(300)}
    req_ids = [f"q{rng.randrange(0, 400)}" for _ in range(256)]
    got = np.fromiter(map(dropped.get, req_ids, repeat(0)), dtype=np.int32,
                      count=len(req_ids))
    assert got.tolist() == [dropped.get(r, 0) for r in req_ids]
