"""SepLLM figures on vLLM's Prometheus endpoint (``/metrics``).

How they travel (vLLM 0.26.0)::

    worker: _sepllm_compact timed (CompactionTimer)
        -> attribute ``sepllm_worker_stats`` on the step's ModelRunnerOutput (pickled with it)
    engine core: SepLLM scheduler adds it to its counters (update_from_output);
        make_stats returns a SepLLMSchedulerStats (vLLM's SchedulerStats + a ``sepllm`` field)
        -> EngineCoreOutputs.scheduler_stats (msgspec; patches.py item 7 lets it decode as ours)
    front end: SepLLMPrometheusStatLogger (vLLM's PrometheusStatLogger + our metrics), loaded
        through vLLM's ``vllm.stat_logger_plugins`` entry point -> /metrics

Metrics (labels ``model_name`` and ``engine``, as vLLM's own; counters are exposed with the
``_total`` suffix):

==================================== ======= ==============================================
name                                 type    meaning
==================================== ======= ==============================================
vllm:sepllm_evicted_tokens           counter KV tokens evicted
vllm:sepllm_freed_blocks             counter KV blocks returned to the pool by compaction
vllm:sepllm_compactions              counter per-request compactions sent to the workers
vllm:sepllm_moved_tokens             counter KV slots moved by compaction
vllm:sepllm_compaction_seconds       counter worker time moving KV (CUDA events on GPU)
vllm:sepllm_eviction_seconds         counter scheduler host time deciding evictions
vllm:sepllm_retained_tokens          gauge   KV tokens held by running requests
vllm:sepllm_context_tokens           gauge   logical tokens of running requests with KV
vllm:sepllm_kv_blocks_used           gauge   KV blocks held by requests
vllm:sepllm_kv_blocks_free           gauge   KV blocks free in the pool
vllm:sepllm_num_requests             gauge   per-request records in the SepLLM block manager
vllm:sepllm_config_info              gauge   1, labels: the engine's SepLLM settings
==================================== ======= ==============================================

After a drain, ``kv_blocks_used`` and ``num_requests`` are 0 (a leak shows here).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import torch

from vllm.v1.metrics.loggers import PrometheusStatLogger
from vllm.v1.metrics.stats import SchedulerStats
from vllm.v1.metrics.utils import create_metric_per_engine

#: Attribute of ``ModelRunnerOutput`` that carries :class:`WorkerStats` to the scheduler.
WORKER_STATS_ATTR = "sepllm_worker_stats"


@dataclasses.dataclass
class SepLLMStepStats:
    """What one ``SchedulerStats`` carries for SepLLM.

    Counters are increments since the previous report (vLLM's style: the front end adds them,
    so several API servers sum correctly); gauges are the state after the step.
    """

    # counters (increments)
    evicted_tokens: int = 0
    freed_blocks: int = 0
    compactions: int = 0
    moved_tokens: int = 0
    compaction_seconds: float = 0.0
    eviction_seconds: float = 0.0
    # gauges
    num_requests: int = 0
    context_tokens: int = 0
    retained_tokens: int = 0
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0

    COUNTERS = ("evicted_tokens", "freed_blocks", "compactions", "moved_tokens",
                "compaction_seconds", "eviction_seconds")
    GAUGES = ("num_requests", "context_tokens", "retained_tokens", "kv_blocks_used",
              "kv_blocks_free")


@dataclasses.dataclass
class SepLLMSchedulerStats(SchedulerStats):
    """vLLM's ``SchedulerStats`` plus the SepLLM figures of the step (``None`` from any other
    scheduler)."""

    sepllm: SepLLMStepStats | None = None

    @classmethod
    def extend(cls, stats: SchedulerStats, sepllm: SepLLMStepStats) -> SepLLMSchedulerStats:
        fields = {f.name: getattr(stats, f.name) for f in dataclasses.fields(SchedulerStats)}
        return cls(**fields, sepllm=sepllm)


@dataclasses.dataclass
class WorkerStats:
    """Worker-side figures of the steps since the previous model output."""

    compaction_seconds: float = 0.0


class CompactionTimer:
    """Time spent moving KV, measured without stalling the host.

    CPU: host time around the (synchronous) copy. CUDA: an event pair around the launch on the
    current stream; elapsed times are read only once the end event has completed (``query()``
    never blocks), so a measurement is reported with the step that first finds it done.
    ``take()`` may run on another thread than ``start``/``stop`` (vLLM fetches async model
    outputs on a worker thread), so a pair is queued only after its end event is recorded (an
    unrecorded event's ``query()`` is True) and the queue is guarded by a lock.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start: torch.cuda.Event | None = None
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            with self._lock:
                self._pending.append((self._start, end))
        else:
            with self._lock:
                self.seconds += time.perf_counter() - self._t0

    def take(self) -> float:
        """Seconds measured (and completed) since the previous call."""
        with self._lock:
            while self._pending and self._pending[0][1].query():
                start, end = self._pending.pop(0)
                self.seconds += start.elapsed_time(end) / 1000.0
            seconds, self.seconds = self.seconds, 0.0
        return seconds


def attach_worker_stats(output, timer: CompactionTimer):
    """Attach the worker's figures to a model output on its way to the scheduler.

    ``output`` is what the worker's ``execute_model``/``sample_tokens`` return: ``None``, a
    ``ModelRunnerOutput`` or an ``AsyncModelRunnerOutput`` (figures attached when its result is
    fetched, after the step's work). vLLM's shared empty output is left alone; its figures go
    with the next real one.
    """
    from vllm.v1.outputs import (
        EMPTY_MODEL_RUNNER_OUTPUT,
        AsyncModelRunnerOutput,
        ModelRunnerOutput,
    )

    if isinstance(output, AsyncModelRunnerOutput):
        get_output = output.get_output

        def get_output_with_stats():
            result = get_output()
            if result is not EMPTY_MODEL_RUNNER_OUTPUT:
                setattr(result, WORKER_STATS_ATTR, WorkerStats(timer.take()))
            return result

        output.get_output = get_output_with_stats
    elif isinstance(output, ModelRunnerOutput) and output is not EMPTY_MODEL_RUNNER_OUTPUT:
        setattr(output, WORKER_STATS_ATTR, WorkerStats(timer.take()))
    return output


def worker_stats_of(model_runner_output) -> WorkerStats | None:
    return getattr(model_runner_output, WORKER_STATS_ATTR, None)


_METRICS = {
    # field: (prometheus name, kind, documentation)
    "evicted_tokens": ("vllm:sepllm_evicted_tokens", "counter",
                       "SepLLM: KV tokens evicted."),
    "freed_blocks": ("vllm:sepllm_freed_blocks", "counter",
                     "SepLLM: KV blocks returned to the pool by compaction."),
    "compactions": ("vllm:sepllm_compactions", "counter",
                    "SepLLM: per-request KV compactions sent to the workers."),
    "moved_tokens": ("vllm:sepllm_moved_tokens", "counter",
                     "SepLLM: KV slots moved by compaction."),
    "compaction_seconds": ("vllm:sepllm_compaction_seconds", "counter",
                           "SepLLM: worker time moving KV, in seconds (CUDA events on GPU)."),
    "eviction_seconds": ("vllm:sepllm_eviction_seconds", "counter",
                         "SepLLM: scheduler host time deciding evictions, in seconds."),
    "retained_tokens": ("vllm:sepllm_retained_tokens", "gauge",
                        "SepLLM: KV tokens held by running requests."),
    "context_tokens": ("vllm:sepllm_context_tokens", "gauge",
                       "SepLLM: logical tokens of running requests with KV computed."),
    "kv_blocks_used": ("vllm:sepllm_kv_blocks_used", "gauge",
                       "SepLLM: KV blocks held by requests."),
    "kv_blocks_free": ("vllm:sepllm_kv_blocks_free", "gauge",
                       "SepLLM: KV blocks free in the pool."),
    "num_requests": ("vllm:sepllm_num_requests", "gauge",
                     "SepLLM: per-request records held by the SepLLM block manager."),
}


class SepLLMPrometheusStatLogger(PrometheusStatLogger):
    """vLLM's Prometheus stat logger plus the SepLLM metrics (module docstring).

    Loaded by vLLM's ``vllm.stat_logger_plugins`` entry point in every ``AsyncLLM`` (the
    OpenAI server); being a ``PrometheusStatLogger`` it takes the default one's place, so every
    vLLM metric stays as it is. Without SEPLLM selected it adds nothing.
    """

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
        super().__init__(vllm_config, engine_indexes)
        from vllm_sepllm.patches import engine_sepllm_config, sepllm_selected

        self.sepllm_metrics: dict[str, dict[int, object]] = {}
        if not sepllm_selected(vllm_config):
            return
        labelnames = ["model_name", "engine"]
        for field, (name, kind, doc) in _METRICS.items():
            if kind == "counter":
                metric = self._counter_cls(name=name, documentation=doc, labelnames=labelnames)
            else:
                metric = self._gauge_cls(name=name, documentation=doc, labelnames=labelnames,
                                         multiprocess_mode="mostrecent")
            self.sepllm_metrics[field] = create_metric_per_engine(
                metric, self.per_engine_labelvalues)
        cfg = engine_sepllm_config(vllm_config).to_dict()
        info = {k: str(cfg[k]) for k in ("mode", "num_sinks", "sep_cap", "window")}
        info_gauge = self._gauge_cls(
            name="vllm:sepllm_config_info", documentation="SepLLM: the engine's settings.",
            labelnames=[*labelnames, *info], multiprocess_mode="mostrecent")
        for labelvalues in self.per_engine_labelvalues.values():
            info_gauge.labels(*labelvalues, *info.values()).set(1)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        super().record(scheduler_stats, iteration_stats, mm_cache_stats, engine_idx)
        step = getattr(scheduler_stats, "sepllm", None)
        if step is None or not self.sepllm_metrics:
            return
        for field in SepLLMStepStats.COUNTERS:
            if value := getattr(step, field):
                self.sepllm_metrics[field][engine_idx].inc(value)
        for field in SepLLMStepStats.GAUGES:
            self.sepllm_metrics[field][engine_idx].set(getattr(step, field))
