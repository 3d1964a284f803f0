"""Custom kernels of vllm_sepllm.

* :mod:`kernels.decode` — Triton paged decode attention over the compacted cache.
* :mod:`kernels.prefill` — Triton SepLLM-masked prefill attention and its mask metadata.
* ``torch.ops.vllm_sepllm.compact_kv`` — the CUDA slot-compaction op of ``csrc/``, built into
  ``vllm_sepllm._C`` when a CUDA toolkit is present; :func:`load_compact_kv` loads it.

The Triton modules are imported on demand, so importing this package needs neither Triton nor
the CUDA extension.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def load_compact_kv() -> bool:
    """Load ``torch.ops.vllm_sepllm.compact_kv`` and register its fake implementation (for
    torch.compile and FakeTensor tracing). Returns whether the op is available; cheap to call
    again."""
    try:
        import vllm_sepllm._C  # noqa: F401  (importing runs the op's TORCH_LIBRARY registration)
    except ImportError:
        return False

    @torch.library.register_fake("vllm_sepllm::compact_kv")
    def _compact_kv_fake(kv_caches, slot_pos, slot_sep, src, dst) -> None:
        # The op only writes into its (declared mutable) arguments: no outputs to describe.
        return None

    return True
