"""KV-footprint tracing for benchmarks: the most KV blocks in use at once, and the most running
requests, for any backend, with the engine core in its own process.

Set ``VLLM_SEPLLM_KV_TRACE=/path/file.json``. SEPLLM's schedulers always track (two integer
updates per step) and write the file on a new peak (at most once a second), when the engine goes
idle, and at shutdown. For another
backend, pass ``--scheduler-cls vllm_sepllm.instrument.TrackingAsyncScheduler`` (or
``TrackingScheduler`` without async scheduling) so both sides are measured the same way.
"""

from __future__ import annotations

import json
import os
import time

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

TRACE_ENV = "VLLM_SEPLLM_KV_TRACE"


class KVPeakTracker:
    """Mixin for vLLM schedulers: tracks pool peaks, writes them to ``$VLLM_SEPLLM_KV_TRACE``."""

    def _kv_trace_init(self) -> None:
        self._kv_peak_blocks = 0
        self._kv_peak_running = 0
        self._kv_trace_path = os.environ.get(TRACE_ENV)
        self._kv_trace_written = 0.0

    def _kv_trace_step(self) -> None:
        pool = self.kv_cache_manager.block_pool
        used = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()
        new_peak = used > self._kv_peak_blocks or len(self.running) > self._kv_peak_running
        if new_peak:
            self._kv_peak_blocks = max(used, self._kv_peak_blocks)
            self._kv_peak_running = max(len(self.running), self._kv_peak_running)
            if time.monotonic() - self._kv_trace_written > 1.0:
                self._kv_trace_write()

    def _kv_trace_write(self) -> None:
        if not self._kv_trace_path:
            return
        pool = self.kv_cache_manager.block_pool
        data = {"num_kv_blocks": pool.num_gpu_blocks - 1,
                "peak_kv_blocks": self._kv_peak_blocks,
                "peak_running": self._kv_peak_running}
        tmp = self._kv_trace_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self._kv_trace_path)
        self._kv_trace_written = time.monotonic()

    def reset_kv_trace(self) -> None:
        self._kv_peak_blocks = self._kv_peak_running = 0


class _TrackingMixin(KVPeakTracker):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._kv_trace_init()

    def schedule(self, *args, **kwargs):
        out = super().schedule(*args, **kwargs)
        self._kv_trace_step()
        return out

    def update_from_output(self, *args, **kwargs):
        out = super().update_from_output(*args, **kwargs)
        if self.get_num_unfinished_requests() == 0:  # idle: the peaks are final
            self._kv_trace_write()
        return out

    def shutdown(self) -> None:
        self._kv_trace_write()
        super().shutdown()


class TrackingScheduler(_TrackingMixin, Scheduler):
    """vLLM's scheduler with KV-peak tracing (for the baseline side of benchmarks)."""


class TrackingAsyncScheduler(_TrackingMixin, AsyncScheduler):
    """vLLM's async scheduler with KV-peak tracing (for the baseline side of benchmarks)."""
