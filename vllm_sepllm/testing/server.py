"""vLLM's OpenAI server with SEPLLM on loopback, for tests and benchmarks: start it, wait for
``/health``, stop it; scrape ``/metrics``."""

from __future__ import annotations

import contextlib
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


class ServerError(RuntimeError):
    pass


@contextlib.contextmanager
def sepllm_server(model: str, sepllm: dict, log_path: Path, *, max_model_len: int = 2048,
                  max_num_seqs: int = 8, max_num_batched_tokens: int = 512,
                  kv_cache_gib: int = 1, extra_args: tuple[str, ...] = (),
                  startup_timeout: float = 600.0) -> Iterator[str]:
    """Run ``vllm-sepllm serve MODEL --attention-backend SEPLLM`` (float32, eager) on
    127.0.0.1 and yield its base URL; the server is stopped on exit. Its output goes to
    ``log_path``; :class:`ServerError` (with the log's tail) if it exits or does not become
    healthy within ``startup_timeout`` seconds."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm_sepllm.cli", "serve", model,
           "--attention-backend", "SEPLLM", "--port", str(port), "--host", "127.0.0.1",
           "--additional-config", json.dumps({"sepllm": sepllm}),
           "--max-model-len", str(max_model_len), "--enforce-eager", "--dtype", "float32",
           "--max-num-seqs", str(max_num_seqs),
           "--max-num-batched-tokens", str(max_num_batched_tokens), *extra_args]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    log_path = Path(log_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise ServerError(f"server exited ({proc.returncode}): "
                                  f"{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise ServerError(f"server not healthy after {startup_timeout:.0f} s: "
                                  f"{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def post_json(url: str, body: dict, timeout: float = 300.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


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
