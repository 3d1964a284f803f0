"""SepLLM on vLLM 0.26's V2 GPU model runner (``vllm.v1.worker.gpu.model_runner``).

The same mechanism as the V1 runner's (:class:`vllm_sepllm.worker.SepLLMRunnerMixin`), through
the V2 runner's own steps. Its ``execute_model`` runs, per step (0.26.0, model_runner.py)::

    finish_requests -> free_states -> add_requests -> update_requests
    -> block_tables.apply_staged_writes -> dispatch_cg_and_sync_dp (cudagraph_manager.dispatch)
    -> prepare_inputs -> prepare_attn -> model_state.prepare_attn (attention metadata)
    -> forward (FULL graph replay, PIECEWISE or eager)
    ... sample_tokens (the sampler reads input_batch.seq_lens)

and :class:`SepLLMV2RunnerMixin` hooks in as follows:

1. ``finish_requests``: a finished request's ``D`` and retention are dropped.
2. ``update_requests``: *before* vLLM appends this step's new block ids, every compacted
   request's row of the block table is cut to the blocks the scheduler kept
   (``BlockTables.num_blocks``), or rewritten with the plan's new list after a copy-out
   (``append_block_ids(..., overwrite=True)``, staged like vLLM's own writes); the step's KV moves
   run (shared with V1: ``SepLLMRunnerBase._sepllm_move_kv``); the plan's ``D``, retention and
   ``masked_single`` are taken.
3. ``cudagraph_manager.dispatch`` (wrapped on the instance): a step with ``masked_single`` rows is
   dispatched as non-uniform, so it never replays a FULL decode graph (whose attention is the
   plain decode); it runs PIECEWISE, or eager without piecewise graphs.
4. ``prepare_inputs``: after vLLM computed positions, ``seq_lens``, input ids and logits indices
   (all logical), the cache lengths replace ``seq_lens`` for the attention: ``D`` per batch row is
   subtracted from vLLM's ``seq_lens`` buffer (the one the captured FULL graphs read) and from
   the CPU ``seq_lens_cpu_upper_bound`` (which gives ``max_seq_len`` and the cache lengths the
   SepLLM builder reads). The batch's request ids (V2's batch order: decodes first) are the
   builder's ``row_req_ids``.
5. ``prepare_attn``: the slot mapping is vLLM's, computed from the cache positions
   ``position - D`` instead of the positions (which stay logical: RoPE and the masks); then the
   logical position and separator flag of every written slot are recorded (``slot_records``).
6. ``execute_model``: once the forward is enqueued, ``D`` is added back to ``seq_lens``: V2's
   sampler reads ``input_batch.seq_lens`` (``seq_len < prefill_len`` marks a prompt chunk that
   samples nothing), so it must see the logical lengths again. Same CUDA stream throughout, so
   the order on the device is: forward (cache lengths), restore, sampler (logical lengths).

Not on V2: PE shift (``sepllm.pe_shift``; refused at start-up, use the V1 runner), decode or
prefill context parallelism, ``VLLM_USE_BREAKABLE_CUDAGRAPH=1`` (its PIECEWISE steps pad the
batch rows, which the masked builder does not expect). Pinned to vLLM 0.26.0's V2 runner
(:data:`V2_VLLM_VERSIONS`).

Host work per step: one C-level pass of dictionary look-ups over the batch rows for ``D`` (as
V1), one vectorised cut of the compacted rows' block counts, and only when some row has
``D > 0``: one ``numpy.repeat`` over the step's tokens, one host-to-device copy (a fresh
pinned buffer: safe while the previous step still runs under async scheduling) and three small
device ops.
"""

from __future__ import annotations

import dataclasses
from itertools import repeat

import numpy as np
import torch

from vllm_sepllm.scheduler import PLAN_ATTR, StepPlan
from vllm_sepllm.worker import SepLLMRunnerBase

#: vLLM releases whose V2 runner these hooks were written against (its method names, the
#: order of ``execute_model`` and the buffers they touch are internal and change between
#: releases).
V2_VLLM_VERSIONS = ("0.26.0",)


def v2_hooks_support(vllm_version: str | None = None) -> bool:
    """Whether :class:`SepLLMV2RunnerMixin` was written for this vLLM (default: the installed
    one)."""
    if vllm_version is None:
        import vllm

        vllm_version = getattr(vllm, "__version__", "")
    return vllm_version.split("+", 1)[0] in V2_VLLM_VERSIONS


def v2_unsupported_reason(vllm_config) -> str | None:
    """Why SEPLLM cannot run on vLLM's V2 model runner with ``vllm_config`` (one line), or None.

    For ``patches.py`` (``VllmConfig.use_v2_model_runner``: fall back to V1, or refuse when the
    user asked for V2) and checked again when the runner starts. Reads the engine's SepLLM
    settings as given (an invalid section is reported later, by ``configure_engine``)."""
    import vllm.envs as envs
    from vllm.platforms import current_platform

    if not v2_hooks_support():
        import vllm

        return (f"its V2 runner hooks are written for vLLM {', '.join(V2_VLLM_VERSIONS)}, "
                f"not {vllm.__version__}")
    if not current_platform.is_cuda():
        return "its V2 runner hooks run on CUDA only"
    try:
        from vllm_sepllm.patches import engine_sepllm_config

        if engine_sepllm_config(vllm_config).pe_shift:
            return "sepllm.pe_shift=true runs on the V1 model runner only"
    except Exception:  # noqa: BLE001 - an invalid section: configure_engine names the error
        pass
    parallel = vllm_config.parallel_config
    if getattr(parallel, "decode_context_parallel_size", 1) > 1:
        return "decode context parallelism is not supported"
    if getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        return "prefill context parallelism is not supported"
    if envs.VLLM_USE_BREAKABLE_CUDAGRAPH:
        return "VLLM_USE_BREAKABLE_CUDAGRAPH=1 is not supported"
    return None


class _DummyRows:
    """``row_req_ids`` of a dummy run: every row is a request without a SepLLM record (full
    visibility). V2's dummy runs build attention metadata (unlike V1's), e.g. the compile
    warm-up of a size outside the capture sizes, whose rows hold several tokens each and so
    reach the builder's masked path, which asks each prefill row for its retention."""

    def __getitem__(self, row: int) -> str:
        return ""  # no request id is empty: no retention record


_DUMMY_ROWS = _DummyRows()


class SepLLMV2RunnerMixin(SepLLMRunnerBase):
    """Mixed into vLLM 0.26's V2 ``GPUModelRunner`` (see ``worker.extend_runner``)."""

    # ------------------------------------------------------------------ set-up
    def _sepllm_init(self) -> None:
        super()._sepllm_init()
        reason = v2_unsupported_reason(self.vllm_config)
        if reason is not None:
            from vllm_sepllm.config import SepLLMConfigError

            raise SepLLMConfigError(f"SEPLLM on vLLM's V2 model runner: {reason}; "
                                    "set VLLM_USE_V2_MODEL_RUNNER=0")
        # (batch, cache positions) from prepare_inputs for prepare_attn; (seq_lens view, D)
        # to add back once the forward is enqueued.
        self._sepllm_pending: tuple[object, torch.Tensor] | None = None
        self._sepllm_restore: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sepllm_real_step = False
        #: Counters of real steps (tests and benchmarks/v2_check.py read them): steps,
        #: steps whose batch had a row with D > 0, steps with compactions, KV slots moved,
        #: copy-outs, steps with masked one-token rows, and CUDA-graph mode per step.
        self.sepllm_v2_stats: dict[str, int] = dict.fromkeys(
            ("steps", "shifted_steps", "compaction_steps", "moved_slots", "copy_outs",
             "masked_single_steps", "cg_FULL", "cg_PIECEWISE", "cg_NONE"), 0)

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        if getattr(self, "pcp_manager", None) is not None:
            from vllm_sepllm.config import SepLLMConfigError

            raise SepLLMConfigError("SEPLLM does not support prefill context parallelism")
        self._sepllm_wrap_dispatch()

    def _sepllm_wrap_dispatch(self) -> None:
        """Wrap ``cudagraph_manager.dispatch`` (created by ``initialize_kv_cache``) on the
        instance: with ``masked_single`` rows the step is not a uniform decode (V1's
        ``_is_uniform_decode`` override), so no FULL decode graph is picked for it."""
        mgr = self.cudagraph_manager
        if mgr is None or getattr(mgr, "_sepllm_dispatch", False):
            return
        original = mgr.dispatch
        state = self.sepllm
        stats = self.sepllm_v2_stats

        def dispatch(num_reqs, num_tokens, uniform_token_count, *args, **kwargs):
            if state.masked_single:
                uniform_token_count = None
            desc = original(num_reqs, num_tokens, uniform_token_count, *args, **kwargs)
            if self._sepllm_real_step:
                key = "cg_" + desc.cg_mode.name
                stats[key] = stats.get(key, 0) + 1
            return desc

        mgr.dispatch = dispatch
        mgr._sepllm_dispatch = True

    # ------------------------------------------------------------------ request states
    def finish_requests(self, scheduler_output) -> None:
        state = self.sepllm
        for req_id in scheduler_output.finished_req_ids:
            state.dropped.pop(req_id, None)
            state.retention.pop(req_id, None)
        super().finish_requests(scheduler_output)

    def update_requests(self, scheduler_output) -> None:
        # Runs after add_requests and before vLLM appends the new block ids of the running
        # requests (super) and applies the staged block-table writes (execute_model).
        plan: StepPlan | None = getattr(scheduler_output, PLAN_ATTR, None)
        state = self.sepllm
        state.masked_single = frozenset(plan.masked_single) if plan is not None else frozenset()
        if plan is not None:
            if plan.compactions:
                self._sepllm_compact_v2(plan)
            state.dropped.update(plan.dropped)
            state.retention.update(plan.retention)
        super().update_requests(scheduler_output)

    def _sepllm_compact_v2(self, plan: StepPlan) -> None:
        """Cut (or, after a copy-out, rewrite) the block-table rows of the compacted requests,
        then move their KV."""
        tables = self.block_tables
        num_blocks = tables.num_blocks.np  # [groups, max_num_reqs], host side of the row lengths
        per_block = tables.blocks_per_kv_block[0]  # kernel blocks per KV block (1 for SEPLLM)
        index_of = self.req_states.req_id_to_index
        stats = self.sepllm_v2_stats
        comp = plan.compactions
        idx = np.fromiter(map(index_of.get, comp, repeat(-1)), dtype=np.int64,
                          count=len(comp))
        kept = np.fromiter(comp.values(), dtype=np.int64, count=len(comp)) * per_block
        for req_id, new_ids in plan.block_ids.items():  # copied out: a new block list
            i = index_of.get(req_id)
            if i is not None:
                tables.append_block_ids(i, (new_ids,), overwrite=True)
                stats["copy_outs"] += 1
        cut = idx >= 0
        if plan.block_ids:
            cut &= np.fromiter((r not in plan.block_ids for r in comp), dtype=bool,
                               count=len(comp))
        rows = idx[cut]
        num_blocks[0, rows] = np.minimum(num_blocks[0, rows], kept[cut])
        stats["compaction_steps"] += 1
        stats["moved_slots"] += len(plan.src)
        self._sepllm_move_kv(plan)

    # ------------------------------------------------------------------ inputs
    def prepare_inputs(self, scheduler_output, batch_desc):
        input_batch = super().prepare_inputs(scheduler_output, batch_desc)
        state = self.sepllm
        self._sepllm_pending = None
        req_ids = input_batch.req_ids
        num_reqs = input_batch.num_reqs
        state.row_req_ids = req_ids  # rows of CommonAttentionMetadata: the batch order
        stats = self.sepllm_v2_stats
        stats["steps"] += 1
        if state.masked_single:
            stats["masked_single_steps"] += 1
        dropped = state.dropped
        if not dropped:
            return input_batch
        row_d = np.fromiter(map(dropped.get, req_ids, repeat(0)), dtype=np.int32,
                            count=num_reqs)
        if not row_d.any():
            return input_batch
        stats["shifted_steps"] += 1
        num_tokens = input_batch.num_tokens
        # One host-to-device copy: D per row, then D per token (rows' tokens are contiguous).
        host = np.empty(num_reqs + num_tokens, dtype=np.int32)
        host[:num_reqs] = row_d
        host[num_reqs:] = np.repeat(row_d, input_batch.num_scheduled_tokens)
        from vllm.v1.worker.gpu.buffer_utils import async_copy_to_gpu

        dev = async_copy_to_gpu(host, device=self.device)
        row_dev, token_dev = dev[:num_reqs], dev[num_reqs:]
        # Cache lengths for the attention (vLLM's persistent seq_lens buffer: FULL graphs read
        # it); logits indices and input ids were already computed from the logical lengths.
        seq_lens = input_batch.seq_lens[:num_reqs]
        seq_lens -= row_dev
        self._sepllm_restore = (seq_lens, row_dev)
        # CPU copy (this step's own array): max_seq_len and the builder's cache lengths.
        input_batch.seq_lens_cpu_upper_bound[:num_reqs] -= torch.from_numpy(row_d)
        # Cache index of each new token: position - D (positions stay logical).
        cache_pos = input_batch.positions[:num_tokens] - token_dev
        self._sepllm_pending = (input_batch, cache_pos)
        return input_batch

    def prepare_attn(self, input_batch):
        pending, self._sepllm_pending = self._sepllm_pending, None
        if pending is not None and pending[0] is input_batch:
            # vLLM's slot mapping (block table rows, padding) over the cache positions.
            block_tables, slot_mappings = super().prepare_attn(
                dataclasses.replace(input_batch, positions=pending[1]))
        else:
            block_tables, slot_mappings = super().prepare_attn(input_batch)
        state = self.sepllm
        if state.slot_records:  # what each written slot holds: the masks need it
            n = input_batch.num_tokens
            slots = slot_mappings[0, :n]
            state.slot_pos[slots] = input_batch.positions[:n].to(torch.int32)
            state.slot_sep[slots] = state.sep_table[input_batch.input_ids[:n]]
        return block_tables, slot_mappings

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def execute_model(self, scheduler_output, intermediate_tensors=None, dummy_run: bool = False,
                      *args, **kwargs):
        if dummy_run:  # profiling, warm-up, DP padding: no plan, no request, no record
            state = self.sepllm
            state.masked_single = frozenset()
            state.row_req_ids = _DUMMY_ROWS
        self._sepllm_real_step = not dummy_run
        try:
            return super().execute_model(scheduler_output, intermediate_tensors, dummy_run,
                                          *args, **kwargs)
        finally:
            self._sepllm_real_step = False
            restore, self._sepllm_restore = self._sepllm_restore, None
            if restore is not None:  # after the forward, before the sampler (same stream)
                seq_lens, row_d = restore
                seq_lens += row_d
