"""Triton kernels of the RAT mixer: the gated intra-chunk scan and the inter-chunk attention, forward and backward.

They offer the signatures and semantics of the PyTorch functions of `rat_ops`, so the model can switch between the
PyTorch path and these kernels (`rat_implementation="triton"`, or `"auto"` on capable GPUs):

* `gated_chunk_scan(gates, value, key, initial_state)`: the RAT recurrence `h_l = f_l * h_{l-1} + (1 - f_l) * x_l`
  inside every chunk, for the value and the key tiled over the heads, from the forget gate and the raw streams: the
  gated inputs are formed in registers, never in memory. One program holds a whole chunk (all its steps, all the
  copies of a block of key features) and runs the recurrence as an associative scan. The backward recomputes the
  states from the saved gate, value and key (autograd keeps no state) and runs the reverse scan. fp32 throughout.
* `chunk_attention(query, own_score, own_value, key_summaries, value_summaries, history_count, scale)`: every token's
  ONE softmax over its own running summary, the valid history slots of its row and the summaries of earlier chunks
  of the call. An online-softmax ("flash") kernel over the summaries; the own term seeds the running max, sum and
  accumulator, so it is merged inside the kernel and no row is ever empty. The forward also returns the
  log-sum-exp, from which the backward recomputes the probabilities (two kernels: one per block of queries for the
  query-side gradients, one per block of summaries for the key and value gradients, without atomics). Problems with
  few queries per (row, head) use a kernel with one program per query row.
* `decode_attention(query, own_score, own_value, key_summaries, value_summaries, history_count, scale)`: one new
  token per row over the cached summaries (the decode step), on the one-program-per-query kernel.
* `chunk_scan(gates, inputs, initial_state)`: the ungated scan `h_l = gates_l * h_{l-1} + inputs_l` of S streams.

The functions are `torch.library` custom ops with registered autograd and fake (meta) implementations that give
the real outputs' shapes, dtypes and strides, so `torch.compile` (inductor included) traces through them.

Which machines: `triton_unavailable_reason(device, dtype, head_dim, automatic=...)` says why the kernels should not
run (None when they may); `triton_self_check(...)` compiles and launches every kernel once on a tiny problem. A
kernel that cannot be compiled or launched raises `TritonKernelError`. Every launch runs on the device of its
tensors, on a 1-D grid (any number of rows), with 64-bit offsets (sequences of any length).

Without a GPU the kernels run on CPU tensors under Triton's interpreter: set `TRITON_INTERPRET=1` before this module
is imported (the kernels are built at import). Importing this module never fails when triton is missing; calling
the kernels then raises a clear error.
"""

import contextlib
import functools
import re

import torch


try:
    import triton
    import triton.language as tl
    from triton.errors import TritonError

    TRITON_IMPORT_ERROR = None
except ImportError as error:  # the module stays importable; `triton_unavailable_reason` says why it cannot run
    triton, tl, TritonError = None, None, None
    TRITON_IMPORT_ERROR = error


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# GPUs "auto" picks the kernels on: from sm_80 (A100) their 16-bit products run on tensor cores; Triton compiles them
# to FMA loops with large stacks on sm_70/sm_75.
MIN_CAPABILITY = (8, 0)
# Largest head size the attention tiles hold in registers (the backward key kernel keeps two (summaries x head)
# fp32 accumulators): `scripts/compile_triton_kernels.py` reports no spill up to it.
MAX_HEAD_DIM = 128
# CUDA's limits on the grid of one launch (x, y, z).
CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)
LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the kernels work in base 2
LN_2 = 0.6931471805599453  # log(x) = log2(x) * ln(2)

# Query rows per (row, head) up to which the attention forward uses one program per query row (the decode kernel).
ROW_KERNEL_MAX_ROWS = 8

# Names of the custom ops: the module may be loaded twice in one process (installed package and a copy next to a
# checkpoint loaded with trust_remote_code), and each copy must register its own ops.
_LIBRARY = re.sub(r"\W", "_", __name__)


class TritonKernelError(RuntimeError):
    """A kernel of this module could not be compiled or launched on this machine (the inputs were valid)."""


# ================================================================================================== kernels

if triton is not None:
    _LOG2_E = tl.constexpr(LOG2_E)
    _LN_2 = tl.constexpr(LN_2)

    @triton.jit
    def _and(block_mask, condition):
        """`block_mask & condition` for a scalar condition (Triton's interpreter mistypes `block & scalar` masks)."""
        return tl.where(condition, block_mask, False)

    # ------------------------------------------------------------------------------------ gated chunk scan
    #
    # One program: one chunk (flat index n * C + c), one block of BLOCK_J key features j, and all the H / G copies of
    # them: hidden feature copy * key_width + j, where the tiled key reads key feature j. Tiles are
    # (steps, copies, key features), the whole chunk at once, so the recurrence is an associative scan over axis 0.

    @triton.jit
    def _linear_combine(gate_a, value_a, key_a, gate_b, value_b, key_b):
        """Step a then step b of `h -> gate * h + input` (two streams sharing the gate) as one step."""
        return gate_a * gate_b, gate_b * value_a + value_b, gate_b * key_a + key_b

    @triton.jit
    def _scan_tile_coordinates(key_width, COPIES: tl.constexpr, BLOCK_COPIES: tl.constexpr, BLOCK_J: tl.constexpr):
        """(chunk as int64, key features j (1, J), hidden features (copies, J) and their mask) of this program."""
        num_key_blocks = tl.cdiv(key_width, BLOCK_J)
        program = tl.program_id(0)
        chunk = (program // num_key_blocks).to(tl.int64)
        j = (program % num_key_blocks) * BLOCK_J + tl.arange(0, BLOCK_J)[None, :]
        copies = tl.arange(0, BLOCK_COPIES)[:, None]
        return chunk, j, copies * key_width + j, (copies < COPIES) & (j < key_width)

    @triton.jit
    def _load_scan_tile(gates_ptr, value_ptr, key_ptr, chunk, steps, j, features, feature_mask, shift,
                        chunk_size, hidden_size, key_width):
        """
        Gate, value (steps, copies, J) and key (steps, 1, J) in fp32 at steps `steps + shift` of the chunk: outside
        the chunk the gate is 1 and the inputs 0, the identity step of the recurrence.
        """
        shifted = steps + shift
        step_mask = (shifted >= 0) & (shifted < chunk_size)
        tokens = chunk * chunk_size + shifted  # int64
        mask = step_mask & feature_mask[None, :, :]
        offsets = tokens * hidden_size + features[None, :, :]
        gate = tl.load(gates_ptr + offsets, mask=mask, other=1.0).to(tl.float32)
        value = tl.load(value_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        key = tl.load(key_ptr + tokens * key_width + j[None, :, :], mask=step_mask & (j < key_width)[None, :, :],
                      other=0.0).to(tl.float32)
        return gate, value, key

    @triton.jit
    def _scan_states(gate, value, key):
        """(decay = product of the gates so far, value states, key states) from zero: h_l = f_l h_{l-1} + (1-f_l) x_l."""
        input_gate = 1.0 - gate
        return tl.associative_scan((gate, input_gate * value, input_gate * key), 0, _linear_combine)

    @triton.jit
    def _add_initial_state(value_state, key_state, decay, initial_ptr, chunk, num_chunks, hidden_size, features,
                           feature_mask):
        """States of chunk 0 of each row start from the initial state: h_l += (f_0 ... f_l) h_init."""
        offsets = (chunk // num_chunks) * 2 * hidden_size + features[None, :, :]
        mask = _and(feature_mask[None, :, :], (chunk % num_chunks) == 0)
        value_state += decay * tl.load(initial_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        key_state += decay * tl.load(initial_ptr + offsets + hidden_size, mask=mask, other=0.0).to(tl.float32)
        return value_state, key_state

    @triton.jit(do_not_specialize=["num_chunks"])
    def _gated_scan_forward_kernel(
        gates_ptr,  # (N * C, L, D), the forget gate
        value_ptr,  # (N * C, L, D)
        key_ptr,  # (N * C, L, G * d), tiled over the H / G copies
        initial_ptr,  # (N, 2, D) (unused without HAS_INITIAL)
        states_ptr,  # (N * C, L, 2, D) fp32 output: value and key states
        num_chunks,
        chunk_size,
        hidden_size,
        key_width,
        COPIES: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_COPIES: tl.constexpr,
        BLOCK_J: tl.constexpr,
        HAS_INITIAL: tl.constexpr,
    ):
        """The states of one chunk's tile: the gated inputs formed in registers, then one associative scan."""
        chunk, j, features, feature_mask = _scan_tile_coordinates(key_width, COPIES, BLOCK_COPIES, BLOCK_J)
        steps = tl.arange(0, BLOCK_L)[:, None, None]
        gate, value, key = _load_scan_tile(gates_ptr, value_ptr, key_ptr, chunk, steps, j, features, feature_mask, 0,
                                           chunk_size, hidden_size, key_width)
        decay, value_state, key_state = _scan_states(gate, value, key)
        if HAS_INITIAL:
            value_state, key_state = _add_initial_state(value_state, key_state, decay, initial_ptr, chunk, num_chunks,
                                                        hidden_size, features, feature_mask)
        state_offsets = (chunk * chunk_size + steps) * 2 * hidden_size + features[None, :, :]
        mask = (steps < chunk_size) & feature_mask[None, :, :]
        tl.store(states_ptr + state_offsets, value_state, mask=mask)
        tl.store(states_ptr + state_offsets + hidden_size, key_state, mask=mask)

    @triton.jit(do_not_specialize=["num_chunks"])
    def _gated_scan_backward_kernel(
        grad_states_ptr,  # (N * C, L, 2, D)
        gates_ptr, value_ptr, key_ptr, initial_ptr,  # the forward's inputs
        grad_gates_ptr, grad_value_ptr, grad_key_ptr, grad_initial_ptr,  # outputs, in the inputs' dtypes
        num_chunks,
        chunk_size,
        hidden_size,
        key_width,
        COPIES: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_COPIES: tl.constexpr,
        BLOCK_J: tl.constexpr,
        HAS_INITIAL: tl.constexpr,
    ):
        """
        With g_l the gradient reaching state l (from the output and from state l + 1): g_l = G_l + f_{l+1} g_{l+1}
        (a reverse scan); d x_l = (1 - f_l) g_l, summed over the copies for the key; d f_l = sum over the streams of
        g_l (h_{l-1} - x_l); d h_init = f_0 g_0. The states before each step, h_{l-1}, are recomputed: the scan of the
        inputs shifted by one step.
        """
        chunk, j, features, feature_mask = _scan_tile_coordinates(key_width, COPIES, BLOCK_COPIES, BLOCK_J)
        steps = tl.arange(0, BLOCK_L)[:, None, None]
        gate, value, key = _load_scan_tile(gates_ptr, value_ptr, key_ptr, chunk, steps, j, features, feature_mask, 0,
                                           chunk_size, hidden_size, key_width)
        gate_before, value_before, key_before = _load_scan_tile(
            gates_ptr, value_ptr, key_ptr, chunk, steps, j, features, feature_mask, -1, chunk_size, hidden_size, key_width
        )
        decay, value_state, key_state = _scan_states(gate_before, value_before, key_before)  # h_{l-1}
        if HAS_INITIAL:
            value_state, key_state = _add_initial_state(value_state, key_state, decay, initial_ptr, chunk, num_chunks,
                                                        hidden_size, features, feature_mask)

        state_offsets = (chunk * chunk_size + steps) * 2 * hidden_size + features[None, :, :]
        mask = (steps < chunk_size) & feature_mask[None, :, :]
        grad_value_state = tl.load(grad_states_ptr + state_offsets, mask=mask, other=0.0).to(tl.float32)
        grad_key_state = tl.load(grad_states_ptr + state_offsets + hidden_size, mask=mask, other=0.0).to(tl.float32)
        gate_after, _, _ = _load_scan_tile(gates_ptr, value_ptr, key_ptr, chunk, steps, j, features, feature_mask, 1,
                                           chunk_size, hidden_size, key_width)
        _, value_carried, key_carried = tl.associative_scan(
            (gate_after, grad_value_state, grad_key_state), 0, _linear_combine, reverse=True
        )

        input_gate = 1.0 - gate
        token_offsets = (chunk * chunk_size + steps) * hidden_size + features[None, :, :]
        grad_gate = value_carried * (value_state - value) + key_carried * (key_state - key)
        tl.store(grad_gates_ptr + token_offsets, grad_gate.to(grad_gates_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_value_ptr + token_offsets, (input_gate * value_carried).to(grad_value_ptr.dtype.element_ty),
                 mask=mask)
        grad_key = tl.sum(input_gate * key_carried, axis=1)  # (L, J): over the copies of each key feature
        key_steps = tl.arange(0, BLOCK_L)[:, None]
        tl.store(grad_key_ptr + (chunk * chunk_size + key_steps) * key_width + j,
                 grad_key.to(grad_key_ptr.dtype.element_ty), mask=(key_steps < chunk_size) & (j < key_width))
        if HAS_INITIAL:
            initial_offsets = (chunk // num_chunks) * 2 * hidden_size + features
            initial_mask = _and(feature_mask, (chunk % num_chunks) == 0)
            grad_initial_value = tl.sum(tl.where(steps == 0, gate * value_carried, 0.0), axis=0)  # (copies, J)
            grad_initial_key = tl.sum(tl.where(steps == 0, gate * key_carried, 0.0), axis=0)
            tl.store(grad_initial_ptr + initial_offsets, grad_initial_value.to(grad_initial_ptr.dtype.element_ty),
                     mask=initial_mask)
            tl.store(grad_initial_ptr + initial_offsets + hidden_size,
                     grad_initial_key.to(grad_initial_ptr.dtype.element_ty), mask=initial_mask)

    # --------------------------------------------------------------------------------------- ungated scan

    @triton.jit(do_not_specialize=["num_chunks", "chunk_size"])
    def _chunk_scan_forward_kernel(
        gates_ptr,  # (N * C, L, F), contiguous
        inputs_ptr,  # (N * C, L, S, F), contiguous
        initial_ptr,  # (N, S, F), contiguous (unused without HAS_INITIAL)
        states_ptr,  # (N * C, L, S, F) fp32 output
        num_chunks,
        chunk_size,
        num_features,
        NUM_STREAMS: tl.constexpr,
        BLOCK_STREAMS: tl.constexpr,
        BLOCK_FEATURES: tl.constexpr,
        HAS_INITIAL: tl.constexpr,
    ):
        """One program: one chunk, one block of features, all streams. Walks the chunk's L steps in order."""
        chunk = tl.program_id(0).to(tl.int64)  # flat index n * C + c
        features = tl.program_id(1) * BLOCK_FEATURES + tl.arange(0, BLOCK_FEATURES)
        streams = tl.arange(0, BLOCK_STREAMS)
        feature_mask = features < num_features
        mask = (streams[:, None] < NUM_STREAMS) & feature_mask[None, :]
        stream_offsets = streams[:, None] * num_features + features[None, :]  # inside one (chunk, step)
        step_stride = NUM_STREAMS * num_features

        state = tl.zeros((BLOCK_STREAMS, BLOCK_FEATURES), dtype=tl.float32)
        if HAS_INITIAL:  # chunk 0 of each row starts from the initial state
            row = chunk // num_chunks
            is_first_chunk = (chunk % num_chunks) == 0
            initial = tl.load(initial_ptr + row * step_stride + stream_offsets, mask=_and(mask, is_first_chunk), other=0.0)
            state = initial.to(tl.float32)

        # Pointers to step 0 of the chunk, advanced by one step per iteration.
        gate_pointers = gates_ptr + chunk * chunk_size * num_features + features
        input_pointers = inputs_ptr + chunk * chunk_size * step_stride + stream_offsets
        state_pointers = states_ptr + chunk * chunk_size * step_stride + stream_offsets
        for _ in range(0, chunk_size):
            gate = tl.load(gate_pointers, mask=feature_mask, other=0.0).to(tl.float32)
            update = tl.load(input_pointers, mask=mask, other=0.0).to(tl.float32)
            state = gate[None, :] * state + update
            tl.store(state_pointers, state, mask=mask)
            gate_pointers += num_features
            input_pointers += step_stride
            state_pointers += step_stride

    @triton.jit(do_not_specialize=["num_chunks", "chunk_size"])
    def _chunk_scan_backward_kernel(
        grad_states_ptr,  # (N * C, L, S, F), contiguous
        gates_ptr,  # (N * C, L, F)
        states_ptr,  # (N * C, L, S, F) fp32, the forward's output
        initial_ptr,  # (N, S, F)
        grad_gates_ptr,  # (N * C, L, F) output, dtype of the gates
        grad_inputs_ptr,  # (N * C, L, S, F) output, dtype of the inputs
        grad_initial_ptr,  # (N, S, F) output, dtype of the initial state
        num_chunks,
        chunk_size,
        num_features,
        NUM_STREAMS: tl.constexpr,
        BLOCK_STREAMS: tl.constexpr,
        BLOCK_FEATURES: tl.constexpr,
        HAS_INITIAL: tl.constexpr,
    ):
        """
        Reverse scan. With g_l the gradient reaching state l from the output and from state l + 1:
        g_l = grad_l + gate_{l+1} * g_{l+1};  d input_l = g_l;  d gate_l = sum over streams of g_l * h_{l-1}
        (h_{-1}: the initial state for chunk 0, else 0);  d initial = gate_0 * g_0 (chunk 0).
        """
        chunk = tl.program_id(0).to(tl.int64)
        features = tl.program_id(1) * BLOCK_FEATURES + tl.arange(0, BLOCK_FEATURES)
        streams = tl.arange(0, BLOCK_STREAMS)
        feature_mask = features < num_features
        mask = (streams[:, None] < NUM_STREAMS) & feature_mask[None, :]
        stream_offsets = streams[:, None] * num_features + features[None, :]
        step_stride = NUM_STREAMS * num_features
        row = chunk // num_chunks
        is_first_chunk = (chunk % num_chunks) == 0

        # Pointers to the chunk's last step, moved back by one step per iteration.
        last_step = chunk * chunk_size + chunk_size - 1
        gate_pointers = gates_ptr + last_step * num_features + features
        grad_gate_pointers = grad_gates_ptr + last_step * num_features + features
        grad_pointers = grad_states_ptr + last_step * step_stride + stream_offsets
        grad_input_pointers = grad_inputs_ptr + last_step * step_stride + stream_offsets
        previous_pointers = states_ptr + (last_step - 1) * step_stride + stream_offsets  # state h_{l-1}
        carried = tl.zeros((BLOCK_STREAMS, BLOCK_FEATURES), dtype=tl.float32)
        next_gate = tl.zeros((BLOCK_FEATURES,), dtype=tl.float32)  # gate of step l + 1 (none after the last)
        for _ in range(0, chunk_size - 1):  # steps L-1 .. 1, whose previous state is a stored one
            grad = tl.load(grad_pointers, mask=mask, other=0.0).to(tl.float32)
            carried = grad + next_gate[None, :] * carried
            tl.store(grad_input_pointers, carried, mask=mask)
            previous = tl.load(previous_pointers, mask=mask, other=0.0)
            tl.store(grad_gate_pointers, tl.sum(carried * previous, axis=0), mask=feature_mask)
            next_gate = tl.load(gate_pointers, mask=feature_mask, other=0.0).to(tl.float32)
            gate_pointers -= num_features
            grad_gate_pointers -= num_features
            grad_pointers -= step_stride
            grad_input_pointers -= step_stride
            previous_pointers -= step_stride
        # Step 0: its previous state is the initial state (chunk 0 of a row, when given) or zero.
        grad = tl.load(grad_pointers, mask=mask, other=0.0).to(tl.float32)
        carried = grad + next_gate[None, :] * carried
        tl.store(grad_input_pointers, carried, mask=mask)
        grad_gate = tl.zeros((BLOCK_FEATURES,), dtype=tl.float32)
        if HAS_INITIAL:
            initial_offsets = row * step_stride + stream_offsets
            initial = tl.load(initial_ptr + initial_offsets, mask=_and(mask, is_first_chunk), other=0.0)
            grad_gate = tl.sum(carried * initial.to(tl.float32), axis=0)
            first_gate = tl.load(gate_pointers, mask=feature_mask, other=0.0).to(tl.float32)
            tl.store(grad_initial_ptr + initial_offsets, first_gate[None, :] * carried, mask=_and(mask, is_first_chunk))
        tl.store(grad_gate_pointers, grad_gate, mask=feature_mask)

    # ------------------------------------------------------------------------------------- chunk attention
    #
    # Query rows. For one (row n, head h), the L * C queries are numbered chunk-major: query row r is token
    # l = r % L of query chunk i = r // L. Query chunk i sees the history slots j < history_count[n] (key index j)
    # and the new summaries k < i (key index P + k), so the queries that see new summary k are exactly the rows
    # r >= (k + 1) * L: chunk causality becomes a contiguous range, as in causal attention.
    #
    # Scores are kept in base 2: s = (q . k) * scale * log2(e), so that exp2 gives the softmax; the stored
    # log-sum-exp is in natural units (lse = log sum exp(scale * q . k)). Offsets are int64: one long sequence's
    # tensors pass 2^31 elements (about 1M tokens at D 2048).

    @triton.jit
    def _row_offsets(n, h, rows, chunk_size, stride_n, stride_l, stride_h, stride_c):
        """int64 offsets of query rows `rows` of (row n, head h) in an (N, L, H, C, ...) tensor."""
        rows = rows.to(tl.int64)
        return n * stride_n + h * stride_h + (rows % chunk_size) * stride_l + (rows // chunk_size) * stride_c

    @triton.jit
    def _slot_offsets(n, h, slots, dims, stride_n, stride_h, stride_k, stride_d):
        """int64 offsets of the (slots, dims) tile of (row n, head h) in an (N, H, P + C - 1, d) tensor."""
        return n * stride_n + h * stride_h + slots.to(tl.int64)[:, None] * stride_k + dims.to(tl.int64)[None, :] * stride_d

    @triton.jit
    def _history_count(history_count_ptr, n, num_history):
        """Valid history slots of row n, clamped to [0, P]."""
        return tl.minimum(tl.maximum(tl.load(history_count_ptr + n).to(tl.int32), 0), num_history)

    @triton.jit
    def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """tl.dot with fp32 accumulation. UPCAST: compute from fp32 copies of bf16 operands (exact products), for
        Triton's interpreter, whose tl.dot multiplies the raw bits of bfloat16 (triton-lang/triton#11584)."""
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=PRECISION, out_dtype=tl.float32)

    @triton.jit
    def _attention_block_update(
        query, keys, values, valid, running_max, running_sum, accumulator, qk_scale,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One online-softmax step of a block of queries (M, D) over a block of summaries (N, D)."""
        scores = _dot(query, tl.trans(keys), UPCAST, PRECISION) * qk_scale
        scores = tl.where(valid, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp2(running_max - new_max)
        probabilities = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(probabilities, axis=1)
        accumulator = accumulator * correction[:, None] + _dot(
            probabilities.to(values.dtype), values, UPCAST, PRECISION
        )
        return new_max, running_sum, accumulator

    @triton.jit(do_not_specialize=["num_chunks", "num_history"])
    def _chunk_attention_forward_kernel(
        query_ptr, own_score_ptr, own_value_ptr, keys_ptr, values_ptr, history_count_ptr, out_ptr, lse_ptr,
        stride_qn, stride_ql, stride_qh, stride_qc, stride_qd,
        stride_sn, stride_sl, stride_sh, stride_sc,
        stride_vn, stride_vl, stride_vh, stride_vc, stride_vd,
        stride_kn, stride_kh, stride_kk, stride_kd,
        stride_un, stride_uh, stride_uk, stride_ud,  # value summaries
        stride_on, stride_ol, stride_oh, stride_oc, stride_od,
        num_heads, chunk_size, num_chunks, num_history, head_dim, qk_scale,
        HAS_HISTORY: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One program: BLOCK_M query rows of one (row, head) against all the summaries they see."""
        num_rows = chunk_size * num_chunks
        num_row_blocks = tl.cdiv(num_rows, BLOCK_M)
        program = tl.program_id(0)
        row_head = program // num_row_blocks
        row_block = num_row_blocks - 1 - program % num_row_blocks  # the latest queries, which see most, first
        n = (row_head // num_heads).to(tl.int64)
        h = (row_head % num_heads).to(tl.int64)
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < num_rows
        query_chunk = rows // chunk_size
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < head_dim
        tile_mask = row_mask[:, None] & dim_mask[None, :]

        query = tl.load(query_ptr + _row_offsets(n, h, rows, chunk_size, stride_qn, stride_ql, stride_qh, stride_qc)[:, None]
                        + dims[None, :] * stride_qd, mask=tile_mask, other=0.0)
        own_score = tl.load(own_score_ptr + _row_offsets(n, h, rows, chunk_size, stride_sn, stride_sl, stride_sh, stride_sc),
                            mask=row_mask, other=0.0).to(tl.float32)
        own_value = tl.load(
            own_value_ptr + _row_offsets(n, h, rows, chunk_size, stride_vn, stride_vl, stride_vh, stride_vc)[:, None]
            + dims[None, :] * stride_vd, mask=tile_mask, other=0.0,
        ).to(tl.float32)
        # The own term seeds the online softmax: max = its score, sum = 1, accumulator = its value.
        running_max = own_score * qk_scale
        running_sum = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        accumulator = own_value

        # History slots j < history_count[n]: seen by every query of the row.
        if HAS_HISTORY:
            history_count = _history_count(history_count_ptr, n, num_history)
            for start in range(0, history_count, BLOCK_N):
                slots = start + tl.arange(0, BLOCK_N)
                slot_mask = slots < history_count
                key_mask = slot_mask[:, None] & dim_mask[None, :]
                keys = tl.load(keys_ptr + _slot_offsets(n, h, slots, dims, stride_kn, stride_kh, stride_kk, stride_kd),
                               mask=key_mask, other=0.0)
                values = tl.load(values_ptr + _slot_offsets(n, h, slots, dims, stride_un, stride_uh, stride_uk, stride_ud),
                                 mask=key_mask, other=0.0)
                running_max, running_sum, accumulator = _attention_block_update(
                    query, keys, values, slot_mask[None, :], running_max, running_sum, accumulator, qk_scale,
                    UPCAST, PRECISION,
                )
        # New summaries k < i (key index P + k): this block's last query chunk sees k < last_chunk.
        last_chunk = tl.minimum((row_block * BLOCK_M + BLOCK_M - 1) // chunk_size, num_chunks - 1)
        for start in range(0, last_chunk, BLOCK_N):
            summaries = start + tl.arange(0, BLOCK_N)
            key_mask = (summaries < last_chunk)[:, None] & dim_mask[None, :]
            slots = num_history + summaries
            keys = tl.load(keys_ptr + _slot_offsets(n, h, slots, dims, stride_kn, stride_kh, stride_kk, stride_kd),
                           mask=key_mask, other=0.0)
            values = tl.load(values_ptr + _slot_offsets(n, h, slots, dims, stride_un, stride_uh, stride_uk, stride_ud),
                             mask=key_mask, other=0.0)
            running_max, running_sum, accumulator = _attention_block_update(
                query, keys, values, summaries[None, :] < query_chunk[:, None], running_max, running_sum, accumulator,
                qk_scale, UPCAST, PRECISION,
            )

        out = accumulator / running_sum[:, None]
        tl.store(out_ptr + _row_offsets(n, h, rows, chunk_size, stride_on, stride_ol, stride_oh, stride_oc)[:, None]
                 + dims[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=tile_mask)
        lse = (running_max + tl.log2(running_sum)) * _LN_2  # natural log-sum-exp
        tl.store(lse_ptr + row_head.to(tl.int64) * num_rows + rows, lse, mask=row_mask)

    @triton.jit(do_not_specialize=["num_chunks", "num_history", "chunk_size"])
    def _chunk_attention_rows_kernel(
        query_ptr, own_score_ptr, own_value_ptr, keys_ptr, values_ptr, history_count_ptr, out_ptr, lse_ptr,
        stride_qn, stride_ql, stride_qh, stride_qc, stride_qd,
        stride_sn, stride_sl, stride_sh, stride_sc,
        stride_vn, stride_vl, stride_vh, stride_vc, stride_vd,
        stride_kn, stride_kh, stride_kk, stride_kd,
        stride_un, stride_uh, stride_uk, stride_ud,
        stride_on, stride_ol, stride_oh, stride_oc, stride_od,
        num_heads, chunk_size, num_chunks, num_history, head_dim, qk_scale,
        HAS_HISTORY: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """
        The forward for few queries per (row, head), e.g. the decode step (one query over the cached summaries): one
        program per query row, scores as vector products (no matrix units needed), same results as the blocked
        kernel. Memory-bound: it reads each visible summary once.
        """
        rows_per_head = chunk_size * num_chunks
        program = tl.program_id(0)
        row_head = program // rows_per_head
        query_row = program % rows_per_head
        n = (row_head // num_heads).to(tl.int64)
        h = (row_head % num_heads).to(tl.int64)
        query_chunk = query_row // chunk_size
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < head_dim

        query = tl.load(
            query_ptr + _row_offsets(n, h, query_row, chunk_size, stride_qn, stride_ql, stride_qh, stride_qc)
            + dims * stride_qd, mask=dim_mask, other=0.0,
        ).to(tl.float32)
        own_score = tl.load(own_score_ptr + _row_offsets(n, h, query_row, chunk_size, stride_sn, stride_sl, stride_sh,
                                                         stride_sc))
        running_max = own_score.to(tl.float32) * qk_scale
        running_sum = running_max * 0.0 + 1.0
        accumulator = tl.load(
            own_value_ptr + _row_offsets(n, h, query_row, chunk_size, stride_vn, stride_vl, stride_vh, stride_vc)
            + dims * stride_vd, mask=dim_mask, other=0.0,
        ).to(tl.float32)

        history_count = 0
        if HAS_HISTORY:
            history_count = _history_count(history_count_ptr, n, num_history)
        # Visible key indices: [0, history_count) then [P, P + query_chunk), walked as one range of "visible" slots.
        num_visible = history_count + query_chunk
        for start in range(0, num_visible, BLOCK_N):
            visible = start + tl.arange(0, BLOCK_N)
            visible_mask = visible < num_visible
            slots = tl.where(visible < history_count, visible, visible - history_count + num_history)
            key_mask = visible_mask[:, None] & dim_mask[None, :]
            keys = tl.load(keys_ptr + _slot_offsets(n, h, slots, dims, stride_kn, stride_kh, stride_kk, stride_kd),
                           mask=key_mask, other=0.0)
            values = tl.load(values_ptr + _slot_offsets(n, h, slots, dims, stride_un, stride_uh, stride_uk, stride_ud),
                             mask=key_mask, other=0.0)
            scores = tl.sum(query[None, :] * keys.to(tl.float32), axis=1) * qk_scale
            scores = tl.where(visible_mask, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=0))
            correction = tl.exp2(running_max - new_max)
            probabilities = tl.exp2(scores - new_max)
            running_sum = running_sum * correction + tl.sum(probabilities, axis=0)
            accumulator = accumulator * correction + tl.sum(probabilities[:, None] * values.to(tl.float32), axis=0)
            running_max = new_max

        out = accumulator / running_sum
        tl.store(
            out_ptr + _row_offsets(n, h, query_row, chunk_size, stride_on, stride_ol, stride_oh, stride_oc)
            + dims * stride_od, out.to(out_ptr.dtype.element_ty), mask=dim_mask,
        )
        lse = (running_max + tl.log2(running_sum)) * _LN_2
        tl.store(lse_ptr + program.to(tl.int64), lse)

    @triton.jit
    def _attention_query_grad_block(
        query, grad_out, lse2, delta, keys, values, valid, grad_query, qk_scale,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """dq += dS @ K for a block of summaries, with P = exp2(s - lse2) recomputed and dS = P * (dP - delta)."""
        scores = _dot(query, tl.trans(keys), UPCAST, PRECISION) * qk_scale
        probabilities = tl.where(valid, tl.exp2(scores - lse2[:, None]), 0.0)
        grad_probabilities = _dot(grad_out, tl.trans(values), UPCAST, PRECISION)
        grad_scores = probabilities * (grad_probabilities - delta[:, None])
        return grad_query + _dot(grad_scores.to(keys.dtype), keys, UPCAST, PRECISION)

    @triton.jit(do_not_specialize=["num_chunks", "num_history"])
    def _chunk_attention_backward_query_kernel(
        query_ptr, own_score_ptr, own_value_ptr, keys_ptr, values_ptr, history_count_ptr, out_ptr, lse_ptr,
        grad_out_ptr, delta_ptr, grad_query_ptr, grad_own_score_ptr, grad_own_value_ptr,
        stride_qn, stride_ql, stride_qh, stride_qc, stride_qd,  # also the layout of grad_query
        stride_sn, stride_sl, stride_sh, stride_sc,  # also the layout of grad_own_score
        stride_vn, stride_vl, stride_vh, stride_vc, stride_vd,  # also the layout of grad_own_value
        stride_kn, stride_kh, stride_kk, stride_kd,
        stride_un, stride_uh, stride_uk, stride_ud,
        stride_on, stride_ol, stride_oh, stride_oc, stride_od,  # out
        stride_gn, stride_gl, stride_gh, stride_gc, stride_gd,  # grad_out
        num_heads, chunk_size, num_chunks, num_history, head_dim, qk_scale, scale,
        HAS_HISTORY: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """
        Gradients on the query side for BLOCK_M query rows: d query, d own_score, d own_value; and
        delta = rowsum(dO * O), stored for the key-side kernel.
        """
        num_rows = chunk_size * num_chunks
        num_row_blocks = tl.cdiv(num_rows, BLOCK_M)
        program = tl.program_id(0)
        row_head = program // num_row_blocks
        row_block = num_row_blocks - 1 - program % num_row_blocks  # the latest queries, which see most, first
        n = (row_head // num_heads).to(tl.int64)
        h = (row_head % num_heads).to(tl.int64)
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < num_rows
        query_chunk = rows // chunk_size
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < head_dim
        tile_mask = row_mask[:, None] & dim_mask[None, :]

        query_offsets = (_row_offsets(n, h, rows, chunk_size, stride_qn, stride_ql, stride_qh, stride_qc)[:, None]
                         + dims[None, :] * stride_qd)
        score_offsets = _row_offsets(n, h, rows, chunk_size, stride_sn, stride_sl, stride_sh, stride_sc)
        value_offsets = (_row_offsets(n, h, rows, chunk_size, stride_vn, stride_vl, stride_vh, stride_vc)[:, None]
                         + dims[None, :] * stride_vd)
        query = tl.load(query_ptr + query_offsets, mask=tile_mask, other=0.0)
        own_score = tl.load(own_score_ptr + score_offsets, mask=row_mask, other=0.0).to(tl.float32)
        own_value = tl.load(own_value_ptr + value_offsets, mask=tile_mask, other=0.0).to(tl.float32)
        out = tl.load(out_ptr + _row_offsets(n, h, rows, chunk_size, stride_on, stride_ol, stride_oh, stride_oc)[:, None]
                      + dims[None, :] * stride_od, mask=tile_mask, other=0.0).to(tl.float32)
        grad_out = tl.load(
            grad_out_ptr + _row_offsets(n, h, rows, chunk_size, stride_gn, stride_gl, stride_gh, stride_gc)[:, None]
            + dims[None, :] * stride_gd, mask=tile_mask, other=0.0,
        )
        lse2 = tl.load(lse_ptr + row_head.to(tl.int64) * num_rows + rows, mask=row_mask, other=0.0) * _LOG2_E
        delta = tl.sum(grad_out.to(tl.float32) * out, axis=1)
        tl.store(delta_ptr + row_head.to(tl.int64) * num_rows + rows, delta, mask=row_mask)

        # The own term: weight p_own, value own_value, score own_score * scale.
        own_probability = tl.exp2(own_score * qk_scale - lse2)
        grad_own_value = own_probability[:, None] * grad_out.to(tl.float32)
        grad_own_probability = tl.sum(grad_out.to(tl.float32) * own_value, axis=1)
        grad_own_score = own_probability * (grad_own_probability - delta) * scale
        tl.store(grad_own_value_ptr + value_offsets, grad_own_value.to(grad_own_value_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(grad_own_score_ptr + score_offsets, grad_own_score.to(grad_own_score_ptr.dtype.element_ty), mask=row_mask)

        grad_query = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if HAS_HISTORY:
            history_count = _history_count(history_count_ptr, n, num_history)
            for start in range(0, history_count, BLOCK_N):
                slots = start + tl.arange(0, BLOCK_N)
                slot_mask = slots < history_count
                key_mask = slot_mask[:, None] & dim_mask[None, :]
                keys = tl.load(keys_ptr + _slot_offsets(n, h, slots, dims, stride_kn, stride_kh, stride_kk, stride_kd),
                               mask=key_mask, other=0.0)
                values = tl.load(values_ptr + _slot_offsets(n, h, slots, dims, stride_un, stride_uh, stride_uk, stride_ud),
                                 mask=key_mask, other=0.0)
                grad_query = _attention_query_grad_block(
                    query, grad_out, lse2, delta, keys, values, slot_mask[None, :], grad_query, qk_scale,
                    UPCAST, PRECISION,
                )
        last_chunk = tl.minimum((row_block * BLOCK_M + BLOCK_M - 1) // chunk_size, num_chunks - 1)
        for start in range(0, last_chunk, BLOCK_N):
            summaries = start + tl.arange(0, BLOCK_N)
            key_mask = (summaries < last_chunk)[:, None] & dim_mask[None, :]
            slots = num_history + summaries
            keys = tl.load(keys_ptr + _slot_offsets(n, h, slots, dims, stride_kn, stride_kh, stride_kk, stride_kd),
                           mask=key_mask, other=0.0)
            values = tl.load(values_ptr + _slot_offsets(n, h, slots, dims, stride_un, stride_uh, stride_uk, stride_ud),
                             mask=key_mask, other=0.0)
            grad_query = _attention_query_grad_block(
                query, grad_out, lse2, delta, keys, values, summaries[None, :] < query_chunk[:, None], grad_query,
                qk_scale, UPCAST, PRECISION,
            )
        grad_query = grad_query * scale
        tl.store(grad_query_ptr + query_offsets, grad_query.to(grad_query_ptr.dtype.element_ty), mask=tile_mask)

    @triton.jit(do_not_specialize=["num_chunks", "num_history"])
    def _chunk_attention_backward_key_kernel(
        query_ptr, keys_ptr, values_ptr, history_count_ptr, lse_ptr, grad_out_ptr, delta_ptr,
        grad_keys_ptr, grad_values_ptr,
        stride_qn, stride_ql, stride_qh, stride_qc, stride_qd,
        stride_kn, stride_kh, stride_kk, stride_kd,  # also the layout of grad_keys
        stride_un, stride_uh, stride_uk, stride_ud,  # also the layout of grad_values
        stride_gn, stride_gl, stride_gh, stride_gc, stride_gd,
        num_heads, chunk_size, num_chunks, num_history, head_dim, qk_scale, scale,
        HAS_HISTORY: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """
        Gradients of BLOCK_N summaries (key indices over [0, P + C - 1)) of one (row, head), summed over the query
        rows that see them: dV = P^T dO, dK = scale * dS^T Q. Every summary gets its gradient written (zero when
        no query sees it).
        """
        num_rows = chunk_size * num_chunks
        num_keys = num_history + num_chunks - 1
        num_key_blocks = tl.cdiv(num_keys, BLOCK_N)
        program = tl.program_id(0)
        row_head = program // num_key_blocks
        key_block = program % num_key_blocks  # the earliest summaries, which most queries see, first
        n = (row_head // num_heads).to(tl.int64)
        h = (row_head % num_heads).to(tl.int64)
        first_slot = key_block * BLOCK_N
        slots = first_slot + tl.arange(0, BLOCK_N)
        slot_mask = slots < num_keys
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < head_dim
        key_mask = slot_mask[:, None] & dim_mask[None, :]
        key_offsets = _slot_offsets(n, h, slots, dims, stride_kn, stride_kh, stride_kk, stride_kd)
        value_offsets = _slot_offsets(n, h, slots, dims, stride_un, stride_uh, stride_uk, stride_ud)
        keys = tl.load(keys_ptr + key_offsets, mask=key_mask, other=0.0)
        values = tl.load(values_ptr + value_offsets, mask=key_mask, other=0.0)

        history_count = 0
        if HAS_HISTORY:
            history_count = _history_count(history_count_ptr, n, num_history)
        is_history = slots < num_history
        # New summary k = slot - P is seen by query chunks i > k, i.e. rows r >= (k + 1) * L.
        new_index = slots - num_history
        # Query rows to visit: all of them if the block holds valid history slots, else from the first row that
        # sees the block's first new summary; none if the block holds only invalid history slots.
        first_row = tl.where(first_slot < num_history, 0, (first_slot - num_history + 1) * chunk_size)
        only_invalid_history = (first_slot + BLOCK_N <= num_history) & (first_slot >= history_count)
        last_row = tl.where(only_invalid_history, 0, num_rows)

        grad_keys = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        grad_values = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for start in range(first_row, last_row, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_mask = rows < num_rows
            query_chunk = rows // chunk_size
            tile_mask = row_mask[:, None] & dim_mask[None, :]
            query = tl.load(
                query_ptr + _row_offsets(n, h, rows, chunk_size, stride_qn, stride_ql, stride_qh, stride_qc)[:, None]
                + dims[None, :] * stride_qd, mask=tile_mask, other=0.0,
            )
            grad_out = tl.load(
                grad_out_ptr + _row_offsets(n, h, rows, chunk_size, stride_gn, stride_gl, stride_gh, stride_gc)[:, None]
                + dims[None, :] * stride_gd, mask=tile_mask, other=0.0,
            )
            lse2 = tl.load(lse_ptr + row_head.to(tl.int64) * num_rows + rows, mask=row_mask, other=0.0) * _LOG2_E
            delta = tl.load(delta_ptr + row_head.to(tl.int64) * num_rows + rows, mask=row_mask, other=0.0)
            # Transposed scores (BLOCK_N, BLOCK_M): which (summary, query) pairs are in a softmax.
            valid = (is_history & (slots < history_count))[:, None] | (
                (~is_history)[:, None] & (new_index[:, None] < query_chunk[None, :])
            )
            valid = valid & slot_mask[:, None] & row_mask[None, :]
            scores = _dot(keys, tl.trans(query), UPCAST, PRECISION) * qk_scale
            probabilities = tl.where(valid, tl.exp2(scores - lse2[None, :]), 0.0)
            grad_values += _dot(probabilities.to(grad_out.dtype), grad_out, UPCAST, PRECISION)
            grad_probabilities = _dot(values, tl.trans(grad_out), UPCAST, PRECISION)
            grad_scores = probabilities * (grad_probabilities - delta[None, :])
            grad_keys += _dot(grad_scores.to(query.dtype), query, UPCAST, PRECISION)
        grad_keys = grad_keys * scale
        tl.store(grad_keys_ptr + key_offsets, grad_keys.to(grad_keys_ptr.dtype.element_ty), mask=key_mask)
        tl.store(grad_values_ptr + value_offsets, grad_values.to(grad_values_ptr.dtype.element_ty), mask=key_mask)

    KERNELS_INTERPRETED = type(_chunk_scan_forward_kernel).__name__ == "InterpretedFunction"
else:
    KERNELS_INTERPRETED = False


# ================================================================================================ dispatch


def _tf32_allowed() -> bool:
    """float32 products on tensor cores (TF32) when the user allows them for matmuls: torch.set_float32_matmul_precision."""
    return torch.get_float32_matmul_precision() != "highest"


def triton_unavailable_reason(
    device: torch.device | str, dtype: torch.dtype, head_dim: int, *, automatic: bool
) -> str | None:
    """
    None when the kernels may run on tensors of `device` and `dtype` with heads of `head_dim`, else a short reason.

    `automatic=False` (the user asked for the kernels): they need triton, a CUDA GPU (or CPU tensors with the kernels
    built by Triton's interpreter, `TRITON_INTERPRET=1` before import), float32/bfloat16/float16 and heads up to
    MAX_HEAD_DIM. `automatic=True` (choosing the fastest path) also requires a GPU of compute capability 8.0 or more
    and, for float32, TF32 products allowed (`torch.set_float32_matmul_precision("high")`): with exact float32
    products the kernels' matrix products run on FMA units with spills, and the PyTorch path is the better choice.
    """
    if triton is None:
        return f"triton cannot be imported ({TRITON_IMPORT_ERROR})"
    if dtype not in SUPPORTED_DTYPES:
        return f"the kernels take float32, bfloat16 or float16 activations, not {dtype}"
    if head_dim > MAX_HEAD_DIM:
        return f"head size {head_dim} is above {MAX_HEAD_DIM}, the largest the kernels' tiles hold"
    device = torch.device(device)
    if KERNELS_INTERPRETED:
        if automatic:
            return "TRITON_INTERPRET=1 is set: the kernels were built by Triton's interpreter (for tests)"
        return None if device.type == "cpu" else f"under TRITON_INTERPRET=1 the kernels run on CPU tensors, not {device}"
    if device.type != "cuda":
        return f"the kernels run on CUDA GPUs, not on {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if automatic:
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            return (f"compute capability {capability[0]}.{capability[1]} is below "
                    f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: the kernels' products would not run on tensor cores")
        if dtype == torch.float32 and not _tf32_allowed():
            return ("float32 with exact products (torch.get_float32_matmul_precision() == 'highest'); "
                    "torch.set_float32_matmul_precision('high') lets the kernels use TF32")
    return None


def triton_is_usable(device: torch.device | str, dtype: torch.dtype | None = None) -> bool:
    """Whether the kernels can run on tensors of `device` (and `dtype`, if given), at any head size they take."""
    return triton_unavailable_reason(device, dtype or torch.float32, MAX_HEAD_DIM, automatic=False) is None


def _check_usable(*tensors: torch.Tensor):
    device = tensors[0].device
    for tensor in tensors:
        if tensor.device != device:
            raise ValueError(f"All inputs must be on one device, got {device} and {tensor.device}.")
    if triton is None:
        raise RuntimeError(
            f"The Triton kernels need the `triton` package ({TRITON_IMPORT_ERROR}): `pip install triton`, or use "
            "rat_implementation='fast'."
        )
    if not triton_is_usable(device):
        raise RuntimeError(
            f"The Triton kernels cannot run on {device}: they need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
            "set before `rat_triton` is imported (Triton's interpreter, for tests). Use rat_implementation='fast' "
            "on this device."
        )


def _check_dtype(name: str, tensor: torch.Tensor):
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"`{name}` has dtype {tensor.dtype}; the Triton kernels take float32, bfloat16 or float16 (they accumulate "
            "in float32). Use rat_implementation='fast' for other dtypes."
        )


# ============================================================================================ launch helpers

# Tests set this to True: every buffer a kernel must fill is then allocated full of NaN, so that any element a kernel
# fails to write shows up in the results.
POISON_OUTPUTS = False


def _next_power_of_2(value: int) -> int:
    return 1 << max(0, (int(value) - 1).bit_length())


def _tile_capability(device: torch.device) -> tuple[int, int] | None:
    """
    The compute capability whose launch configurations the kernels use on `device`. None under Triton's interpreter:
    small tiles (16), so that small test shapes cross tile borders (tests substitute a GPU's capability to run its
    configurations, with larger shapes).
    """
    return None if KERNELS_INTERPRETED else torch.cuda.get_device_capability(device)


def _output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer for kernel outputs (NaN-filled when POISON_OUTPUTS is set)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _output_like(tensor: torch.Tensor) -> torch.Tensor:
    """`empty_like` (same strides for dense tensors) for kernel outputs (NaN-filled when POISON_OUTPUTS is set)."""
    buffer = torch.empty_like(tensor)
    return buffer.fill_(float("nan")) if POISON_OUTPUTS else buffer


def _launch(kernel, grid: tuple[int, ...], *args, **meta):
    """
    Launch `kernel` on `grid`, on the device of its tensor arguments (not the current CUDA device: with
    device_map="auto" layers live on several GPUs). A grid beyond CUDA's limits, or a kernel that fails to compile
    or launch, raises TritonKernelError.
    """
    name = getattr(kernel, "__name__", type(kernel).__name__)
    for axis, (size, limit) in enumerate(zip(grid, CUDA_GRID_LIMITS)):
        if size > limit:
            raise TritonKernelError(f"{name}: grid {grid} exceeds CUDA's limit of {limit} on axis {axis}.")
    device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with guard:
            kernel[grid](*args, **meta)
    except (TritonError, RuntimeError) as error:
        raise TritonKernelError(f"Triton kernel {name} failed to compile or launch on {device}: {error}") from error


# ------------------------------------------------------------------------------------------ scan launches

SCAN_TILE_ELEMENTS = 2048  # elements of one program's (steps x copies x key features) tile on a GPU
SCAN_NUM_WARPS = 4
SCAN_BLOCK_FEATURES = 256  # features per program of the ungated scan on a GPU


def _gated_scan_config(chunk_size: int, copies: int, key_width: int, capability) -> dict:
    """
    Tile of the gated scan: the whole chunk, all copies, as many key features as fit SCAN_TILE_ELEMENTS (64 under the
    interpreter). Chunks much longer than 16 tokens with many copies leave one key feature per program.
    """
    block_l, block_copies = _next_power_of_2(chunk_size), _next_power_of_2(copies)
    tile = SCAN_TILE_ELEMENTS if capability else 64
    block_j = max(1, min(_next_power_of_2(key_width), tile // (block_l * block_copies)))
    config = dict(COPIES=copies, BLOCK_L=block_l, BLOCK_COPIES=block_copies, BLOCK_J=block_j)
    return dict(config, num_warps=SCAN_NUM_WARPS) if capability else config


def _gated_scan_forward(gates, value, key, initial_state):
    num_rows, num_chunks, chunk_size, hidden_size = value.shape
    key_width = key.shape[-1]
    states = _output((num_rows, num_chunks, chunk_size, 2, hidden_size), dtype=torch.float32, device=value.device)
    if states.numel() == 0:
        return states
    config = _gated_scan_config(chunk_size, hidden_size // key_width, key_width, _tile_capability(value.device))
    grid = (num_rows * num_chunks * triton.cdiv(key_width, config["BLOCK_J"]),)
    _launch(
        _gated_scan_forward_kernel, grid,
        gates, value, key, initial_state if initial_state is not None else value, states,
        num_chunks, chunk_size, hidden_size, key_width, HAS_INITIAL=initial_state is not None, **config,
    )
    return states


def _gated_scan_backward(grad_states, gates, value, key, initial_state):
    num_rows, num_chunks, chunk_size, hidden_size = value.shape
    key_width = key.shape[-1]
    grad_gates = _output(gates.shape, gates.dtype, gates.device)
    grad_value = _output(value.shape, value.dtype, value.device)
    grad_key = _output(key.shape, key.dtype, key.device)
    if initial_state is not None:
        grad_initial = _output(initial_state.shape, initial_state.dtype, initial_state.device)
    else:
        grad_initial = _output((0,), dtype=value.dtype, device=value.device)
    if value.numel() == 0:
        return grad_gates, grad_value, grad_key, grad_initial.zero_()
    config = _gated_scan_config(chunk_size, hidden_size // key_width, key_width, _tile_capability(value.device))
    grid = (num_rows * num_chunks * triton.cdiv(key_width, config["BLOCK_J"]),)
    _launch(
        _gated_scan_backward_kernel, grid,
        grad_states, gates, value, key, initial_state if initial_state is not None else value,
        grad_gates, grad_value, grad_key, grad_initial,
        num_chunks, chunk_size, hidden_size, key_width, HAS_INITIAL=initial_state is not None, **config,
    )
    return grad_gates, grad_value, grad_key, grad_initial


def _scan_block_features(num_features: int, device: torch.device) -> int:
    return min(_next_power_of_2(num_features), SCAN_BLOCK_FEATURES if _tile_capability(device) else 64)


def _chunk_scan_forward(gates: torch.Tensor, inputs: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    num_rows, num_chunks, chunk_size, num_streams, num_features = inputs.shape
    states = _output(inputs.shape, dtype=torch.float32, device=inputs.device)
    if states.numel() == 0:
        return states
    block_features = _scan_block_features(num_features, gates.device)
    _launch(
        _chunk_scan_forward_kernel, (num_rows * num_chunks, triton.cdiv(num_features, block_features)),
        gates, inputs, initial_state if initial_state is not None else inputs, states,
        num_chunks, chunk_size, num_features,
        NUM_STREAMS=num_streams, BLOCK_STREAMS=_next_power_of_2(num_streams), BLOCK_FEATURES=block_features,
        HAS_INITIAL=initial_state is not None,
    )
    return states


def _chunk_scan_backward(grad_states, gates, states, initial_state, inputs_dtype):
    num_rows, num_chunks, chunk_size, num_streams, num_features = states.shape
    grad_gates = _output(gates.shape, dtype=gates.dtype, device=gates.device)
    grad_inputs = _output(states.shape, dtype=inputs_dtype, device=states.device)
    if initial_state is not None:
        grad_initial = _output(initial_state.shape, dtype=initial_state.dtype, device=initial_state.device)
    else:
        grad_initial = _output((0,), dtype=states.dtype, device=states.device)
    if states.numel() == 0:
        return grad_gates, grad_inputs, grad_initial.zero_()
    block_features = _scan_block_features(num_features, gates.device)
    _launch(
        _chunk_scan_backward_kernel, (num_rows * num_chunks, triton.cdiv(num_features, block_features)),
        grad_states, gates, states, initial_state if initial_state is not None else states,
        grad_gates, grad_inputs, grad_initial,
        num_chunks, chunk_size, num_features,
        NUM_STREAMS=num_streams, BLOCK_STREAMS=_next_power_of_2(num_streams), BLOCK_FEATURES=block_features,
        HAS_INITIAL=initial_state is not None,
    )
    return grad_gates, grad_inputs, grad_initial


# ------------------------------------------------------------------------------------- attention launches

# Launch configurations of the blocked attention kernels on GPUs: (BLOCK_M query rows, BLOCK_N summaries, warps,
# pipeline stages) per GPU family, products ("16bit": bfloat16/float16; "tf32" and "ieee": float32 with TF32 or
# exact products), kernel and head size (up to 64, up to 128). Read off `scripts/compile_triton_kernels.py`'s report
# (registers, spills, shared memory, matrix units): no kernel spills, and on Hopper every 16-bit and TF32 product of
# a large enough tile runs on wgmma (which needs the M side of a product, BLOCK_M in the query-side kernels and
# BLOCK_N in the key kernel, to be 64 per warp group of 4 warps). Exact float32 products run on FMA units. Not yet
# timed on a GPU: `scripts/gpu_check.py` does.
ATTENTION_TILES = {
    "hopper": {  # sm_90: 228 KB of shared memory per SM
        ("16bit", "forward", 64): (128, 64, 8, 2),
        ("16bit", "forward", 128): (128, 64, 8, 2),
        ("16bit", "backward_query", 64): (128, 64, 8, 2),
        ("16bit", "backward_query", 128): (128, 64, 8, 2),
        ("16bit", "backward_key", 64): (32, 128, 8, 2),
        ("16bit", "backward_key", 128): (32, 128, 8, 2),
        ("tf32", "forward", 64): (128, 64, 8, 2),
        ("tf32", "forward", 128): (64, 32, 4, 2),
        ("tf32", "backward_query", 64): (128, 64, 8, 2),
        ("tf32", "backward_query", 128): (32, 32, 4, 2),
        ("tf32", "backward_key", 64): (32, 128, 8, 2),
        ("tf32", "backward_key", 128): (32, 32, 4, 2),
        ("ieee", "forward", 64): (32, 32, 4, 2),
        ("ieee", "forward", 128): (16, 16, 4, 2),
        ("ieee", "backward_query", 64): (32, 32, 8, 2),
        ("ieee", "backward_query", 128): (32, 32, 8, 2),
        ("ieee", "backward_key", 64): (16, 32, 4, 2),
        ("ieee", "backward_key", 128): (16, 32, 4, 2),
    },
    "ampere": {  # sm_80 and the others: mma.sync, which holds more in registers; at most 99 KB of shared memory
        ("16bit", "forward", 64): (128, 64, 8, 2),
        ("16bit", "forward", 128): (64, 32, 4, 2),
        ("16bit", "backward_query", 64): (128, 64, 8, 2),
        ("16bit", "backward_query", 128): (64, 32, 4, 2),
        ("16bit", "backward_key", 64): (32, 128, 8, 2),
        ("16bit", "backward_key", 128): (64, 64, 8, 2),
        ("tf32", "forward", 64): (64, 32, 4, 2),
        ("tf32", "forward", 128): (32, 32, 4, 2),
        ("tf32", "backward_query", 64): (64, 32, 4, 2),
        ("tf32", "backward_query", 128): (32, 32, 4, 2),
        ("tf32", "backward_key", 64): (16, 64, 8, 2),
        ("tf32", "backward_key", 128): (32, 32, 4, 2),
        ("ieee", "forward", 64): (32, 16, 4, 2),
        ("ieee", "forward", 128): (32, 16, 4, 2),
        ("ieee", "backward_query", 64): (32, 32, 8, 2),
        ("ieee", "backward_query", 128): (32, 32, 8, 2),
        ("ieee", "backward_key", 64): (32, 16, 8, 2),
        ("ieee", "backward_key", 128): (32, 16, 4, 2),
    },
}
ROWS_BLOCK_N = 64  # summaries per step of the one-query-per-program kernel (memory-bound: wide loads)


def _attention_config(kernel: str, head_dim: int, dtype: torch.dtype, capability) -> dict:
    """
    Launch parameters of a blocked attention kernel ("forward", "backward_query", "backward_key") for a GPU of this
    compute capability (None: the interpreter's small tiles). The head is padded to a power of 2 of at least 16.
    """
    block_d = max(16, _next_power_of_2(head_dim))
    products = "16bit" if dtype != torch.float32 else "tf32" if _tf32_allowed() else "ieee"
    config = dict(
        BLOCK_D=block_d,
        UPCAST=KERNELS_INTERPRETED and dtype == torch.bfloat16,
        PRECISION="ieee" if products == "ieee" else "tf32",  # ignored for 16-bit inputs
    )
    if capability is None:
        return dict(config, BLOCK_M=16, BLOCK_N=16)
    family = "hopper" if (9, 0) <= tuple(capability) < (10, 0) else "ampere"
    block_m, block_n, num_warps, num_stages = ATTENTION_TILES[family][(products, kernel, 64 if block_d <= 64 else 128)]
    return dict(config, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def _chunk_attention_forward(query, own_score, own_value, keys, values, history_count, scale, kernel="auto"):
    """Returns (out (N, L, H, C, d) in the query's dtype, lse (N, H, C, L) fp32, natural log-sum-exp per query)."""
    num_rows, chunk_size, num_heads, num_chunks, head_dim = query.shape
    num_history = keys.shape[2] - (num_chunks - 1)
    out = _output(query.shape, dtype=query.dtype, device=query.device)
    lse = _output((num_rows, num_heads, num_chunks, chunk_size), dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        return out, lse
    has_history = history_count is not None
    arguments = (
        query, own_score, own_value, keys, values, history_count if has_history else lse, out, lse,
        *query.stride(), *own_score.stride(), *own_value.stride(), *keys.stride(), *values.stride(), *out.stride(),
        num_heads, chunk_size, num_chunks, num_history, head_dim, scale * LOG2_E,
    )
    rows_per_head = chunk_size * num_chunks
    if kernel == "auto":
        kernel = "rows" if rows_per_head <= ROW_KERNEL_MAX_ROWS else "blocked"
    if kernel == "rows":
        block_n = ROWS_BLOCK_N if _tile_capability(query.device) else 16
        _launch(_chunk_attention_rows_kernel, (num_rows * num_heads * rows_per_head,), *arguments,
                HAS_HISTORY=has_history, BLOCK_N=block_n, BLOCK_D=max(16, _next_power_of_2(head_dim)))
    elif kernel == "blocked":
        config = _attention_config("forward", head_dim, query.dtype, _tile_capability(query.device))
        grid = (num_rows * num_heads * triton.cdiv(rows_per_head, config["BLOCK_M"]),)
        _launch(_chunk_attention_forward_kernel, grid, *arguments, HAS_HISTORY=has_history, **config)
    else:
        raise ValueError(f"kernel must be 'auto', 'rows' or 'blocked', got {kernel!r}")
    return out, lse


def _chunk_attention_backward(grad_out, query, own_score, own_value, keys, values, history_count, out, lse, scale):
    num_rows, chunk_size, num_heads, num_chunks, head_dim = query.shape
    num_history = keys.shape[2] - (num_chunks - 1)
    # The kernels address each gradient with its input's strides: `empty_like` keeps the strides of dense inputs
    # (e.g. the permuted views the model passes); the backward op made the others dense.
    grad_query = _output_like(query)
    grad_own_score = _output_like(own_score)
    grad_own_value = _output_like(own_value)
    grad_keys = _output_like(keys)
    grad_values = _output_like(values)
    if query.numel() == 0:
        return grad_query, grad_own_score, grad_own_value, grad_keys.zero_(), grad_values.zero_()
    delta = _output_like(lse)
    has_history = history_count is not None
    count_argument = history_count if has_history else lse
    rows_per_head = chunk_size * num_chunks
    capability = _tile_capability(query.device)
    config = _attention_config("backward_query", head_dim, query.dtype, capability)
    _launch(
        _chunk_attention_backward_query_kernel, (num_rows * num_heads * triton.cdiv(rows_per_head, config["BLOCK_M"]),),
        query, own_score, own_value, keys, values, count_argument, out, lse,
        grad_out, delta, grad_query, grad_own_score, grad_own_value,
        *query.stride(), *own_score.stride(), *own_value.stride(), *keys.stride(), *values.stride(), *out.stride(),
        *grad_out.stride(),
        num_heads, chunk_size, num_chunks, num_history, head_dim, scale * LOG2_E, scale,
        HAS_HISTORY=has_history, **config,
    )
    num_keys = keys.shape[2]
    if num_keys == 0:
        return grad_query, grad_own_score, grad_own_value, grad_keys, grad_values
    config = _attention_config("backward_key", head_dim, query.dtype, capability)
    _launch(
        _chunk_attention_backward_key_kernel, (num_rows * num_heads * triton.cdiv(num_keys, config["BLOCK_N"]),),
        query, keys, values, count_argument, lse, grad_out, delta, grad_keys, grad_values,
        *query.stride(), *keys.stride(), *values.stride(), *grad_out.stride(),
        num_heads, chunk_size, num_chunks, num_history, head_dim, scale * LOG2_E, scale,
        HAS_HISTORY=has_history, **config,
    )
    return grad_query, grad_own_score, grad_own_value, grad_keys, grad_values


# ============================================================================================== custom ops
#
# Fake implementations return what the real ones return, strides included (inductor checks them); the ops whose
# output strides follow their inputs' are tagged `needs_exact_strides`, so that inductor hands them inputs with
# exactly the strides they were traced with.


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself if `empty_like` reproduces its strides (dense, possibly permuted), else a contiguous copy."""
    if torch.empty_like(tensor).stride() == tensor.stride():
        return tensor
    return tensor.contiguous()


@torch.library.custom_op(f"{_LIBRARY}::gated_chunk_scan", mutates_args=())
def _gated_chunk_scan_op(
    gates: torch.Tensor, value: torch.Tensor, key: torch.Tensor, initial_state: torch.Tensor | None
) -> torch.Tensor:
    return _gated_scan_forward(
        gates.contiguous(), value.contiguous(), key.contiguous(),
        initial_state.contiguous() if initial_state is not None else None,
    )


@_gated_chunk_scan_op.register_fake
def _(gates, value, key, initial_state):
    num_rows, num_chunks, chunk_size, hidden_size = value.shape
    return value.new_empty((num_rows, num_chunks, chunk_size, 2, hidden_size), dtype=torch.float32)


@torch.library.custom_op(f"{_LIBRARY}::gated_chunk_scan_backward", mutates_args=())
def _gated_chunk_scan_backward_op(
    grad_states: torch.Tensor, gates: torch.Tensor, value: torch.Tensor, key: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gated_scan_backward(
        grad_states.contiguous(), gates.contiguous(), value.contiguous(), key.contiguous(),
        initial_state.contiguous() if initial_state is not None else None,
    )


@_gated_chunk_scan_backward_op.register_fake
def _(grad_states, gates, value, key, initial_state):
    grad_initial = initial_state.new_empty(initial_state.shape) if initial_state is not None else value.new_empty(0)
    return gates.new_empty(gates.shape), value.new_empty(value.shape), key.new_empty(key.shape), grad_initial


def _gated_chunk_scan_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # gates, value, key, initial state: the states are recomputed, not kept


def _gated_chunk_scan_backward_autograd(ctx, grad_states):
    gates, value, key, initial_state = ctx.saved_tensors
    grad_gates, grad_value, grad_key, grad_initial = _gated_chunk_scan_backward_op(
        grad_states, gates, value, key, initial_state
    )
    return grad_gates, grad_value, grad_key, grad_initial if initial_state is not None else None


_gated_chunk_scan_op.register_autograd(_gated_chunk_scan_backward_autograd, setup_context=_gated_chunk_scan_setup_context)


@torch.library.custom_op(f"{_LIBRARY}::chunk_scan", mutates_args=())
def _chunk_scan_op(gates: torch.Tensor, inputs: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    return _chunk_scan_forward(
        gates.contiguous(), inputs.contiguous(), initial_state.contiguous() if initial_state is not None else None
    )


@_chunk_scan_op.register_fake
def _(gates, inputs, initial_state):
    return inputs.new_empty(inputs.shape, dtype=torch.float32)


@torch.library.custom_op(f"{_LIBRARY}::chunk_scan_backward", mutates_args=())
def _chunk_scan_backward_op(
    grad_states: torch.Tensor, gates: torch.Tensor, states: torch.Tensor, initial_state: torch.Tensor | None,
    inputs_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _chunk_scan_backward(
        grad_states.contiguous(), gates.contiguous(), states.contiguous(),
        initial_state.contiguous() if initial_state is not None else None, inputs_dtype,
    )


@_chunk_scan_backward_op.register_fake
def _(grad_states, gates, states, initial_state, inputs_dtype):
    grad_initial = initial_state.new_empty(initial_state.shape) if initial_state is not None else states.new_empty(0)
    return gates.new_empty(gates.shape), states.new_empty(states.shape, dtype=inputs_dtype), grad_initial


def _chunk_scan_setup_context(ctx, inputs, output):
    gates, scan_inputs, initial_state = inputs
    ctx.save_for_backward(gates, output, initial_state)
    ctx.inputs_dtype = scan_inputs.dtype


def _chunk_scan_backward_autograd(ctx, grad_states):
    gates, states, initial_state = ctx.saved_tensors
    grad_gates, grad_inputs, grad_initial = _chunk_scan_backward_op(
        grad_states, gates, states, initial_state, ctx.inputs_dtype
    )
    return grad_gates, grad_inputs, grad_initial if initial_state is not None else None


_chunk_scan_op.register_autograd(_chunk_scan_backward_autograd, setup_context=_chunk_scan_setup_context)


@torch.library.custom_op(f"{_LIBRARY}::chunk_attention", mutates_args=())
def _chunk_attention_op(
    query: torch.Tensor, own_score: torch.Tensor, own_value: torch.Tensor, key_summaries: torch.Tensor,
    value_summaries: torch.Tensor, history_count: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _chunk_attention_forward(query, own_score, own_value, key_summaries, value_summaries, history_count, scale)


@_chunk_attention_op.register_fake
def _(query, own_score, own_value, key_summaries, value_summaries, history_count, scale):
    num_rows, chunk_size, num_heads, num_chunks, _ = query.shape
    lse = query.new_empty(num_rows, num_heads, num_chunks, chunk_size, dtype=torch.float32)
    return query.new_empty(query.shape), lse


@torch.library.custom_op(
    f"{_LIBRARY}::chunk_attention_backward", mutates_args=(), tags=(torch.Tag.needs_exact_strides,)
)
def _chunk_attention_backward_op(
    grad_out: torch.Tensor, query: torch.Tensor, own_score: torch.Tensor, own_value: torch.Tensor,
    key_summaries: torch.Tensor, value_summaries: torch.Tensor, history_count: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    query, own_score, own_value, key_summaries, value_summaries = (
        _dense(query), _dense(own_score), _dense(own_value), _dense(key_summaries), _dense(value_summaries)
    )
    return _chunk_attention_backward(
        grad_out, query, own_score, own_value, key_summaries, value_summaries, history_count, out, lse, scale
    )


@_chunk_attention_backward_op.register_fake
def _(grad_out, query, own_score, own_value, key_summaries, value_summaries, history_count, out, lse, scale):
    # the gradients take the strides of the (densified) inputs, as the real op's `empty_like` buffers do
    return tuple(
        torch.empty_like(_dense(tensor)) for tensor in (query, own_score, own_value, key_summaries, value_summaries)
    )


def _chunk_attention_setup_context(ctx, inputs, output):
    query, own_score, own_value, key_summaries, value_summaries, history_count, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, own_score, own_value, key_summaries, value_summaries, history_count, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _chunk_attention_backward_autograd(ctx, grad_out, grad_lse):
    query, own_score, own_value, key_summaries, value_summaries, history_count, out, lse = ctx.saved_tensors
    gradients = _chunk_attention_backward_op(
        grad_out, query, own_score, own_value, key_summaries, value_summaries, history_count, out, lse, ctx.scale
    )
    return (*gradients, None, None)


_chunk_attention_op.register_autograd(_chunk_attention_backward_autograd, setup_context=_chunk_attention_setup_context)


# ============================================================================================ public functions


def gated_chunk_scan(
    gates: torch.Tensor, value: torch.Tensor, key: torch.Tensor, initial_state: torch.Tensor | None = None
) -> torch.Tensor:
    """
    States of the RAT recurrence on a grid of chunks (as `rat_ops.gated_chunk_scan`): inside every chunk,
    `h_l = f_l * h_{l-1} + (1 - f_l) * x_l` for the value and for the key tiled over the heads, from zero, except
    chunk 0 of each row, which starts from `initial_state` when given.

    Args:
        gates: (N, C, L, D) the forget gate f (after the sigmoid; float32 preferably).
        value: (N, C, L, D).
        key: (N, C, L, G * d), tiled to D = H * d features (head h reads group h % G).
        initial_state: (N, 2, D) [value, key] states entering chunk 0, or None.
    Returns:
        (N, C, L, 2, D) float32 [value, key] running sums, differentiable with respect to all inputs. The gated inputs
        are formed inside the kernel, and autograd keeps only the inputs: the backward recomputes the states.
    """
    if gates.dim() != 4:
        raise ValueError(f"gated_chunk_scan takes gates (N, C, L, D), got shape {tuple(gates.shape)}.")
    if value.shape != gates.shape:
        raise ValueError(f"value {tuple(value.shape)} must have the gates' shape {tuple(gates.shape)} (N, C, L, D).")
    hidden_size = gates.shape[-1]
    if key.dim() != 4 or key.shape[:3] != gates.shape[:3] or key.shape[-1] == 0 or hidden_size % key.shape[-1]:
        raise ValueError(
            f"key must be (N, C, L, G * d) with G * d dividing D = {hidden_size} (it is tiled over the heads), got "
            f"{tuple(key.shape)} for gates {tuple(gates.shape)}."
        )
    if initial_state is not None and initial_state.shape != (gates.shape[0], 2, hidden_size):
        raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}, expected "
                         f"{(gates.shape[0], 2, hidden_size)} (N, 2, D).")
    for name, tensor in (("gates", gates), ("value", value), ("key", key), ("initial_state", initial_state)):
        if tensor is not None:
            _check_dtype(name, tensor)
    _check_usable(*(t for t in (gates, value, key, initial_state) if t is not None))
    return _gated_chunk_scan_op(gates, value, key, initial_state)


def chunk_scan(gates: torch.Tensor, inputs: torch.Tensor, initial_state: torch.Tensor | None = None) -> torch.Tensor:
    """
    `h[:, c, l] = gates[:, c, l] * h[:, c, l-1] + inputs[:, c, l]`, each chunk c from zero except chunk 0, which
    starts from `initial_state` when given (as `rat_ops.chunk_scan`).

    Args:
        gates: (N, C, L, F). inputs: (N, C, L, S, F), S streams sharing the gates. initial_state: (N, S, F) or None.
            float32, bfloat16 or float16, on a device where `triton_is_usable`.
    Returns:
        (N, C, L, S, F) float32 states, differentiable with respect to all three inputs (fp32 accumulation).
    """
    if gates.dim() != 4 or inputs.dim() != 5:
        raise ValueError(
            f"chunk_scan takes gates (N, C, L, F) and inputs (N, C, L, S, F), got {tuple(gates.shape)} and "
            f"{tuple(inputs.shape)}."
        )
    num_rows, num_chunks, chunk_size, num_streams, num_features = inputs.shape
    if gates.shape != (num_rows, num_chunks, chunk_size, num_features):
        raise ValueError(f"gates {tuple(gates.shape)} do not match inputs {tuple(inputs.shape)}: expected "
                         f"{(num_rows, num_chunks, chunk_size, num_features)}.")
    if initial_state is not None and initial_state.shape != (num_rows, num_streams, num_features):
        raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}, expected "
                         f"{(num_rows, num_streams, num_features)} (N, S, F).")
    for name, tensor in (("gates", gates), ("inputs", inputs), ("initial_state", initial_state)):
        if tensor is not None:
            _check_dtype(name, tensor)
    _check_usable(*(t for t in (gates, inputs, initial_state) if t is not None))
    return _chunk_scan_op(gates, inputs, initial_state)


def _check_attention_inputs(query, own_score, own_value, key_summaries, value_summaries, history_count):
    if query.dim() != 5:
        raise ValueError(f"query must be (N, L, H, C, d), got shape {tuple(query.shape)}.")
    num_rows, chunk_size, num_heads, num_chunks, head_dim = query.shape
    if own_score.shape != query.shape[:-1]:
        raise ValueError(f"own_score must be (N, L, H, C) = {tuple(query.shape[:-1])}, got {tuple(own_score.shape)}.")
    if own_value.shape != query.shape:
        raise ValueError(f"own_value must have the query's shape {tuple(query.shape)}, got {tuple(own_value.shape)}.")
    if key_summaries.dim() != 4 or key_summaries.shape[:2] != (num_rows, num_heads) or key_summaries.shape[3] != head_dim:
        raise ValueError(
            f"key_summaries must be (N, H, P + C - 1, d) with N={num_rows}, H={num_heads}, d={head_dim}, got "
            f"{tuple(key_summaries.shape)}."
        )
    if value_summaries.shape != key_summaries.shape:
        raise ValueError(f"value_summaries {tuple(value_summaries.shape)} must match key_summaries {tuple(key_summaries.shape)}.")
    num_history = key_summaries.shape[2] - (num_chunks - 1)
    if num_history < 0 or (history_count is None and num_history != 0):
        expected = "C - 1" if history_count is None else "P + C - 1"
        raise ValueError(
            f"{num_chunks} query chunks need {expected} key summaries ({num_chunks - 1} new ones"
            f"{'' if history_count is None else ' after the history slots'}), got {key_summaries.shape[2]}"
            f"{'; pass history_count for history slots' if history_count is None else ''}."
        )
    if history_count is not None:
        if history_count.shape != (num_rows,) or history_count.is_floating_point():
            raise ValueError(f"history_count must be (N,) = ({num_rows},) integers, got {history_count.dtype} "
                             f"{tuple(history_count.shape)}.")
    for name, tensor in (("query", query), ("own_score", own_score), ("own_value", own_value),
                         ("key_summaries", key_summaries), ("value_summaries", value_summaries)):
        _check_dtype(name, tensor)
    if len({query.dtype, own_value.dtype, key_summaries.dtype, value_summaries.dtype}) != 1:
        raise TypeError(
            "query, own_value, key_summaries and value_summaries must share one dtype, got "
            f"{query.dtype}, {own_value.dtype}, {key_summaries.dtype}, {value_summaries.dtype}."
        )
    _check_usable(*(t for t in (query, own_score, own_value, key_summaries, value_summaries, history_count) if t is not None))


def chunk_attention(
    query: torch.Tensor,
    own_score: torch.Tensor,
    own_value: torch.Tensor,
    key_summaries: torch.Tensor,
    value_summaries: torch.Tensor,
    history_count: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """
    Each token's ONE softmax over its own running summary, the valid history slots of its row and the summaries of
    the earlier chunks of this call (as `rat_ops.chunk_attention`).

    Shapes (N independent rows, L tokens per chunk, H heads, C query chunks, d head size):
        query: (N, L, H, C, d), rotated by each token's chunk index.
        own_score: (N, L, H, C), the unscaled score of the token's own key (`q . k_own`), fp32 preferably.
        own_value: (N, L, H, C, d).
        key_summaries, value_summaries: (N, H, P + C - 1, d): P history slots, then the summaries of query chunks
            0..C-2 of this call.
        history_count: None (then P must be 0), or (N,) integers: how many of the P history slots of each row are
            valid. Values outside [0, P] are clamped to it.
        scale: the softmax scale (1 / sqrt(d)).
    Query chunk i of row n sees: its own term (score own_score * scale, value own_value), history slots
    j < history_count[n], new summaries k < i. Returns (N, L, H, C, d) in the query's dtype; differentiable with
    respect to the five floating inputs. Any strides: the kernels read the model's permuted views in place.
    """
    _check_attention_inputs(query, own_score, own_value, key_summaries, value_summaries, history_count)
    out, _ = _chunk_attention_op(
        query, own_score, own_value, key_summaries, value_summaries, history_count, float(scale)
    )
    return out


def decode_attention(
    query: torch.Tensor,
    own_score: torch.Tensor,
    own_value: torch.Tensor,
    key_summaries: torch.Tensor,
    value_summaries: torch.Tensor,
    history_count: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """
    The decode step (as `rat_ops.decode_attention`): one new token per row over the cached summaries, read in place.

    Args:
        query: (B, H, d) rotated. own_score: (B, H) (fp32 preferably). own_value: (B, H, d).
        key_summaries, value_summaries: (B, H, P, d), the cache; the first history_count[b] slots of row b are valid.
        history_count: (B,) integers. scale: the softmax scale.
    Returns:
        (B, H, d) in own_value's dtype. One program per (row, head) reads its visible summaries once.
    """
    if query.dim() != 3 or own_score.shape != query.shape[:2] or own_value.shape != query.shape:
        raise ValueError(
            f"decode_attention takes query (B, H, d), own_score (B, H) and own_value (B, H, d), got "
            f"{tuple(query.shape)}, {tuple(own_score.shape)} and {tuple(own_value.shape)}."
        )
    # a chunk attention with one chunk of one token per row: (B, L=1, H, C=1, d), views of the inputs
    out = chunk_attention(
        query[:, None, :, None], own_score[:, None, :, None], own_value[:, None, :, None], key_summaries,
        value_summaries, history_count, scale,
    )
    return out[:, 0, :, 0]


# ============================================================================================== self check


@functools.cache
def triton_self_check(
    device: torch.device, dtype: torch.dtype, num_heads: int, head_dim: int, num_qk_groups: int, chunk_size: int
) -> str | None:
    """
    Compile and launch every kernel once, forward and backward, on a tiny problem with the model's head layout, chunk
    size, device and dtype (so that the real calls then find the same compiled kernels in Triton's cache). None when
    all ran, else why one could not (a `TritonKernelError`'s message): the caller then uses the PyTorch path. Cached
    per arguments; a few seconds on a GPU the first time (the compile time the first real call would spend).
    """
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    # more query rows than the one-program-per-row kernel takes, so that the blocked kernels run
    hidden_size, num_chunks, history = num_heads * head_dim, ROW_KERNEL_MAX_ROWS // chunk_size + 2, 2

    def tensor(*shape, dtype=dtype):
        return torch.rand(*shape, generator=generator, device=device, dtype=torch.float32).to(dtype).requires_grad_()

    try:
        gates = tensor(1, num_chunks, chunk_size, hidden_size, dtype=torch.float32)
        states = gated_chunk_scan(gates, tensor(1, num_chunks, chunk_size, hidden_size),
                                  tensor(1, num_chunks, chunk_size, num_qk_groups * head_dim),
                                  tensor(1, 2, hidden_size, dtype=torch.float32))
        states.sum().backward()
        for counts in (None, torch.tensor([history], device=device)):
            num_history = 0 if counts is None else history
            attention = chunk_attention(
                tensor(1, chunk_size, num_heads, num_chunks, head_dim),
                tensor(1, chunk_size, num_heads, num_chunks, dtype=torch.float32),
                tensor(1, chunk_size, num_heads, num_chunks, head_dim),
                tensor(1, num_heads, num_history + num_chunks - 1, head_dim),
                tensor(1, num_heads, num_history + num_chunks - 1, head_dim),
                counts, head_dim**-0.5,
            )
            attention.float().sum().backward()
        with torch.no_grad():
            decode_attention(tensor(2, num_heads, head_dim), tensor(2, num_heads, dtype=torch.float32),
                             tensor(2, num_heads, head_dim), tensor(2, num_heads, history, head_dim),
                             tensor(2, num_heads, history, head_dim), torch.tensor([1, history], device=device),
                             head_dim**-0.5)
    except TritonKernelError as error:
        return str(error)
    return None


__all__ = [
    "gated_chunk_scan", "chunk_scan", "chunk_attention", "decode_attention", "triton_unavailable_reason",
    "triton_self_check", "triton_is_usable", "TritonKernelError", "TRITON_IMPORT_ERROR", "SUPPORTED_DTYPES",
    "MAX_HEAD_DIM", "MIN_CAPABILITY",
]
