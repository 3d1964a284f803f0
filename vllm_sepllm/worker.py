"""Worker side: apply each step's compactions to the real KV tensors and decouple cache
indices from RoPE positions.

The workers are vLLM's (CPU or GPU) with the V1 model runner extended by
:class:`SepLLMRunnerMixin`:

1. ``_update_states``: *before* vLLM appends this step's new blocks, move the KV (and the
   per-slot metadata) of every compacted request, then truncate its block list and its row in
   the persistent block table to the blocks the scheduler kept.
2. ``_prepare_inputs``: positions stay logical (RoPE); the cache index of a new token is
   ``position - D``: slot mapping, ``seq_lens`` and ``max_seq_len`` use it. The position and
   separator flag of every written slot are recorded for the prefill mask.
3. ``get_kv_cache_spec``: attention layers report :class:`SepLLMSpec` so the engine builds the
   SepLLM block manager.

vLLM 0.26's V2 GPU model runner (``vllm.v1.worker.gpu``, the default for dense models on
CUDA) gets the same mechanism through its own hooks: ``worker_v2.SepLLMV2RunnerMixin``
(:func:`extend_runner` picks the mixin by the runner's module); both share
:class:`SepLLMRunnerBase`.
"""

from __future__ import annotations

import os
from itertools import repeat

import numpy as np
import torch

from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.utils import record_function_or_nullcontext

from vllm_sepllm import compat
from vllm_sepllm.kv_manager import SepLLMSpec
from vllm_sepllm.metrics import CompactionTimer, attach_worker_stats
from vllm_sepllm.policy import FULL_WINDOW, Retention
from vllm_sepllm.scheduler import PLAN_ATTR, StepPlan

logger = init_logger("vllm." + __name__)


class SepLLMWorkerState:
    """Per-process SepLLM state the runner keeps and the attention backend reads.

    Attributes:
        slot_pos: [num_slots] int32, logical position of the token in each KV slot.
        slot_sep: [num_slots] bool, whether that token is a separator.
        slot_records: whether new tokens' ``slot_pos``/``slot_sep`` are written: the masks
            and PE shift read them; with batched eviction on FlashAttention nothing does
            (every step is the backend's plain path), so that hot path skips them.
        sep_table: [vocab] bool, separator lookup by token id.
        row_dropped_cpu: [max_num_reqs] int32, ``D`` of each persistent-batch row this step.
        row_req_ids: request id of each row this step (:meth:`row_retention`).
        masked_single: requests whose one token this step still needs the mask (the
            scheduler's ``StepPlan.masked_single``); such a step is not a uniform decode.
    """

    current: SepLLMWorkerState | None = None

    def __init__(self, sep_ids: frozenset[int], vocab_size: int, max_num_reqs: int,
                 device: torch.device) -> None:
        self.device = device
        self.sep_table = torch.zeros(max(vocab_size, max(sep_ids, default=0) + 1),
                                     dtype=torch.bool)
        if sep_ids:
            self.sep_table[list(sep_ids)] = True
        self.sep_table = self.sep_table.to(device)
        self.slot_pos = torch.empty(0, dtype=torch.int32, device=device)
        self.slot_sep = torch.empty(0, dtype=torch.bool, device=device)
        self.slot_records = True
        self.dropped: dict[str, int] = {}
        self.retention: dict[str, Retention] = {}
        self.row_dropped_cpu = torch.zeros(max_num_reqs, dtype=torch.int32,
                                           pin_memory=device.type == "cuda")
        self.row_dropped = torch.zeros(max_num_reqs, dtype=torch.int32, device=device)
        self.row_req_ids: list[str] = []
        self.masked_single: frozenset[str] = frozenset()
        self.compaction_timer = CompactionTimer(device)
        #: Each layer's KV cache as [num_blocks, block_size, Hkv, 2D] (compat.slot_major).
        self.kv_caches: list[torch.Tensor] = []
        # PE shift (rope_shift.py): RoPE position of the key in each slot, requests whose
        # keys need re-rotation, this step's RoPE positions of the new tokens.
        self.pe_shift = False
        self.rope = None
        self.slot_rope = torch.empty(0, dtype=torch.int32, device=device)
        self.rerotate: set[str] = set()
        self.rope_positions: torch.Tensor | None = None
        self.rerotated_keys = 0
        self.rerotate_timer = CompactionTimer(device)  # re-rotation time (benchmarks/stream.py)
        # 16-bit caches: the keys as first written and their RoPE position (rope_shift.py,
        # KEEP_ORIGIN_DTYPES), and the slots written by the last step, still to be saved.
        self.key_origin: list[torch.Tensor] | None = None
        self.slot_rope0 = torch.empty(0, dtype=torch.int32, device=device)
        self.origin_pending: torch.Tensor | None = None

    def row_retention(self, row: int) -> Retention:
        """Retention of a persistent-batch row this step (the backend asks for prefill rows)."""
        return self.retention.get(self.row_req_ids[row], _NO_RETENTION)

    def allocate_slots(self, num_slots: int) -> None:
        self.slot_pos = torch.full((num_slots,), -1, dtype=torch.int32, device=self.device)
        self.slot_sep = torch.zeros(num_slots, dtype=torch.bool, device=self.device)
        if self.pe_shift:
            self.slot_rope = torch.zeros(num_slots, dtype=torch.int32, device=self.device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to ``device`` without stalling the host: pinned + non-blocking on CUDA, so
    async scheduling keeps overlapping the next step's preparation with this forward."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


#: Retention of a row without a SepLLM record (sees everything).
_NO_RETENTION = Retention(0, None, FULL_WINDOW)


class SepLLMRunnerBase:
    """What the SepLLM runners of both vLLM model runners share (V1: :class:`SepLLMRunnerMixin`,
    V2: ``worker_v2.SepLLMV2RunnerMixin``): the worker state, the KV spec, the slot arrays and
    the KV moves of a step's compactions."""

    sepllm: SepLLMWorkerState

    def _sepllm_init(self) -> None:
        from vllm_sepllm.patches import engine_sepllm_config

        cfg = engine_sepllm_config(self.vllm_config)
        self.sepllm = SepLLMWorkerState(
            frozenset(cfg.separator_token_ids or ()),
            self.model_config.get_vocab_size(),
            self.max_num_reqs,
            self.device,
        )
        self.sepllm.pe_shift = cfg.pe_shift
        from vllm_sepllm.backend import always_plain

        self.sepllm.slot_records = cfg.pe_shift or not always_plain(cfg.cache_size, self.device,
                                                                    self.vllm_config)
        SepLLMWorkerState.current = self.sepllm

    # ------------------------------------------------------------------ KV spec
    def get_kv_cache_spec(self):
        specs = super().get_kv_cache_spec()
        out = {}
        for name, spec in specs.items():
            if type(spec) is FullAttentionSpec and spec.sliding_window is None:
                spec = SepLLMSpec.from_full(spec)
            elif not isinstance(spec, SepLLMSpec):
                raise ValueError(
                    f"SEPLLM supports full-attention layers only; layer {name} has "
                    f"{type(spec).__name__}"
                )
            out[name] = spec
        return out

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        self.sepllm.kv_caches = [compat.slot_major(kv) for kv in self.kv_caches]
        block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        self.sepllm.allocate_slots(kv_cache_config.num_blocks * block_size)
        if self.sepllm.pe_shift:
            from vllm_sepllm.rope_shift import rope_params_from_model

            self.sepllm.rope = rope_params_from_model(self.get_model())
            self._sepllm_alloc_key_origin()

    def _sepllm_alloc_key_origin(self) -> None:
        from vllm_sepllm.rope_shift import KEEP_ORIGIN_DTYPES

        state = self.sepllm
        caches = state.kv_caches
        force = os.environ.get("VLLM_SEPLLM_PE_SHIFT_KEEP_ORIGIN") == "1"  # tests: fp32 too
        if not caches or (caches[0].dtype not in KEEP_ORIGIN_DTYPES and not force):
            return
        d = state.rope.head_size
        try:
            # [num_blocks, block_size, Hkv, D]: same leading dims as the cache, so that
            # move_slots (compaction) moves its rows like the cache's.
            state.key_origin = [torch.empty(*kv.shape[:3], d, dtype=kv.dtype, device=kv.device)
                                for kv in caches]
        except torch.OutOfMemoryError:
            from vllm_sepllm.config import SepLLMConfigError

            raise SepLLMConfigError(
                "sepllm.pe_shift=true with a 16-bit KV cache keeps a copy of the original keys "
                "(+50% of the KV pool), which does not fit; set kv_cache_memory_bytes or a "
                "lower gpu_memory_utilization") from None
        state.slot_rope0 = torch.zeros_like(state.slot_rope)

    def _sepllm_move_kv(self, plan: StepPlan) -> None:
        """Run the step's KV moves (all compacted requests at once) in every layer's cache and
        in the per-slot records."""
        if not len(plan.src):
            return
        # The scheduler computed the moves as physical slots (kv_manager.SepLLMManager.evict).
        moves = np.stack((np.asarray(plan.src, dtype=np.int64),
                          np.asarray(plan.dst, dtype=np.int64)))
        moves = to_device(torch.from_numpy(moves), self.device)
        src_t, dst_t = moves[0], moves[1]
        from vllm_sepllm.ops import compact_kv

        timer = self.sepllm.compaction_timer  # vllm:sepllm_compaction_seconds (metrics.py)
        timer.start()
        compact_kv(self.sepllm.kv_caches, self.sepllm.slot_pos, self.sepllm.slot_sep, src_t, dst_t)
        if self.sepllm.pe_shift:  # the RoPE record moves with its key
            from vllm_sepllm.reference import move_slots

            state = self.sepllm
            move_slots([state.slot_rope, *((state.slot_rope0, *state.key_origin)
                                           if state.key_origin is not None else ())],
                       src_t, dst_t)
        timer.stop()


class SepLLMRunnerMixin(SepLLMRunnerBase):
    """Mixed into vLLM's V1 ``GPUModelRunner`` / ``CPUModelRunner`` (see :func:`extend_runner`)."""

    # ------------------------------------------------------------------ step hooks
    def _update_states(self, scheduler_output):
        plan: StepPlan | None = getattr(scheduler_output, PLAN_ATTR, None)
        state = self.sepllm
        for req_id in scheduler_output.finished_req_ids:
            state.dropped.pop(req_id, None)
            state.retention.pop(req_id, None)
            state.rerotate.discard(req_id)
        if state.origin_pending is not None:  # last step's keys, before anything moves them
            self._sepllm_save_origin()
        state.masked_single = frozenset(plan.masked_single) if plan is not None else frozenset()
        if plan is not None:
            if plan.compactions:
                with record_function_or_nullcontext("sepllm: compact"):
                    self._sepllm_compact(plan)
                if state.pe_shift:
                    state.rerotate.update(plan.compactions)
            state.dropped.update(plan.dropped)
            state.retention.update(plan.retention)
        return super()._update_states(scheduler_output)

    def _sepllm_compact(self, plan: StepPlan) -> None:
        """Move the KV of compacted requests and truncate their block lists.

        Batched: for requests in the persistent batch, whose block-table row length equals
        their block list's length, one vectorised comparison finds the lists that get shorter
        (with exact eviction every request is compacted every step, few lose a block); only
        those, copy-outs and requests outside the batch are walked."""
        table = self.input_batch.block_table[0]
        index_of = self.input_batch.req_id_to_index
        comp = plan.compactions
        ids = list(comp)
        kept = np.fromiter(comp.values(), dtype=np.int64, count=len(ids))
        rows = np.fromiter(map(index_of.get, ids, repeat(-1)), dtype=np.int64, count=len(ids))
        in_batch = rows >= 0
        held = table.num_blocks_per_row[np.where(in_batch, rows, 0)]
        walk = np.flatnonzero(~in_batch | (kept < held)).tolist()
        for req_id in dict.fromkeys((*(ids[i] for i in walk), *plan.block_ids)):
            req_state = self.requests.get(req_id)
            if req_state is None:
                continue
            blocks = req_state.block_ids[0]
            num_blocks = comp.get(req_id, len(blocks))
            new_ids = plan.block_ids.get(req_id)
            if new_ids is not None:  # copied out of shared blocks: a new block list
                blocks[:] = new_ids
                row = index_of.get(req_id)
                if row is not None:
                    table.add_row(new_ids, row)
            elif num_blocks < len(blocks):
                del blocks[num_blocks:]
                row = index_of.get(req_id)
                if row is not None:
                    table.num_blocks_per_row[row] = min(table.num_blocks_per_row[row],
                                                        num_blocks)
        self._sepllm_move_kv(plan)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        with record_function_or_nullcontext("sepllm: prepare_inputs"):
            self._sepllm_inputs(scheduler_output)
        return out

    def _sepllm_inputs(self, scheduler_output) -> None:
        """After vLLM's ``_prepare_inputs``: ``D`` per batch row, cache positions, ``seq_lens``,
        slot mapping and slot records over the compacted cache."""
        state = self.sepllm
        num_reqs = self.input_batch.num_reqs
        total = scheduler_output.total_num_scheduled_tokens
        req_ids = self.input_batch.req_ids
        dropped = state.row_dropped_cpu
        dropped.numpy()[:num_reqs] = np.fromiter(
            map(state.dropped.get, req_ids[:num_reqs], repeat(0)), dtype=np.int32,
            count=num_reqs)
        state.row_req_ids = req_ids
        state.row_dropped[:num_reqs].copy_(dropped[:num_reqs], non_blocking=True)
        row_dropped = state.row_dropped[:num_reqs]

        # Cache index = logical position - D; positions themselves stay logical (RoPE).
        req_indices = self.req_indices.gpu[:total]
        positions = self.positions[:total]
        cache_pos = positions - row_dropped[req_indices].to(positions.dtype)
        self.seq_lens[:num_reqs] -= row_dropped
        self.optimistic_seq_lens_cpu[:num_reqs] -= dropped[:num_reqs]
        self.input_batch.block_table.compute_slot_mapping(
            num_reqs, self.query_start_loc.gpu[: num_reqs + 1], cache_pos
        )
        slots = self.input_batch.block_table[0].slot_mapping.gpu[:total]
        if state.slot_records:  # what each written slot holds: the masks need it
            state.slot_pos[slots] = positions.to(torch.int32)
            state.slot_sep[slots] = state.sep_table[self.input_ids.gpu[:total]]
        if state.pe_shift:
            # A new token's RoPE position is its cache index (= its rank, see rope_shift.py);
            # it replaces the logical position once the attention metadata is built.
            state.slot_rope[slots] = cache_pos.to(torch.int32)
            state.rope_positions = cache_pos
            if state.key_origin is not None:
                state.slot_rope0[slots] = cache_pos.to(torch.int32)
                state.origin_pending = slots.clone()
            if state.rerotate:
                self._sepllm_rerotate(req_ids[:num_reqs], dropped.numpy()[:num_reqs])

    def _sepllm_rerotate(self, req_ids: list[str], dropped) -> None:
        """PE shift: give every retained key of the requests compacted since their last step
        its new rank as RoPE position (re-rotate by new rank - old rank; see rope_shift.py).
        Runs before this step's attention; touches cache indices below the new tokens only."""
        from vllm_sepllm.reference import cache_slots
        from vllm_sepllm.rope_shift import ranks_by_position, shift_keys

        state = self.sepllm
        table = self.input_batch.block_table[0].get_device_tensor(len(req_ids))
        computed = self.input_batch.num_computed_tokens_cpu
        all_slots, all_delta = [], []
        for row, req_id in enumerate(req_ids):
            if req_id not in state.rerotate:
                continue
            state.rerotate.discard(req_id)
            length = int(computed[row]) - int(dropped[row])  # cached before this step
            if length <= 0:
                continue
            slots = cache_slots(table[row], length, self.cache_config.block_size)
            ranks = ranks_by_position(state.slot_pos[slots])
            all_slots.append(slots)
            base = state.slot_rope if state.key_origin is None else state.slot_rope0
            all_delta.append(ranks - base[slots])
            state.slot_rope[slots] = ranks.to(torch.int32)
        if all_slots:
            slots, delta = torch.cat(all_slots), torch.cat(all_delta)
            state.rerotate_timer.start()
            shift_keys(state.kv_caches, slots, delta, state.rope, state.key_origin)
            state.rerotate_timer.stop()
            state.rerotated_keys += slots.numel()

    def _sepllm_save_origin(self) -> None:
        """Copy the keys the last step wrote (at RoPE position ``slot_rope0``) to
        ``key_origin``; runs before compaction or new writes can touch those slots."""
        state = self.sepllm
        slots, state.origin_pending = state.origin_pending, None
        d = state.rope.head_size
        state.rerotate_timer.start()
        for kv, origin in zip(state.kv_caches, state.key_origin):
            origin.view(-1, *origin.shape[2:])[slots] = kv.view(-1, *kv.shape[2:])[slots, :, :d]
        state.rerotate_timer.stop()

    def _is_uniform_decode(self, *args, force_uniform_decode: bool | None = None, **kwargs):
        # A one-token row that needs the mask cannot replay a full CUDA graph (whose
        # attention is the plain decode): such a step runs piecewise.
        if force_uniform_decode is None and self.sepllm.masked_single:
            return False
        return super()._is_uniform_decode(*args, force_uniform_decode=force_uniform_decode,
                                          **kwargs)

    def _preprocess(self, scheduler_output, *args, **kwargs):
        # PE shift: the model gets RoPE positions relative to the cache. They go into vLLM's
        # own positions buffer (the one CUDA graphs captured) only now, after the attention
        # metadata (whose prefill masks need logical positions) was built from it.
        state = self.sepllm
        if state.pe_shift and state.rope_positions is not None:
            n = state.rope_positions.shape[0]
            self.positions[:n] = state.rope_positions
            state.rope_positions = None
        return super()._preprocess(scheduler_output, *args, **kwargs)


def extend_runner(runner) -> None:
    """Turn a model runner instance into its SepLLM subclass (after construction): vLLM's V1
    runners get :class:`SepLLMRunnerMixin`, its V2 runner (``vllm.v1.worker.gpu``, or a
    subclass of it) ``worker_v2.SepLLMV2RunnerMixin``."""
    base = type(runner)
    if isinstance(runner, SepLLMRunnerBase):
        return
    if any(c.__module__.startswith("vllm.v1.worker.gpu.") for c in base.__mro__):
        from vllm_sepllm.worker_v2 import SepLLMV2RunnerMixin

        runner.__class__ = type(f"SepLLMV2{base.__name__}", (SepLLMV2RunnerMixin, base), {})
    else:
        runner.__class__ = type(f"SepLLM{base.__name__}", (SepLLMRunnerMixin, base), {})
    runner._sepllm_init()


def _make_worker(base):
    class SepLLMWorker(base):
        """vLLM worker whose model runner carries the SepLLM mechanism."""

        def init_device(self):
            from vllm_sepllm.patches import install

            install()  # idempotent; the plugin entry point normally ran it already
            super().init_device()
            extend_runner(self.model_runner)

        # The step's compaction time rides to the scheduler on the model output (metrics.py).
        def execute_model(self, scheduler_output):
            return attach_worker_stats(super().execute_model(scheduler_output),
                                       self.model_runner.sepllm.compaction_timer)

        def sample_tokens(self, grammar_output):
            return attach_worker_stats(super().sample_tokens(grammar_output),
                                       self.model_runner.sepllm.compaction_timer)

    SepLLMWorker.__name__ = SepLLMWorker.__qualname__ = f"SepLLM{base.__name__}"
    return SepLLMWorker


def _cpu_worker():
    from vllm.v1.worker.cpu_worker import CPUWorker

    return _make_worker(CPUWorker)


def _gpu_worker():
    from vllm.v1.worker.gpu_worker import Worker

    return _make_worker(Worker)


def __getattr__(name: str):
    # Worker classes are created on first access so that importing this module on a CPU
    # machine does not import the GPU worker and vice versa.
    if name == "SepLLMCPUWorker":
        cls = _cpu_worker()
    elif name == "SepLLMGPUWorker":
        cls = _gpu_worker()
    else:
        raise AttributeError(name)
    globals()[name] = cls
    return cls
