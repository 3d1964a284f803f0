"""Replayed-text decoding for benchmarks: each request emits a given real-text continuation.

A throughput benchmark with dummy weights generates arbitrary tokens, and random tokens almost
never are separators, which would make SepLLM behave like StreamingLLM during decoding. This
vLLM V1 logits processor forces every request to emit a continuation chosen by the caller (the
real text that follows its prompt), so separators occur at their natural rate in generated
tokens too, whatever the weights. The model still runs every step in full; only the sampled
token is dictated.

Use (``logits_processors`` takes the class or its name ``"benchmarks.replay:ReplayLogitsProcessor"``;
the engine core process imports it, so it works with the multiprocessing engine)::

    np.save("conts.npy", conts)                      # int array [num_continuations, length]
    llm = LLM(model, logits_processors=[ReplayLogitsProcessor])
    SamplingParams(max_tokens=n, ignore_eos=True,
                   extra_args={"replay": {"file": "/abs/conts.npy", "row": k}})
    SamplingParams(..., extra_args={"replay": [17, 4, 9, ...]})   # or the ids themselves

A file keeps the request messages small (512 × 4,096 ids would be ~10 MB of IPC); it is read
once per process (memory-mapped). Token ``i`` of a request's output is forced to
``continuation[i]``; past the end of its continuation a request samples freely. Requests
without ``extra_args["replay"]`` are untouched.

How: ``update_state`` keeps, per batch row, the continuation and a reference to the request's
output-token list (vLLM's persistent batch passes the live list; its length is the index of
the token being sampled, also after preemption and with async scheduling, where not yet known
ids are ``-1`` placeholders). Each step it builds the target of every row (numpy, one pass over
the rows) and ships ``(rows, targets)`` to the device; ``apply`` then sets each forced row to
``-inf`` except its target (``0.0``): two indexed kernels over the batch, no per-row Python.
Not argmax-invariant (it changes greedy results), so vLLM applies it in greedy mode too.
Forcing the custom processor makes vLLM 0.26 pick its V1 model runner (V2 does not support
custom logits processors), for every backend alike.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from vllm import SamplingParams
from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

#: ``SamplingParams.extra_args`` key.
REPLAY_KEY = "replay"
#: Fully qualified name for ``LLM(logits_processors=[...])`` / ``--logits-processors``.
FQCN = "benchmarks.replay:ReplayLogitsProcessor"

_FILES: dict[str, np.ndarray] = {}


def _load(path: str) -> np.ndarray:
    """The continuation table in ``path`` (``.npy``, integer, 2-D), memory-mapped, cached."""
    table = _FILES.get(path)
    if table is None:
        if not os.path.isfile(path):
            raise ValueError(f"extra_args.replay.file: no such file {path!r}")
        table = np.load(path, mmap_mode="r")
        if table.ndim != 2 or table.dtype.kind not in "iu":
            raise ValueError(f"extra_args.replay.file: {path!r} must hold a 2-D integer array, "
                             f"got {table.ndim}-D {table.dtype}")
        _FILES[path] = table
    return table


def continuation_of(extra_args: dict[str, Any] | None) -> np.ndarray | None:
    """The continuation a request asks for (1-D int64), or None; ValueError naming the field
    for a malformed value."""
    if not extra_args or REPLAY_KEY not in extra_args:
        return None
    spec = extra_args[REPLAY_KEY]
    if isinstance(spec, dict):
        if set(spec) != {"file", "row"}:
            raise ValueError("extra_args.replay must be a list of token ids or "
                             f"{{'file': path, 'row': k}}, got keys {sorted(spec)}")
        table = _load(str(spec["file"]))
        row = spec["row"]
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < len(table):
            raise ValueError(f"extra_args.replay.row must be an integer in [0, {len(table)}), "
                             f"got {row!r}")
        return np.asarray(table[row], dtype=np.int64)
    if isinstance(spec, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in spec):
        return np.asarray(spec, dtype=np.int64)
    raise ValueError("extra_args.replay must be a list of non-negative token ids or "
                     f"{{'file': path, 'row': k}}, got {type(spec).__name__}")


class ReplayLogitsProcessor(LogitsProcessor):
    """Forces each request's output tokens to its continuation (see the module docstring).

    State per persistent-batch row ``i``: ``conts[i]`` (int64 array ``[L_i]`` or None) and
    ``outs[i]`` (the request's live output-token list). Per step: ``rows`` (int64 ``[R]``,
    forced rows) and ``targets`` (int64 ``[R]``) on the logits' device.
    """

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        continuation_of(sampling_params.extra_args)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        n = vllm_config.scheduler_config.max_num_seqs
        self.device = torch.device(device)
        self.pin = bool(is_pin_memory) and self.device.type != "cpu"
        self.conts: list[np.ndarray | None] = [None] * n
        self.outs: list[list[int] | None] = [None] * n
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        self.batch_size = 0
        self.num_forced = 0  # rows with a continuation
        self.rows = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.targets = torch.zeros(0, dtype=torch.int64, device=self.device)

    def is_argmax_invariant(self) -> bool:
        return False

    # ------------------------------------------------------------------ bookkeeping
    def _set(self, i: int, cont: np.ndarray | None, out: list[int] | None) -> None:
        self.num_forced += (cont is not None) - (self.conts[i] is not None)
        self.conts[i], self.outs[i] = cont, out

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            # vLLM's order: removed, added, moved.
            for i in batch_update.removed:
                self._set(i, None, None)
            for i, params, _prompt, out in batch_update.added:
                cont = continuation_of(params.extra_args) if params is not None else None
                if cont is not None and len(cont) and int(cont.max()) >= self.vocab_size:
                    raise ValueError(f"extra_args.replay: token id {int(cont.max())} is outside "
                                     f"the vocabulary (size {self.vocab_size})")
                self._set(i, cont, out if cont is not None else None)
            for a, b, direction in batch_update.moved:
                ca, oa = self.conts[a], self.outs[a]
                if direction == MoveDirectionality.SWAP:
                    cb, ob = self.conts[b], self.outs[b]
                    self.conts[a], self.outs[a] = cb, ob
                    self.conts[b], self.outs[b] = ca, oa
                else:  # a -> b; b's request is gone (removed or overwritten), a is empty
                    self._set(b, ca, oa)
                    self._set(a, None, None)
            self.batch_size = batch_update.batch_size
        if not self.num_forced:
            self.rows = self.rows[:0]
            return
        rows: list[int] = []
        targets: list[int] = []
        for i in range(self.batch_size):
            cont = self.conts[i]
            if cont is not None:
                k = len(self.outs[i])  # index of the token sampled this step
                if k < len(cont):
                    rows.append(i)
                    targets.append(cont[k])
        both = torch.tensor([rows, targets], dtype=torch.int64)
        if self.pin:
            both = both.pin_memory()
        both = both.to(self.device, non_blocking=True)
        self.rows, self.targets = both[0], both[1]

    # ------------------------------------------------------------------ per step
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits``: ``[batch, vocab]``; forced rows become ``-inf`` except the target."""
        if self.rows.numel():
            logits.index_fill_(0, self.rows, float("-inf"))
            logits.index_put_((self.rows, self.targets),
                              torch.zeros((), dtype=logits.dtype, device=logits.device))
        return logits
