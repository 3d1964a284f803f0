"""Scheduler side: decide evictions each step and tell the workers what moved.

``SepLLMScheduler`` (and its async twin) wraps vLLM's scheduler. Before vLLM schedules a step,
every running request evicts what its next query cannot see (:meth:`SepLLMManager.evict`),
which compacts its cache and frees blocks *before* vLLM allocates new ones. The step's
:class:`StepPlan` rides on the ``SchedulerOutput`` to the workers, which move the KV of
compacted requests and write new tokens at cache index ``position - D``.

With prefix caching on (vLLM's default), a request evicts only once its prompt is computed
(up to its last token): until then its cache is laid out by position, each full prompt block
is registered in vLLM's prefix cache and prompt chunks attend the whole prompt under the
request's rule (the SepLLM mask in exact mode, plain causal attention with ``cache_size``), so
a prompt block's KV depends only on the tokens before it and the request's KV settings, which
the block hashes carry (patches.py, item 5). The first eviction then copies the retained
tokens out of the shared blocks (kv_manager.py). With prefix caching off, eviction runs from
the first prompt chunk on (bounded memory for prompts longer than the pool allows).
"""

from __future__ import annotations

import dataclasses
import operator
import time
from itertools import compress

import numpy as np

from vllm.logger import init_logger
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.request import Request
from vllm.v1.utils import record_function_or_nullcontext

from vllm_sepllm import compat
from vllm_sepllm.config import SepLLMConfig
from vllm_sepllm.instrument import TrackingAsyncScheduler, TrackingScheduler
from vllm_sepllm.kv_manager import SepLLMManager, fast_allocate_slots
from vllm_sepllm.metrics import SepLLMSchedulerStats, SepLLMStepStats, worker_stats_of
from vllm_sepllm.policy import Retention

logger = init_logger("vllm." + __name__)

#: Attribute of ``SchedulerOutput`` that carries the plan to the workers.
PLAN_ATTR = "sepllm_plan"

# Per-request fields read for all running requests at once (C-level map, no Python loop).
_NUM_COMPUTED = operator.attrgetter("num_computed_tokens")
_NUM_PROMPT = operator.attrgetter("num_prompt_tokens")
_REQUEST_ID = operator.attrgetter("request_id")
_TOKEN_IDS = operator.attrgetter("all_token_ids")
# The plain list behind all_token_ids (a ConstantList, whose item access is a Python call):
# the batched eviction reads one id per request per step (scripts/check_vllm_internals.py).
_RAW_TOKEN_IDS = operator.attrgetter("_all_token_ids")
_MULTI = (1).__lt__  # q > 1: a row with more than one token this step


class _TokenLists:
    """The token-id lists of ``reqs``, read only where the eviction needs them (the rows that
    classify positions this step: with ``cache_size`` a few per step)."""

    __slots__ = ("reqs", "get")

    def __init__(self, reqs: list[Request]) -> None:
        self.reqs = reqs
        self.get = _RAW_TOKEN_IDS if hasattr(reqs[0], "_all_token_ids") else _TOKEN_IDS

    def __len__(self) -> int:
        return len(self.reqs)

    def pick(self, idx: np.ndarray) -> list:
        reqs = self.reqs
        if idx.size == len(reqs):
            return list(map(self.get, reqs))
        if idx.size == 1:
            return [self.get(reqs[int(idx[0])])]
        return list(map(self.get, operator.itemgetter(*idx.tolist())(reqs))) if idx.size else []


@dataclasses.dataclass
class StepPlan:
    """What the workers must know about SepLLM for one step.

    ``dropped``: tokens dropped so far ``D`` (new tokens go to cache index ``position - D``)
    of the scheduled requests whose ``D`` changed this step or that start (again) from an
    empty cache; the workers keep the last value of the others. ``retention``: what the
    attention mask keeps, for the requests with more than one token this step (decode rows
    need no mask; none at all with ``cache_size``). ``compactions``: the requests compacted
    this step and how many blocks each keeps. ``src``/``dst``: the KV moves of all of them,
    as physical slots, to run at once (int64 numpy arrays, or lists). ``block_ids``: the new
    block list of each request whose cache was copied out of shared blocks this step
    (kv_manager.py). ``masked_single``: requests with one token this step that still need
    the mask (a one-token prompt chunk before the prompt's eviction, exact mode with prefix
    caching).
    """

    dropped: dict[str, int]
    retention: dict[str, Retention]
    compactions: dict[str, int]
    src: np.ndarray | list[int]
    dst: np.ndarray | list[int]
    block_ids: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    masked_single: list[str] = dataclasses.field(default_factory=list)


class _SepLLMSchedulerMixin:
    """Mixed into vLLM's Scheduler / AsyncScheduler (see the two classes below)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from vllm_sepllm.patches import engine_sepllm_config

        self.sepllm_config: SepLLMConfig = engine_sepllm_config(self.vllm_config)
        self.sepllm_sep_ids = frozenset(self.sepllm_config.separator_token_ids or ())
        managers = self.kv_cache_manager.coordinator.single_type_managers
        if len(managers) != 1 or not isinstance(managers[0], SepLLMManager):
            raise RuntimeError(
                "SEPLLM needs exactly one KV-cache group of SepLLMSpec layers; got "
                f"{[type(m).__name__ for m in managers]}"
            )
        self.sepllm_manager: SepLLMManager = managers[0]
        # vLLM's allocate_slots, answered at once for a running request's plain decode step
        # (kv_manager.fast_allocate_slots; an instance attribute of this engine's manager).
        kvm = self.kv_cache_manager
        kvm.allocate_slots = fast_allocate_slots(kvm, self.sepllm_manager)
        # Batched eviction (policy.py): evict only past c tokens; no row needs a mask.
        self.sepllm_manager.cache_size = self.sepllm_config.cache_size
        # Prefix caching: prompts are held whole until computed (module docstring).
        self.sepllm_defer = self.kv_cache_manager.enable_caching
        cap = self.sepllm_config.max_cache_tokens
        if cap is not None and not self.sepllm_defer:
            self.sepllm_manager.admission_token_cap = cap + self.max_num_scheduled_tokens
        # Counter increments since the last make_stats (vllm:sepllm_*, metrics.py); per
        # request, the blocks freed by compaction and the compactions are counted by the
        # manager (take_counts), reported at finish.
        self.sepllm_stats = SepLLMStepStats()
        self._sepllm_retention: dict[str, Retention] = {}
        # Last step's evicted requests, their ids and table rows (reused while unchanged).
        self._sepllm_batch: tuple | None = None

    # ------------------------------------------------------------------ per request
    def _retention_of(self, request: Request) -> Retention:
        r = self._sepllm_retention.get(request.request_id)
        if r is None:
            from vllm_sepllm.patches import validate_request

            extra = request.sampling_params.extra_args if request.sampling_params else None
            try:
                cfg = validate_request(self.vllm_config, extra, self.sepllm_config)
            except ValueError as e:
                # The front end refuses bad settings (the same validate_request); if one gets
                # here anyway (a client of the engine core itself), serve the request with the
                # engine's settings rather than fail the whole engine.
                logger.error("sepllm: request %s: %s; using the engine settings",
                             request.request_id, e)
                cfg = self.sepllm_config
            r = self._sepllm_retention[request.request_id] = cfg.retention
        return r

    # ------------------------------------------------------------------ the step
    def update_from_output(self, scheduler_output, model_runner_output):
        worker = worker_stats_of(model_runner_output)  # the workers' compaction time
        if worker is not None:
            self.sepllm_stats.compaction_seconds += worker.compaction_seconds
        return super().update_from_output(scheduler_output, model_runner_output)

    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        # Runs every step for every running request: batched (at 512 running requests a
        # decode step on the H200 is host-bound, benchmarks/README.md). Per-request Python
        # only where a request's step is not a plain batched one (SepLLMManager.evict_batch).
        t0 = time.perf_counter()
        with record_function_or_nullcontext("sepllm: eviction"):
            mgr = self.sepllm_manager
            stats = self.sepllm_stats
            cache_size = mgr.cache_size
            defer = self.sepllm_defer
            # With prefix caching a prompt is evicted only once computed: with exact eviction up
            # to its last token (a last one-token chunk is then a plain decode row), with batched
            # eviction whole (the prompt is one step: plain causal attention throughout).
            prompt_tail = 1 if cache_size is None else 0
            deferred: list[Request] = []
            deferred_free: list = []
            freed_before = mgr.num_blocks_freed
            running = self.running
            ev = None
            if running:
                num = len(running)
                ns = np.fromiter(map(_NUM_COMPUTED, running), dtype=np.int64, count=num)
                take = ns > 0
                if defer:
                    prompts = np.fromiter(map(_NUM_PROMPT, running), dtype=np.int64, count=num)
                    held = take & (ns < prompts - prompt_tail)
                    if held.any():  # their blocks stay as they are (registered)
                        deferred = [running[i] for i in np.flatnonzero(held).tolist()]
                        take &= ~held
                idx = np.flatnonzero(take)
                reqs = list(running) if idx.size == num else [running[i] for i in idx.tolist()]
                if reqs:
                    # The same requests as the last step (decode steps): their ids and table rows
                    # too, unless a record joined or left the table since.
                    last = self._sepllm_batch
                    table = mgr.table
                    if (last is not None and table is not None
                            and last[3] == table.generation and last[0] == reqs):
                        rids, rows = last[1], last[2]
                    else:
                        rids = list(map(_REQUEST_ID, reqs))
                        rows = table.rows_of(rids) if table is not None else None
                    if table is not None:
                        self._sepllm_batch = (reqs, rids, rows, table.generation)
                    ev = mgr.evict_batch(
                        rids, ns[idx], _TokenLists(reqs),
                        lambda i: self._retention_of(reqs[i]), self.sepllm_sep_ids,
                        deferred_free, lambda i: self._sepllm_preempt(reqs[i]), rows)
            if deferred_free:
                mgr.block_pool.free_blocks(deferred_free)
            stats.freed_blocks += mgr.num_blocks_freed - freed_before
            if ev is not None:
                stats.evicted_tokens += int(ev.evicted.sum())
            stats.eviction_seconds += time.perf_counter() - t0

        popped_before = mgr.num_records_popped
        output = super().schedule(*args, **kwargs)

        with record_function_or_nullcontext("sepllm: plan"):
            if ev is not None and ev.rids:
                rids, kept, dropped_d = ev.rids, ev.kept, ev.dropped
                src, dst = ev.src, ev.dst
                if mgr.num_records_popped != popped_before:
                    # vLLM's schedule() preempted requests (their records and blocks are gone):
                    # drop their moves.
                    alive = np.fromiter(map(mgr.dropped.__contains__, rids), dtype=bool,
                                        count=len(rids))
                    if not alive.all():
                        for i in np.flatnonzero(~alive).tolist():
                            mgr.uncount_compaction(rids[i])
                        keep = alive[ev.owner]
                        src, dst = src[keep], dst[keep]
                        rids = list(compress(rids, alive))
                        kept, dropped_d = kept[alive], dropped_d[alive]
                compactions = dict(zip(rids, kept.tolist()))
                dropped = dict(zip(rids, dropped_d.tolist()))
            else:
                compactions, dropped = {}, {}
                src = dst = np.empty(0, dtype=np.int64)
            stats.compactions += len(compactions)
            stats.moved_tokens += len(src)

            scheduled = output.num_scheduled_tokens
            # Requests that start (again) from an empty cache: D = 0.
            fresh = scheduled.keys() - mgr.dropped.keys()
            if fresh:
                dropped.update(dict.fromkeys(fresh, 0))
            masked_single: list[str] = []
            if cache_size is None:
                retention = {rid: self._retention_of(self.requests[rid])
                             for rid in compress(scheduled, map(_MULTI, scheduled.values()))}
                if defer:
                    # One-token rows whose cache was not evicted for their position this step:
                    # deferred prompts, and requests admitted (or resumed) by this schedule(),
                    # e.g. with prefix hits up to their last prompt token.
                    cached_reqs = output.scheduled_cached_reqs
                    candidates = [*(r.request_id for r in deferred),
                                  *(r.req_id for r in output.scheduled_new_reqs),
                                  *cached_reqs.resumed_req_ids]
                    for rid in candidates:
                        if scheduled.get(rid) != 1:
                            continue
                        request = self.requests[rid]
                        t = request.num_computed_tokens - 1  # it already counts this token
                        if mgr.num_computed_of(rid) == t:
                            continue  # evicted for this very position above
                        r = self._retention_of(request)
                        if t >= r.num_sinks + r.window:  # some key is no longer visible to t
                            masked_single.append(rid)
                            retention[rid] = r
            else:
                retention = {}
            # The list right after the copy-out (the kept blocks): the workers append this step's
            # new blocks themselves.
            block_ids = {rid: [b.block_id for b in mgr.req_to_blocks[rid][:compactions[rid]]]
                         for rid in mgr.copied_out if rid in compactions}
            mgr.copied_out.clear()
            setattr(output, PLAN_ATTR, StepPlan(
                dropped, retention, compactions, src, dst, block_ids, masked_single))
        return output

    def _sepllm_preempt(self, request: Request) -> None:
        """Preempt a running request outside vLLM's schedule() (its copy-out found no free
        block), as vLLM's own reset_prefix_cache(reset_running_requests=True) does: it resumes
        from its prefix-cache hits; output frames already in flight are discarded."""
        logger.debug("sepllm: request %s preempted: no free block to copy out its cache",
                     request.request_id)
        self.running.remove(request)
        compat.preempt_dropping_in_flight(self, request, time.monotonic())
        # Preempted and possibly resumed in the same step: flushed from the persistent batch.
        self.prev_step_scheduled_req_ids.discard(request.request_id)

    # ------------------------------------------------------------------ metrics
    def make_stats(self, *args, **kwargs):
        """vLLM's scheduler stats plus the SepLLM figures (counter increments since the
        previous report, gauges now); they reach ``/metrics`` through metrics.py."""
        stats = super().make_stats(*args, **kwargs)
        if stats is None:
            return None
        step, self.sepllm_stats = self.sepllm_stats, SepLLMStepStats()
        mgr = self.sepllm_manager
        step.context_tokens = sum(map(_NUM_COMPUTED, self.running))
        # Records are held by running requests only (finish, abort and preemption drop them):
        # the D of every record is the D of every running request.
        step.retained_tokens = step.context_tokens - sum(mgr.dropped.values())
        step.num_requests = len(mgr.dropped)
        pool = self.kv_cache_manager.block_pool
        step.kv_blocks_free = pool.get_num_free_blocks()
        step.kv_blocks_used = pool.num_gpu_blocks - 1 - step.kv_blocks_free
        return SepLLMSchedulerStats.extend(stats, step)

    def _free_request(self, request: Request, *args, **kwargs):
        """Log the request's KV figures and return them to the client.

        The figures ride in ``kv_transfer_params`` (``RequestOutput.kv_transfer_params
        ["sepllm"]``, and the OpenAI responses' ``kv_transfer_params``) unless a KV connector
        uses that field.
        """
        stats = self.sepllm_manager.request_stats(request.request_id,
                                                   request.num_computed_tokens)
        if stats is None and request.num_preemptions and request.num_output_tokens:
            # Ends while preempted (finished with its last token in flight under async
            # scheduling, or aborted while waiting to resume): it holds no KV now.
            stats = {"tokens": 0, "kv_retained": 0, "kv_evicted": 0, "retained_ratio": 0.0,
                     "peak_kv_blocks": 0, "preempted_at_finish": True}
        freed, compactions = self.sepllm_manager.take_counts(request.request_id)
        if stats is not None:
            stats["kv_blocks_freed"] = freed
            stats["compactions"] = compactions
            logger.info(
                "sepllm: request %s finished: %d tokens, KV retained %d (%.1f%%), evicted %d, "
                "peak %d blocks", request.request_id, stats["tokens"], stats["kv_retained"],
                100.0 * stats["retained_ratio"], stats["kv_evicted"], stats["peak_kv_blocks"])
        self._sepllm_retention.pop(request.request_id, None)
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        if kv_params is None and stats is not None:
            kv_params = {"sepllm": stats}
        return kv_params, ec_params


class SepLLMScheduler(_SepLLMSchedulerMixin, TrackingScheduler):
    """vLLM's synchronous scheduler with SepLLM eviction (and KV-peak tracing, see
    instrument.py)."""


class SepLLMAsyncScheduler(_SepLLMSchedulerMixin, TrackingAsyncScheduler):
    """vLLM's async scheduler (the default) with SepLLM eviction (and KV-peak tracing)."""
