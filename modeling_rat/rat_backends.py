"""How RAT and rnn layers compute: one table of backends, chosen once per forward.

Every backend offers the same five functions, so a mixer never branches on which one runs:

* `chunk_mixing(gates, value, key, query, cos, sin, scale, ...)`: the whole RAT mixing of a sequence on its grid of
  chunks (`rat_ops.chunk_mixing`), from the next two functions (`rat_ops.composed_chunk_mixing`) or, on the fast
  path with eager CPU tensors, as one blocked function that recomputes the states in its backward;
* `gated_chunk_scan(gates, value, key, initial_state)`: the intra-chunk recurrence of values and tiled keys;
* `chunk_attention(query, own_score, own_value, key_summaries, value_summaries, num_cached_chunks, scale)`: every
  token's single softmax over earlier chunk summaries and its own running summary;
* `decode_attention(...)`: the same for one new token per row, reading cached summaries in place;
* `linear_recurrence(gates, inputs, initial_state)`: the rnn layer's recurrence over whole sequences.

Backends: "reference" (plain PyTorch, obviously correct, slow: what the others are tested against), "fast"
(vectorised PyTorch, any device), "triton" (fused GPU kernels, `rat_triton.py`). `config.rat_implementation`
picks one; "auto" picks the fastest correct one for the device and says which, once.
"""

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.utils import logging

from .rat_ops import (
    chunk_attention,
    chunk_attention_reference,
    ChunkMixingOutput,
    chunk_mixing,
    composed_chunk_mixing,
    contain_summary_faults,
    decode_attention,
    decode_attention_reference,
    gated_chunk_scan,
    gated_chunk_scan_reference,
    linear_recurrence,
    linear_recurrence_reference,
)


logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class RatBackend:
    name: str
    gated_chunk_scan: Callable[..., torch.Tensor]
    chunk_attention: Callable[..., torch.Tensor]
    decode_attention: Callable[..., torch.Tensor]
    linear_recurrence: Callable[..., torch.Tensor]
    #: None: `composed_chunk_mixing` of this backend's scan and attention
    chunk_mixing: Callable[..., ChunkMixingOutput] | None = None

    def __post_init__(self):
        if self.chunk_mixing is None:
            composed = functools.partial(composed_chunk_mixing, self.gated_chunk_scan, self.chunk_attention)
            object.__setattr__(self, "chunk_mixing", composed)


def _fast_chunk_mixing(gates, value, *args, **kwargs):
    """
    The fused mixing (`rat_ops.chunk_mixing`) on eager CPU tensors; elsewhere the composed one. The fused function
    calls the CPU flash kernel directly and is opaque to tracing, so torch.compile and torch.export get the composed
    one.
    """
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        return chunk_mixing(gates, value, *args, **kwargs)
    return composed_chunk_mixing(gated_chunk_scan, chunk_attention, gates, value, *args, **kwargs)


REFERENCE = RatBackend(
    "reference",
    gated_chunk_scan=gated_chunk_scan_reference,
    chunk_attention=chunk_attention_reference,
    decode_attention=decode_attention_reference,
    linear_recurrence=linear_recurrence_reference,
)

FAST = RatBackend(
    "fast",
    gated_chunk_scan=gated_chunk_scan,
    chunk_attention=chunk_attention,
    decode_attention=decode_attention,
    linear_recurrence=linear_recurrence,
    chunk_mixing=_fast_chunk_mixing,
)


@functools.cache
def _triton_backend() -> RatBackend:
    from .rat_triton import TritonKernelError
    from .rat_triton import chunk_attention as triton_chunk_attention
    from .rat_triton import chunk_scan as triton_chunk_scan
    from .rat_triton import decode_attention as triton_decode_attention
    from .rat_triton import gated_chunk_scan as triton_gated_chunk_scan

    def with_fallback(kernel, pytorch_function):
        """The kernel, or the PyTorch function (and one log line) if the kernel cannot compile or launch here."""

        def run(*args, **kwargs):
            try:
                return kernel(*args, **kwargs)
            except TritonKernelError as error:
                if torch.compiler.is_compiling():
                    raise
                logger.warning_once(f"A RAT Triton kernel failed ({error}); RAT layers use the PyTorch path for it.")
                return pytorch_function(*args, **kwargs)

        return run

    def containing_faults(kernel):
        """
        The kernel given the inputs of `contain_summary_faults`: it multiplies the zero weights of summaries a query
        may not see by those summaries, and 0 * NaN is NaN, so a fault would reach earlier tokens otherwise.
        """

        def run(query, own_score, own_value, key_summaries, value_summaries, num_cached_chunks, scale):
            own_value, key_summaries, value_summaries = contain_summary_faults(
                own_value, key_summaries, value_summaries, num_cached_chunks
            )
            return kernel(query, own_score, own_value, key_summaries, value_summaries, num_cached_chunks, scale)

        return run

    return RatBackend(
        "triton",
        gated_chunk_scan=with_fallback(triton_gated_chunk_scan, gated_chunk_scan),
        chunk_attention=with_fallback(containing_faults(triton_chunk_attention), chunk_attention),
        decode_attention=with_fallback(triton_decode_attention, decode_attention),
        linear_recurrence=with_fallback(functools.partial(linear_recurrence, scan=triton_chunk_scan), linear_recurrence),
    )


def select_rat_backend(config, device: torch.device | str, dtype: torch.dtype | None = None) -> RatBackend:
    """
    The backend RAT layers use for activations of `dtype` on `device` (under autocast, its dtype counts): the one
    `config.rat_implementation` names, or for "auto" the Triton kernels on a CUDA GPU where they are fast and pass
    a one-time self-check (compile and launch), else "fast".
    """
    device = torch.device(device)
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    dtype = dtype or torch.float32
    requested = getattr(config, "rat_implementation", "auto")
    if requested == "reference":
        return REFERENCE
    if requested == "fast":
        return FAST
    from .rat_triton import triton_self_check, triton_unavailable_reason

    if requested == "triton":
        reason = triton_unavailable_reason(device, dtype, config.head_dim, automatic=False)
        if reason is not None:
            raise ValueError(f"rat_implementation='triton' cannot run here: {reason}. Use 'auto' or 'fast'.")
        return _triton_backend()
    if device.type == "cuda":
        reason = triton_unavailable_reason(device, dtype, config.head_dim, automatic=True)
        if reason is None and not torch.compiler.is_compiling():
            index = device.index if device.index is not None else torch.cuda.current_device()
            reason = triton_self_check(
                torch.device("cuda", index), dtype, config.num_attention_heads, config.head_dim,
                config.num_qk_groups, config.chunk_size,
            )
        if reason is None:
            _log_once(logger.info_once, "RAT layers run the Triton kernels (rat_implementation='auto' on CUDA).")
            return _triton_backend()
        _log_once(logger.warning_once, f"RAT layers run the fast PyTorch path on CUDA: {reason}.")
        return FAST
    _log_once(logger.info_once, "RAT layers run the fast PyTorch path (rat_implementation='auto' off CUDA).")
    return FAST


def _log_once(log, message: str):
    """Log outside torch.compile tracing only (a logging call inside a traced forward breaks the graph)."""
    if not torch.compiler.is_compiling():
        log(message)


__all__ = ["RatBackend", "REFERENCE", "FAST", "select_rat_backend"]
