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

How: ``update_state`` keeps, per batch row, the continuation (a row of a numpy buffer) and a
reference to the request's output-token list (vLLM's persistent batch passes the live list; its
length is the index of the token being sampled, also after preemption and with async
scheduling, where not yet known ids are ``-1`` placeholders). Each step it gathers every row's
target with numpy (``buf[rows, len(out)]``; per-row Python only on batch changes) and ships
``(rows, targets)`` to the device; ``apply`` then sets each forced row to
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

    State per persistent-batch row ``i``: ``buf[i, :clen[i]]`` (its continuation; ``clen[i]``
    is 0 for a row that is not forced) and ``outs[i]`` (the request's live output-token list).
    Per step: ``rows`` (int64 ``[R]``, forced rows) and ``targets`` (int64 ``[R]``) on the
    logits' device.
    """

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        continuation_of(sampling_params.extra_args)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        n = vllm_config.scheduler_config.max_num_seqs
        self.device = torch.device(device)
        self.pin = bool(is_pin_memory) and self.device.type != "cpu"
        self.buf = np.zeros((n, 64), dtype=np.int64)  # widened on demand
        self.clen = np.zeros(n, dtype=np.int64)
        self.outs: list = [_NO_OUTPUT] * n
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        self.batch_size = 0
        self.num_forced = 0  # rows with a continuation
        self.rows = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.targets = torch.zeros(0, dtype=torch.int64, device=self.device)

    def is_argmax_invariant(self) -> bool:
        return False

    # ------------------------------------------------------------------ bookkeeping
    def _clear(self, i: int) -> None:
        self.num_forced -= bool(self.clen[i])
        self.clen[i] = 0
        self.outs[i] = _NO_OUTPUT

    def _add(self, i: int, cont: np.ndarray, out: list[int]) -> None:
        self._clear(i)
        if len(cont) > self.buf.shape[1]:
            wider = np.zeros((self.buf.shape[0], max(len(cont), 2 * self.buf.shape[1])),
                             dtype=np.int64)
            wider[:, :self.buf.shape[1]] = self.buf
            self.buf = wider
        self.buf[i, :len(cont)] = cont
        self.clen[i] = len(cont)
        self.outs[i] = out
        self.num_forced += bool(len(cont))

    def _move(self, a: int, b: int) -> None:
        """Row a's request moves to row b (b's request is gone); row a becomes empty."""
        self._clear(b)
        self.buf[b] = self.buf[a]
        self.clen[b], self.outs[b] = self.clen[a], self.outs[a]
        self.clen[a], self.outs[a] = 0, _NO_OUTPUT

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            # vLLM's order: removed, added, moved.
            for i in batch_update.removed:
                self._clear(i)
            for i, params, _prompt, out in batch_update.added:
                cont = continuation_of(params.extra_args) if params is not None else None
                if cont is None:
                    self._clear(i)
                    continue
                if len(cont) and int(cont.max()) >= self.vocab_size:
                    raise ValueError(f"extra_args.replay: token id {int(cont.max())} is outside "
                                     f"the vocabulary (size {self.vocab_size})")
                self._add(i, cont, out)
            for a, b, direction in batch_update.moved:
                if direction == MoveDirectionality.SWAP:
                    self.buf[[a, b]] = self.buf[[b, a]]
                    self.clen[[a, b]] = self.clen[[b, a]]
                    self.outs[a], self.outs[b] = self.outs[b], self.outs[a]
                else:
                    self._move(a, b)
            self.batch_size = batch_update.batch_size
        if not self.num_forced:
            self.rows = self.rows[:0]
            return
        n = self.batch_size
        # Index of the token sampled this step = tokens generated so far.
        done = np.fromiter(map(len, self.outs[:n]), dtype=np.int64, count=n)
        rows = np.flatnonzero(done < self.clen[:n])
        both = torch.from_numpy(np.stack([rows, self.buf[rows, done[rows]]]))
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


#: ``outs`` entry of a row without a continuation (its length is never compared: clen is 0).
_NO_OUTPUT: tuple = ()
