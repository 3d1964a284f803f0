"""The ``SEPLLM`` attention backend.

Four classes, as vLLM's backends have: metadata, builder, backend, impl. The cache is compacted
(see policy.py), so::

    request b:   cache indices 0 .......... cache_len[b]-1
                 |<-- retained tokens, any order -->|<- this step's new tokens ->|
                                                     ^ written by do_kv_cache_update at
                                                       slot(position - D)

    seq_lens[b] (from the runner) = cache_len[b]  = retained + new tokens
    query_start_loc                = offsets of each request's new tokens
    positions                      = logical positions (the mask uses them; RoPE too, unless
                                     pe_shift feeds cache ranks: read here at build time)

A request with one new token (decode) attends its whole cache: it holds exactly what that
query sees. A chunk of several tokens (prefill) applies the SepLLM mask, built from the
per-slot positions and separator flags the runner records.

Decode rows (one new token) use vLLM's FlashAttention (FA3 on Hopper) or our Triton paged kernel
(kernels/decode.py) on CUDA, both exact here because the cache holds exactly the visible keys,
and a batched torch gather + SDPA on CPU. Prefill rows use the Triton masked-prefill kernel on
CUDA (kernels/prefill.py) and torch SDPA with the SepLLM mask on CPU (vllm_sepllm.reference).
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import torch

from vllm.config import VllmConfig
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_sepllm import compat
from vllm_sepllm.config import KV_CACHE_DTYPES, is_fp8_cache_dtype
from vllm_sepllm.reference import (
    FP8,
    decode_attention,
    is_fp8,
    masked_attention,
    quantize_fp8,
    split_kv,
    write_kv,
)

BACKEND_NAME = "SEPLLM"


@dataclasses.dataclass
class PrefillRow:
    """One request with several new tokens: its queries, its cache slots and its mask."""

    q_start: int
    q_end: int
    slots: torch.Tensor  # [K] int64, slots of cache indices 0..K-1
    mask: torch.Tensor  # [q_end - q_start, K] bool


@dataclasses.dataclass
class TritonPrefill:
    """All prefill rows of a step for the Triton masked-prefill kernel (CUDA).

    ``tokens`` [Tp] int64: indices of their queries in the batch; ``block_table`` [P, max_blocks],
    ``cache_lens`` [P] int32, ``query_start_loc`` [P + 1] int32 (rebased to 0), ``positions`` [Tp],
    ``meta``: per-key positions/ranks and per-query thresholds (kernels.prefill).
    """

    tokens: torch.Tensor
    block_table: torch.Tensor
    cache_lens: torch.Tensor
    query_start_loc: torch.Tensor
    positions: torch.Tensor
    meta: object
    max_query_len: int


@dataclasses.dataclass
class SepLLMMetadata:
    """Per-step attention metadata, built once and shared by all layers.

    Decode rows (one new token) attend their whole cache; they are gathered into a batch:
    ``decode_rows`` [Bd] int64 token indices of their queries, ``decode_block_table``
    [Bd, max_blocks] int32, ``decode_cache_lens`` [Bd] int32 (on device), and for the torch
    path ``decode_slots`` [Bd, Lmax] int64 + ``decode_valid`` [Bd, Lmax] bool.
    Prefill rows (several new tokens) carry their own mask (:class:`PrefillRow`).

    A step whose rows are all decodes (``max_query_len == 1``) on CUDA takes the *plain* form:
    ``decode_rows`` is None (query i is row i), ``decode_block_table``, ``decode_cache_lens``
    and ``query_start_loc`` are the runner's persistent buffers (padded rows: length 0, null
    block), so the same metadata serves a captured full CUDA graph. With ``cache_size``
    (batched eviction, no mask) every step with FlashAttention takes it: causal paged
    attention of each row's queries (``max_query_len``) over its cache.
    """

    num_actual_tokens: int
    slot_mapping: torch.Tensor
    decode_rows: torch.Tensor
    decode_block_table: torch.Tensor
    decode_cache_lens: torch.Tensor
    decode_max_len: int
    decode_slots: torch.Tensor | None
    decode_valid: torch.Tensor | None
    prefills: list[PrefillRow]
    triton_prefill: TritonPrefill | None = None
    # Uniform decode (every row one token; CUDA): ``decode_rows`` is None, the tensors above are
    # the runner's persistent buffers (CUDA-graph safe) and these drive the kernel.
    query_start_loc: torch.Tensor | None = None
    num_splits: int | None = None
    scheduler_metadata: torch.Tensor | None = None
    max_query_len: int = 1
    # This step's decode kernel where it differs from the backend's (triton_full_decode).
    decode_kernel: str | None = None


def decode_kernel_choice(device: torch.device, vllm_config: VllmConfig | None = None) -> str:
    """Decode attention: ``VLLM_SEPLLM_DECODE_KERNEL`` = flash | triton | torch. Default: vLLM's
    FlashAttention on CUDA when it can read the cache (exact here: the cache holds exactly the
    visible keys), else the Triton kernel on CUDA, else torch. ``flash`` is available exactly
    when this returns it. An fp8 cache (``vllm_config``'s ``cache_dtype``) is read by
    FlashAttention under vLLM's own rule for FLASH_ATTN (FA3 on compute capability 9.x) and
    with a bfloat16 model (FA3 writes e4m3 inputs' outputs in bf16); elsewhere by Triton."""
    choice = os.environ.get("VLLM_SEPLLM_DECODE_KERNEL")
    if device.type != "cuda":
        return "torch"
    flash = _flash_attn()
    fp8 = vllm_config is not None and is_fp8_cache_dtype(vllm_config.cache_config.cache_dtype)
    flash_ok = flash is not None and (not fp8 or (
        flash.version == 3 and _cuda_capability(device)[0] == 9
        and vllm_config.model_config.dtype == torch.bfloat16))
    if choice is None:
        return "flash" if flash_ok else "triton"
    if choice not in ("flash", "triton", "torch"):
        raise ValueError(f"VLLM_SEPLLM_DECODE_KERNEL must be flash, triton or torch; got {choice!r}")
    if choice == "flash" and not flash_ok:
        raise ValueError("VLLM_SEPLLM_DECODE_KERNEL='flash', but vLLM's FlashAttention is not "
                         "available on this GPU" + (" for an fp8 KV cache (FA3 on compute "
                                                    "capability 9.x, bfloat16 model)" if fp8
                                                    else "") + "; use 'triton' or 'torch'")
    return choice


#: Largest engine ``cache_size`` for which all-decode batches that fill the GPU run our Triton
#: kernel instead of FA3. H200, one layer, Llama-3-8B heads (kernels.py decode_tune): ~340 keys
#: 99-195 us against FA3's 120-219 us (256-512 rows); ~1K keys 135-495 against 148-532 us; ~2K
#: and ~4K keys a tie or FA3 ahead (160.7-170.9 against 159.8 us at 72 rows x 2K).
TRITON_FULL_DECODE_MAX_KEYS = 1024
#: Widest head the choice was measured at (128); wider heads keep FA3.
TRITON_FULL_DECODE_MAX_HEAD = 128


def triton_full_decode(device: torch.device, vllm_config: VllmConfig, head_size: int) -> bool:
    """Whether all-decode steps whose batch fills the GPU (:func:`kernels.decode.min_full_batch`)
    use our Triton kernel although the decode kernel is FlashAttention: the default choice
    (``VLLM_SEPLLM_DECODE_KERNEL`` unset), a 16-bit cache, heads of at most
    ``TRITON_FULL_DECODE_MAX_HEAD``, and batched eviction with the engine's ``cache_size`` at
    most ``TRITON_FULL_DECODE_MAX_KEYS``: requests cannot raise their cache past it (a larger
    per-request window is refused), whereas without ``cache_size`` a request's window may make
    its cache arbitrarily long (correct either way, but a long row is one unsplit program).
    W2 on the H200, SEPLLM c356 alone, same call: 95.3 s against 101.2 s with FA3 throughout
    (benchmarks/README.md). fp8 caches stay on FA3 (its e4m3 queries)."""
    from vllm_sepllm.patches import engine_sepllm_config

    cache_size = engine_sepllm_config(vllm_config).cache_size
    return (os.environ.get("VLLM_SEPLLM_DECODE_KERNEL") is None
            and cache_size is not None and cache_size <= TRITON_FULL_DECODE_MAX_KEYS
            and head_size <= TRITON_FULL_DECODE_MAX_HEAD
            and decode_kernel_choice(device, vllm_config) == "flash"
            and not is_fp8_cache_dtype(vllm_config.cache_config.cache_dtype))


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def always_plain(cache_size: int | None, device: torch.device,
                 vllm_config: VllmConfig | None = None) -> bool:
    """Whether every step takes the builder's plain path (no mask anywhere): batched eviction
    (``cache_size``) with vLLM's FlashAttention for decode. The worker then keeps no per-slot
    records (only masks and PE shift read them)."""
    return cache_size is not None and decode_kernel_choice(device, vllm_config) == "flash"


@dataclasses.dataclass(frozen=True)
class FlashOps:
    """vLLM's FlashAttention entry points (FA3 on Hopper)."""

    varlen: object  # flash_attn_varlen_func
    version: int
    scheduler_metadata: object  # get_scheduler_metadata (FA3 ahead-of-time schedule)
    reshape_and_cache: object  # reshape_and_cache_flash: KV write that skips padded slots


def _flash_attn() -> FlashOps | None:
    """vLLM's FlashAttention ops on CUDA, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from vllm.v1.attention.backends.fa_utils import (
            flash_attn_varlen_func,
            get_flash_attn_version,
            get_scheduler_metadata,
            is_flash_attn_varlen_func_available,
            reshape_and_cache_flash,
        )
    except ImportError:
        return None
    if not is_flash_attn_varlen_func_available():
        return None
    return FlashOps(flash_attn_varlen_func, get_flash_attn_version(), get_scheduler_metadata,
                    reshape_and_cache_flash)


class SepLLMMetadataBuilder(AttentionMetadataBuilder[SepLLMMetadata]):
    # CUDA graphs: UNIFORM_SINGLE_TOKEN_DECODE. A decode row needs no mask (its compacted cache
    # holds exactly the keys it sees), so an all-decode step is plain paged attention over
    # (block_table, seq_lens) — the runner's persistent buffers — and is captured in a full
    # graph (vLLM's FULL_AND_PIECEWISE default). Steps with prefill rows build their mask
    # metadata on the host per step (per-request retention, separator ranks) and run under
    # piecewise graphs with attention outside them. The torch decode path (CPU) never captures.
    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig,
                              kv_cache_spec: AttentionSpec) -> AttentionCGSupport:
        device = torch.device(vllm_config.device_config.device)
        if decode_kernel_choice(device, vllm_config) == "torch":
            return AttentionCGSupport.NEVER
        return cls._cudagraph_support

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.decode_kernel = decode_kernel_choice(device, vllm_config)
        # Triton masked prefill on CUDA; the torch reference (SDPA + dense mask) elsewhere.
        self.triton_prefill = device.type == "cuda"
        model = vllm_config.model_config
        parallel = vllm_config.parallel_config
        self.num_heads_q = model.get_num_attention_heads(parallel)
        self.num_heads_kv = model.get_num_kv_heads(parallel)
        self.head_size = model.get_head_size()
        self.max_model_len = model.max_model_len
        from vllm_sepllm.patches import engine_sepllm_config

        cc = vllm_config.compilation_config
        self.full_graphs = (device.type == "cuda" and self.decode_kernel != "torch"
                            and cc.cudagraph_mode.has_full_cudagraphs())
        self.max_graph_tokens = cc.max_cudagraph_capture_size or 0
        self.flash = _flash_attn() if self.decode_kernel == "flash" else None
        self.triton_full_decode = triton_full_decode(device, vllm_config, self.head_size)
        self.unsplit_reqs = 0
        if device.type == "cuda":
            # Batches that fill the GPU unsplit, 4 (row, KV head) programs per SM: their CUDA
            # graph gets one FA3 split, dropping FA3's combine kernel (H200, 512 x 340 cached
            # tokens: 236 -> 221 us a layer), or our unsplit Triton kernel (triton_full_decode).
            from kernels.decode import min_full_batch

            self.unsplit_reqs = min_full_batch(self.num_heads_kv, device)
        # Batched eviction: no row needs a mask (policy.py), prefill rows included.
        self.always_plain = always_plain(engine_sepllm_config(vllm_config).cache_size, device,
                                         vllm_config)
        self.scheduler_metadata = None
        self.flash_graph_splits = 0
        if self.full_graphs and self.flash is not None:
            # As vLLM's FlashAttention backend: a split bound sizes FA3's intermediate buffers
            # at capture; FA3's ahead-of-time schedule lives in a persistent buffer
            # (1 + round_up(batch, 4) * 4 int32, flash_api.cpp).
            self.flash_graph_splits = vllm_config.attention_config.\
                flash_attn_max_num_splits_for_cuda_graph
            if self.flash.version == 3:
                max_batch = max(vllm_config.scheduler_config.max_num_seqs,
                                self.max_graph_tokens)
                self.scheduler_metadata = torch.zeros(1 + -(-max_batch // 4) * 4 * 4,
                                                      dtype=torch.int32, device=device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SepLLMMetadata:
        from vllm_sepllm.reference import cache_slots, sepllm_mask
        from vllm_sepllm.worker import SepLLMWorkerState, to_device

        cm = common_attn_metadata
        state = SepLLMWorkerState.current
        if cm.num_reqs > 0 and self.decode_kernel != "torch" and (
                (cm.max_query_len == 1 and not state.masked_single) or self.always_plain):
            return self._build_plain(cm)
        assert state.slot_records, "masked attention without slot records (worker.py)"
        num_reqs = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: num_reqs + 1].tolist()
        lens_cpu = cm.seq_lens_cpu_upper_bound
        if lens_cpu is None:
            lens_cpu = cm.seq_lens.cpu()
        cache_lens = lens_cpu[:num_reqs].tolist()
        device = cm.block_table_tensor.device

        # Rows with one token need no mask (decode), except the scheduler's masked_single.
        masked = state.masked_single
        row_ids = state.row_req_ids
        decode_idx = [b for b in range(num_reqs) if qsl[b + 1] - qsl[b] == 1
                      and not (masked and row_ids[b] in masked)]
        decode_set = set(decode_idx)
        prefill_idx = [b for b in range(num_reqs) if b not in decode_set]
        prefills, triton_prefill = [], None
        if prefill_idx and self.triton_prefill:
            triton_prefill = self._build_triton_prefill(cm, state, prefill_idx, qsl, cache_lens)
        for b in [] if self.triton_prefill else prefill_idx:
            q0, q1 = qsl[b], qsl[b + 1]
            slots = cache_slots(cm.block_table_tensor[b], cache_lens[b], self.block_size)
            mask = sepllm_mask(cm.positions[q0:q1], state.slot_pos[slots],
                               state.slot_sep[slots], state.row_retention(b))
            prefills.append(PrefillRow(q0, q1, slots, mask))

        rows = torch.tensor(decode_idx, dtype=torch.int64)
        lens = torch.tensor([cache_lens[b] for b in decode_idx], dtype=torch.int32)
        decode_max_len = int(lens.max()) if decode_idx else 0
        decode_slots = decode_valid = None
        block_table = cm.block_table_tensor[to_device(rows, device)] if decode_idx else None
        if decode_idx and self.decode_kernel == "torch":
            idx = torch.arange(decode_max_len)
            decode_valid = idx[None, :] < lens[:, None]
            blocks = block_table.to(torch.int64).gather(
                1, (idx // self.block_size)[None, :].expand(len(decode_idx), -1)
                .clamp(max=block_table.shape[1] - 1).to(device))
            decode_slots = blocks * self.block_size + (idx % self.block_size).to(device)
            decode_slots = decode_slots.masked_fill(~decode_valid.to(device), 0)
            decode_valid = decode_valid.to(device)
        return SepLLMMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            slot_mapping=cm.slot_mapping,
            decode_rows=to_device(torch.tensor([qsl[b] for b in decode_idx],
                                               dtype=torch.int64), device),
            decode_block_table=block_table,
            decode_cache_lens=to_device(lens, device),
            decode_max_len=decode_max_len,
            decode_slots=decode_slots,
            decode_valid=decode_valid,
            prefills=prefills,
            triton_prefill=triton_prefill,
        )

    def _build_plain(self, cm: CommonAttentionMetadata) -> SepLLMMetadata:
        """Every row attends its whole cache causally (all decodes; or any step without masks,
        FlashAttention only): persistent buffers only, so a full CUDA graph can replay an
        all-decode step.

        Kernel and split counts must not depend on this step's lengths (a replay reuses the
        captured launch). An all-decode batch that fills the GPU (``unsplit_reqs`` rows) runs
        our Triton kernel unsplit where :func:`triton_full_decode` says so; otherwise, under
        graphs, FA3 gets one split for batches that fill the GPU, else vLLM's split bound, and
        the Triton kernel a count fixed by the batch size and ``max_model_len``."""
        num_tokens = cm.num_actual_tokens
        graphed = (self.full_graphs and cm.max_query_len == 1
                   and num_tokens <= self.max_graph_tokens)
        num_splits = scheduler_metadata = kernel = None
        # cm.num_reqs is the captured (padded) batch: the same choices at a replay
        if (self.triton_full_decode and cm.max_query_len == 1
                and cm.num_reqs >= self.unsplit_reqs
                and cm.num_actual_tokens == cm.num_reqs):  # the kernel: one query per row
            kernel, num_splits = "triton", 1
        elif self.decode_kernel == "flash":
            num_splits = 0
            if graphed:  # cm.num_reqs is the captured (padded) batch: the same at replay
                num_splits = (1 if cm.num_reqs >= self.unsplit_reqs
                              else self.flash_graph_splits)
            if graphed and self.scheduler_metadata is not None:
                sched = self.flash.scheduler_metadata(
                    batch_size=cm.num_reqs, max_seqlen_q=1, max_seqlen_k=cm.max_seq_len,
                    num_heads_q=self.num_heads_q, num_heads_kv=self.num_heads_kv,
                    headdim=self.head_size, cache_seqlens=cm.seq_lens,
                    qkv_dtype=(FP8 if is_fp8(self.kv_cache_spec.dtype)
                               else self.kv_cache_spec.dtype),
                    cu_seqlens_q=cm.query_start_loc,
                    page_size=self.block_size, causal=True, window_size=(-1, -1),
                    num_splits=num_splits)
                n = sched.shape[0]
                self.scheduler_metadata[:n] = sched
                # Stale entries past n would let idle thread blocks write the output.
                self.scheduler_metadata[n:] = 0
                scheduler_metadata = self.scheduler_metadata[:n]
        elif graphed:
            from kernels.decode import default_num_splits

            num_splits = default_num_splits(cm.num_reqs, self.num_heads_kv, self.max_model_len,
                                            cm.seq_lens.device)
        return SepLLMMetadata(
            num_actual_tokens=num_tokens,
            slot_mapping=cm.slot_mapping,
            decode_rows=None,
            decode_block_table=cm.block_table_tensor,
            decode_cache_lens=cm.seq_lens,
            decode_max_len=cm.max_seq_len,
            decode_slots=None,
            decode_valid=None,
            prefills=[],
            query_start_loc=cm.query_start_loc,
            num_splits=num_splits,
            scheduler_metadata=scheduler_metadata,
            max_query_len=cm.max_query_len,
            decode_kernel=kernel,
        )

    def _build_triton_prefill(self, cm, state, rows: list[int], qsl: list[int],
                              cache_lens: list[int]) -> TritonPrefill:
        from kernels.prefill import prefill_key_meta

        from vllm_sepllm.worker import to_device

        device = cm.block_table_tensor.device
        qlens = [qsl[b + 1] - qsl[b] for b in rows]
        starts = [0]
        for n in qlens:
            starts.append(starts[-1] + n)
        tokens = to_device(torch.cat([torch.arange(qsl[b], qsl[b + 1]) for b in rows]), device)
        block_table = cm.block_table_tensor[to_device(torch.tensor(rows), device)]
        lens = to_device(torch.tensor([cache_lens[b] for b in rows], dtype=torch.int32), device)
        qsl_p = to_device(torch.tensor(starts, dtype=torch.int32), device)
        positions = cm.positions[tokens]
        meta = prefill_key_meta(state.slot_pos, state.slot_sep, block_table, lens, qsl_p,
                                positions, [state.row_retention(b) for b in rows],
                                self.block_size, max_cache_len=max(cache_lens[b] for b in rows))
        return TritonPrefill(tokens, block_table, lens, qsl_p, positions, meta, max(qlens))


class SepLLMBackend(AttentionBackend):
    """SepLLM attention over a compacted paged KV cache."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16, torch.bfloat16, torch.float32,
    ]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(KV_CACHE_DTYPES)

    @staticmethod
    def get_name() -> str:
        # Must be a member name of AttentionBackendEnum: "SEPLLM" is registered as an alias
        # of CUSTOM by the plugin (see patches.py).
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[SepLLMImpl]:
        return SepLLMImpl

    @staticmethod
    def get_builder_cls() -> type[SepLLMMetadataBuilder]:
        return SepLLMMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:  # noqa: ANN001
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls):  # noqa: ANN206 (vLLM 0.32+; see compat.py)
        return compat.kv_cache_layouts()

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                           head_size: int, cache_dtype_str: str = "auto") -> tuple[int, ...]:
        # [num_blocks, block_size, Hkv, 2D]: K in [..., :D], V in [..., D:]; a slot is one
        # contiguous [Hkv, 2D] row, so compaction moves whole rows.
        return (num_blocks, block_size, num_kv_heads, 2 * head_size)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 192, 256]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:  # noqa: ANN001
        return True

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False


class SepLLMImpl(AttentionImpl[SepLLMMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None,
                 kv_cache_dtype: str, logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None) -> None:
        unsupported = {
            "alibi_slopes": alibi_slopes, "sliding_window": sliding_window,
            "logits_soft_cap": logits_soft_cap or None, "sinks": sinks,
            "kv_sharing_target_layer_name": kv_sharing_target_layer_name,
        }
        for name, value in unsupported.items():
            if value is not None:
                raise NotImplementedError(f"SEPLLM does not support {name}={value!r}")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"SEPLLM supports decoder attention only, not {attn_type}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.fp8 = is_fp8_cache_dtype(kv_cache_dtype)
        self.flash = _flash_attn()
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        self.decode_kernel = decode_kernel_choice(
            torch.device(vllm_config.device_config.device), vllm_config)

    def do_kv_cache_update(self, layer: AttentionLayer, key: torch.Tensor,
                           value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """Write new keys/values [T, Hkv, D] into ``kv_cache`` at ``slot_mapping`` [T]
        (negative slots: CUDA-graph padding, skipped).

        On CUDA vLLM's ``reshape_and_cache_flash`` writes into strided K/V views of our
        [.., Hkv, 2D] layout with no host sync (graph-safe); the torch reference elsewhere."""
        kv_cache = compat.slot_major(kv_cache)
        if self.flash is not None and kv_cache.is_cuda:
            key_cache, value_cache = kv_cache.split(self.head_size, dim=-1)
            self.flash.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping,
                                         self.kv_cache_dtype, layer._k_scale, layer._v_scale)
            return
        write_kv(kv_cache, key, value, slot_mapping, layer._k_scale, layer._v_scale)

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: SepLLMMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """query [T, Hq, D], key/value [T, Hkv, D] (already in the cache), kv_cache
        [num_blocks, block_size, Hkv, 2D], output [T, Hq, D] (written in place)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("SEPLLM does not support fused output quantization")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        kv_cache = compat.slot_major(kv_cache)
        md = attn_metadata
        if md.decode_rows is None:
            return self._plain(layer, query, kv_cache, md, output)
        flat = kv_cache.view(-1, kv_cache.shape[2], kv_cache.shape[3])
        scales = (layer._k_scale, layer._v_scale)
        for row in md.prefills:
            k, v = split_kv(flat[row.slots], self.head_size, query.dtype, *scales)
            output[row.q_start:row.q_end] = masked_attention(
                query[row.q_start:row.q_end], k, v, row.mask, self.scale)
        if md.triton_prefill is not None:
            from kernels.prefill import sepllm_prefill

            tp = md.triton_prefill
            out = sepllm_prefill(query.index_select(0, tp.tokens), kv_cache, tp.block_table,
                                 tp.cache_lens, tp.query_start_loc, tp.positions, tp.meta,
                                 self.scale, max_query_len=tp.max_query_len,
                                 k_scale=layer._k_scale, v_scale=layer._v_scale)
            output.index_copy_(0, tp.tokens, out.to(output.dtype))
        if md.decode_rows.numel():
            q = query.index_select(0, md.decode_rows)
            if md.decode_slots is not None:  # torch
                out = decode_attention(q, flat, md.decode_slots, md.decode_valid, self.scale,
                                       *scales)
            else:
                out = torch.empty_like(q)
                cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
                self._paged_decode(layer, q, kv_cache, out, md, cu_q)
            output.index_copy_(0, md.decode_rows, out.to(output.dtype))
        return output

    def _plain(self, layer: AttentionLayer, query: torch.Tensor, kv_cache: torch.Tensor,
               md: SepLLMMetadata, output: torch.Tensor) -> torch.Tensor:
        """Every row's queries over its whole compacted cache (causal), written straight into
        ``output``: no host work (CUDA-graph safe); the only allocation outside the kernels is an
        fp8 cache's quantized queries for FA3, from the graph's memory pool."""
        n = md.num_actual_tokens
        self._paged_decode(layer, query[:n], kv_cache, output[:n], md, md.query_start_loc)
        return output

    def _paged_decode(self, layer: AttentionLayer, q: torch.Tensor, kv_cache: torch.Tensor,
                      out: torch.Tensor, md: SepLLMMetadata, cu_q: torch.Tensor) -> None:
        """q/out [T, Hq, D], the queries ``cu_q[i]:cu_q[i+1]`` of row i of
        ``md.decode_block_table`` / ``decode_cache_lens`` (one per row but with
        ``cache_size``), attending the row's whole cache causally (the compacted cache is
        exactly the visible set: no mask): vLLM's FlashAttention or our Triton kernel.

        An fp8 cache: FA3 reads e4m3 K/V with per-(row, KV head) descales and wants the
        queries in e4m3 too (quantized here with the layer's ``q_scale``, as vLLM's attention
        layer does for FLASH_ATTN); the Triton kernel keeps the queries as they are."""
        if (md.decode_kernel or self.decode_kernel) == "flash":
            key_cache, value_cache = kv_cache.split(self.head_size, dim=-1)
            descales = {}
            if self.fp8:
                key_cache, value_cache = key_cache.view(FP8), value_cache.view(FP8)
                q = quantize_fp8(q, layer._q_scale).view(FP8)
                shape = (cu_q.shape[0] - 1, self.num_kv_heads)
                descales = dict(q_descale=layer._q_scale.expand(shape),
                                k_descale=layer._k_scale.expand(shape),
                                v_descale=layer._v_scale.expand(shape))
            self.flash.varlen(
                q=q, k=key_cache, v=value_cache, out=out, cu_seqlens_q=cu_q,
                max_seqlen_q=md.max_query_len,
                seqused_k=md.decode_cache_lens, max_seqlen_k=md.decode_max_len,
                softmax_scale=self.scale, causal=True, block_table=md.decode_block_table,
                scheduler_metadata=md.scheduler_metadata, num_splits=md.num_splits or 0,
                fa_version=self.flash.version, **descales)
        else:
            from kernels.decode import sepllm_decode

            sepllm_decode(q, kv_cache, md.decode_block_table, md.decode_cache_lens, self.scale,
                          out=out, num_splits=md.num_splits, max_cache_len=md.decode_max_len,
                          k_scale=layer._k_scale, v_scale=layer._v_scale)
