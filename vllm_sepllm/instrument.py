"""KV-footprint and step tracing for benchmarks: the most KV blocks in use at once, the most
running requests and when each engine step was scheduled, for any backend, with the engine core
in its own process.

Set ``VLLM_SEPLLM_KV_TRACE=/path/file.json``. SEPLLM's schedulers always track (two integer
updates per step) and write the file on a new peak (at most once a second), when the engine goes
idle, and at shutdown. With the variable set, every step's schedule time (wall clock), scheduled
tokens and rows, and the engine core's garbage-collector pauses over 1 ms, are written too
(``steps``, ``gc``): ``benchmarks/throughput.py`` turns them into where its timed run's wall
time went (step periods by kind, slow steps, collector pauses). For another
backend, pass ``--scheduler-cls vllm_sepllm.instrument.TrackingAsyncScheduler`` (or
``TrackingScheduler`` without async scheduling) so both sides are measured the same way.
"""

from __future__ import annotations

import gc
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
        # Per step: (wall time, scheduled tokens, scheduled rows); collector pauses > 1 ms:
        # (wall time at the end, generation, seconds); per generation: [count, seconds].
        self._step_log: list[tuple[float, int, int]] | None = None
        self._gc_log: list[tuple[float, int, float]] = []
        self._gc_totals = [[0, 0.0], [0, 0.0], [0, 0.0]]
        if self._kv_trace_path:
            self._step_log = []
            self._gc_t0 = 0.0
            gc.callbacks.append(self._gc_callback)

    def _gc_callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
            return
        dt = time.perf_counter() - self._gc_t0
        gen = min(int(info.get("generation", 0)), 2)
        tot = self._gc_totals[gen]
        tot[0] += 1
        tot[1] += dt
        if dt > 1e-3:
            self._gc_log.append((time.time(), gen, dt))

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
        if self._step_log is not None:
            data["steps"] = [[round(t, 5), k, r] for t, k, r in self._step_log]
            data["gc"] = {"pauses": [[round(t, 5), g, round(d, 5)] for t, g, d in self._gc_log],
                          "totals": self._gc_totals}
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
        if self._step_log is not None:
            self._step_log.append((time.time(), out.total_num_scheduled_tokens,
                                   len(out.num_scheduled_tokens)))
        return out

    def update_from_output(self, *args, **kwargs):
        out = super().update_from_output(*args, **kwargs)
        if self.get_num_unfinished_requests() == 0:  # idle: the peaks are final
            self._kv_trace_write()
        return out

    def shutdown(self) -> None:
        self._kv_trace_write()
        if self._gc_callback in gc.callbacks:
            gc.callbacks.remove(self._gc_callback)
        super().shutdown()


class TrackingScheduler(_TrackingMixin, Scheduler):
    """vLLM's scheduler with KV-peak tracing (for the baseline side of benchmarks)."""


class TrackingAsyncScheduler(_TrackingMixin, AsyncScheduler):
    """vLLM's async scheduler with KV-peak tracing (for the baseline side of benchmarks)."""
