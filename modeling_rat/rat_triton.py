"""Triton kernels of the RAT mixer: the intra-chunk scan and the inter-chunk attention, forward and backward.

They offer the signatures and semantics of `rat_ops.chunk_scan` and `rat_ops.chunk_attention`, so the model can
switch between the PyTorch path and these kernels (`rat_implementation="triton"`, or `"auto"` on CUDA):

* `chunk_scan(gates, inputs, initial_state)`: `h_l = gates_l * h_{l-1} + inputs_l` inside every chunk. One program
  per (chunk, block of features) walks the L steps of its chunk, keeping the S streams' states in registers; the
  backward is the reverse scan. Everything is accumulated in fp32.
* `chunk_attention(query, own_score, own_value, key_summaries, value_summaries, history_count, scale)`: every token's
  ONE softmax over its own running summary, the valid history slots of its row and the summaries of earlier chunks
  of the call. An online-softmax ("flash") kernel over the summaries; the own term seeds the running max, sum and
  accumulator, so it is merged inside the kernel and no row is ever empty. The forward also returns the
  log-sum-exp, from which the backward recomputes the probabilities (two kernels: one per block of queries for the
  query-side gradients, one per block of summaries for the key and value gradients, without atomics). Small
  problems (the decode step: one query per row and head) use a kernel with one program per query row.

Both are `torch.library` custom ops with registered autograd and fake (meta) implementations, so `torch.compile`
traces through them without graph breaks.

Without a GPU the kernels run on CPU tensors under Triton's interpreter: set `TRITON_INTERPRET=1` before this module
is imported (the kernels are built at import). `triton_is_usable(device)` says whether the kernels can run on a
device. Importing this module never fails when triton is missing; calling the kernels then raises a clear error.
"""

import re

import torch


try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR = None
except ImportError as error:  # the module stays importable; `triton_is_usable` answers False
    triton, tl = None, None
    TRITON_IMPORT_ERROR = error


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOG2_E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the kernels work in base 2
LN_2 = 0.6931471805599453  # log(x) = log2(x) * ln(2)

# Query rows per (row, head) up to which the attention forward uses one program per query row (the decode kernel).
ROW_KERNEL_MAX_ROWS = 8

# Names of the custom ops: the module may be loaded twice in one process (installed package and a copy next to a
# checkpoint loaded with trust_remote_code), and each copy must register its own ops.
_LIBRARY = re.sub(r"\W", "_", __name__)


def triton_is_usable(device: torch.device | str, dtype: torch.dtype | None = None) -> bool:
    """
    Whether the kernels of this module can run on tensors of `device` (and `dtype`, if given): triton is importable
    and either the device is a CUDA GPU, or the kernels were built by Triton's interpreter (`TRITON_INTERPRET=1` set
    before import) and the device is the CPU.
    """
    if triton is None:
        return False
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and KERNELS_INTERPRETED


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


def _next_power_of_2(value: int) -> int:
    return 1 << max(0, (int(value) - 1).bit_length())


# ================================================================================================== kernels

if triton is not None:
    _LOG2_E = tl.constexpr(LOG2_E)
    _LN_2 = tl.constexpr(LN_2)

    # ------------------------------------------------------------------------------------------ chunk scan

    @triton.jit
    def _and(block_mask, condition):
        """`block_mask & condition` for a scalar condition (Triton's interpreter mistypes `block & scalar` masks)."""
        return tl.where(condition, block_mask, False)

    @triton.jit
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

    @triton.jit
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
    # log-sum-exp is in natural units (lse = log sum exp(scale * q . k)).

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

    @triton.jit
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
        row_block = tl.program_id(0)
        row_head = tl.program_id(1)
        n = (row_head // num_heads).to(tl.int64)
        h = (row_head % num_heads).to(tl.int64)
        num_rows = chunk_size * num_chunks
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < num_rows
        query_chunk = rows // chunk_size
        token = rows % chunk_size
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < head_dim
        tile_mask = row_mask[:, None] & dim_mask[None, :]

        query = tl.load(
            query_ptr + n * stride_qn + h * stride_qh + token[:, None] * stride_ql + query_chunk[:, None] * stride_qc
            + dims[None, :] * stride_qd, mask=tile_mask, other=0.0,
        )
        own_score = tl.load(
            own_score_ptr + n * stride_sn + h * stride_sh + token * stride_sl + query_chunk * stride_sc,
            mask=row_mask, other=0.0,
        ).to(tl.float32)
        own_value = tl.load(
            own_value_ptr + n * stride_vn + h * stride_vh + token[:, None] * stride_vl + query_chunk[:, None] * stride_vc
            + dims[None, :] * stride_vd, mask=tile_mask, other=0.0,
        ).to(tl.float32)
        # The own term seeds the online softmax: max = its score, sum = 1, accumulator = its value.
        running_max = own_score * qk_scale
        running_sum = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
        accumulator = own_value

        keys_base = keys_ptr + n * stride_kn + h * stride_kh
        values_base = values_ptr + n * stride_un + h * stride_uh
        # History slots j < history_count[n]: seen by every query of the row.
        if HAS_HISTORY:
            history_count = tl.minimum(tl.maximum(tl.load(history_count_ptr + n).to(tl.int32), 0), num_history)
            for start in range(0, history_count, BLOCK_N):
                slots = start + tl.arange(0, BLOCK_N)
                slot_mask = slots < history_count
                key_mask = slot_mask[:, None] & dim_mask[None, :]
                keys = tl.load(keys_base + slots[:, None] * stride_kk + dims[None, :] * stride_kd, mask=key_mask, other=0.0)
                values = tl.load(values_base + slots[:, None] * stride_uk + dims[None, :] * stride_ud, mask=key_mask, other=0.0)
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
            keys = tl.load(keys_base + slots[:, None] * stride_kk + dims[None, :] * stride_kd, mask=key_mask, other=0.0)
            values = tl.load(values_base + slots[:, None] * stride_uk + dims[None, :] * stride_ud, mask=key_mask, other=0.0)
            running_max, running_sum, accumulator = _attention_block_update(
                query, keys, values, summaries[None, :] < query_chunk[:, None], running_max, running_sum, accumulator,
                qk_scale, UPCAST, PRECISION,
            )

        out = accumulator / running_sum[:, None]
        tl.store(
            out_ptr + n * stride_on + h * stride_oh + token[:, None] * stride_ol + query_chunk[:, None] * stride_oc
            + dims[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=tile_mask,
        )
        lse = (running_max + tl.log2(running_sum)) * _LN_2  # natural log-sum-exp
        tl.store(lse_ptr + row_head.to(tl.int64) * num_rows + rows, lse, mask=row_mask)

    @triton.jit
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
        row_head = tl.program_id(0)
        query_row = tl.program_id(1)
        n = (row_head // num_heads).to(tl.int64)
        h = (row_head % num_heads).to(tl.int64)
        query_chunk = query_row // chunk_size
        token = query_row % chunk_size
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < head_dim

        query = tl.load(
            query_ptr + n * stride_qn + h * stride_qh + token * stride_ql + query_chunk * stride_qc + dims * stride_qd,
            mask=dim_mask, other=0.0,
        ).to(tl.float32)
        own_score = tl.load(own_score_ptr + n * stride_sn + h * stride_sh + token * stride_sl + query_chunk * stride_sc)
        running_max = own_score.to(tl.float32) * qk_scale
        running_sum = running_max * 0.0 + 1.0
        accumulator = tl.load(
            own_value_ptr + n * stride_vn + h * stride_vh + token * stride_vl + query_chunk * stride_vc + dims * stride_vd,
            mask=dim_mask, other=0.0,
        ).to(tl.float32)

        keys_base = keys_ptr + n * stride_kn + h * stride_kh
        values_base = values_ptr + n * stride_un + h * stride_uh
        history_count = 0
        if HAS_HISTORY:
            history_count = tl.minimum(tl.maximum(tl.load(history_count_ptr + n).to(tl.int32), 0), num_history)
        # Visible key indices: [0, history_count) then [P, P + query_chunk), walked as one range of "visible" slots.
        num_visible = history_count + query_chunk
        for start in range(0, num_visible, BLOCK_N):
            visible = start + tl.arange(0, BLOCK_N)
            visible_mask = visible < num_visible
            slots = tl.where(visible < history_count, visible, visible - history_count + num_history)
            key_mask = visible_mask[:, None] & dim_mask[None, :]
            keys = tl.load(keys_base + slots[:, None] * stride_kk + dims[None, :] * stride_kd, mask=key_mask, other=0.0)
            values = tl.load(values_base + slots[:, None] * stride_uk + dims[None, :] * stride_ud, mask=key_mask, other=0.0)
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
            out_ptr + n * stride_on + h * stride_oh + token * stride_ol + query_chunk * stride_oc + dims * stride_od,
            out.to(out_ptr.dtype.element_ty), mask=dim_mask,
        )
        lse = (running_max + tl.log2(running_sum)) * _LN_2
        tl.store(lse_ptr + row_head.to(tl.int64) * chunk_size * num_chunks + query_row, lse)

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

    @triton.jit
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
        row_block = tl.program_id(0)
        row_head = tl.program_id(1)
        n = (row_head // num_heads).to(tl.int64)
        h = (row_head % num_heads).to(tl.int64)
        num_rows = chunk_size * num_chunks
        rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < num_rows
        query_chunk = rows // chunk_size
        token = rows % chunk_size
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < head_dim
        tile_mask = row_mask[:, None] & dim_mask[None, :]

        query_offsets = (n * stride_qn + h * stride_qh + token[:, None] * stride_ql + query_chunk[:, None] * stride_qc
                         + dims[None, :] * stride_qd)
        score_offsets = n * stride_sn + h * stride_sh + token * stride_sl + query_chunk * stride_sc
        value_offsets = (n * stride_vn + h * stride_vh + token[:, None] * stride_vl + query_chunk[:, None] * stride_vc
                         + dims[None, :] * stride_vd)
        query = tl.load(query_ptr + query_offsets, mask=tile_mask, other=0.0)
        own_score = tl.load(own_score_ptr + score_offsets, mask=row_mask, other=0.0).to(tl.float32)
        own_value = tl.load(own_value_ptr + value_offsets, mask=tile_mask, other=0.0).to(tl.float32)
        out = tl.load(
            out_ptr + n * stride_on + h * stride_oh + token[:, None] * stride_ol + query_chunk[:, None] * stride_oc
            + dims[None, :] * stride_od, mask=tile_mask, other=0.0,
        ).to(tl.float32)
        grad_out = tl.load(
            grad_out_ptr + n * stride_gn + h * stride_gh + token[:, None] * stride_gl + query_chunk[:, None] * stride_gc
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
        keys_base = keys_ptr + n * stride_kn + h * stride_kh
        values_base = values_ptr + n * stride_un + h * stride_uh
        if HAS_HISTORY:
            history_count = tl.minimum(tl.maximum(tl.load(history_count_ptr + n).to(tl.int32), 0), num_history)
            for start in range(0, history_count, BLOCK_N):
                slots = start + tl.arange(0, BLOCK_N)
                slot_mask = slots < history_count
                key_mask = slot_mask[:, None] & dim_mask[None, :]
                keys = tl.load(keys_base + slots[:, None] * stride_kk + dims[None, :] * stride_kd, mask=key_mask, other=0.0)
                values = tl.load(values_base + slots[:, None] * stride_uk + dims[None, :] * stride_ud, mask=key_mask, other=0.0)
                grad_query = _attention_query_grad_block(
                    query, grad_out, lse2, delta, keys, values, slot_mask[None, :], grad_query, qk_scale,
                    UPCAST, PRECISION,
                )
        last_chunk = tl.minimum((row_block * BLOCK_M + BLOCK_M - 1) // chunk_size, num_chunks - 1)
        for start in range(0, last_chunk, BLOCK_N):
            summaries = start + tl.arange(0, BLOCK_N)
            key_mask = (summaries < last_chunk)[:, None] & dim_mask[None, :]
            slots = num_history + summaries
            keys = tl.load(keys_base + slots[:, None] * stride_kk + dims[None, :] * stride_kd, mask=key_mask, other=0.0)
            values = tl.load(values_base + slots[:, None] * stride_uk + dims[None, :] * stride_ud, mask=key_mask, other=0.0)
            grad_query = _attention_query_grad_block(
                query, grad_out, lse2, delta, keys, values, summaries[None, :] < query_chunk[:, None], grad_query,
                qk_scale, UPCAST, PRECISION,
            )
        grad_query = grad_query * scale
        tl.store(grad_query_ptr + query_offsets, grad_query.to(grad_query_ptr.dtype.element_ty), mask=tile_mask)

    @triton.jit
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
        key_block = tl.program_id(0)
        row_head = tl.program_id(1)
        n = (row_head // num_heads).to(tl.int64)
        h = (row_head % num_heads).to(tl.int64)
        num_rows = chunk_size * num_chunks
        num_keys = num_history + num_chunks - 1
        first_slot = key_block * BLOCK_N
        slots = first_slot + tl.arange(0, BLOCK_N)
        slot_mask = slots < num_keys
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < head_dim
        key_mask = slot_mask[:, None] & dim_mask[None, :]
        key_offsets = n * stride_kn + h * stride_kh + slots[:, None] * stride_kk + dims[None, :] * stride_kd
        value_offsets = n * stride_un + h * stride_uh + slots[:, None] * stride_uk + dims[None, :] * stride_ud
        keys = tl.load(keys_ptr + key_offsets, mask=key_mask, other=0.0)
        values = tl.load(values_ptr + value_offsets, mask=key_mask, other=0.0)

        history_count = 0
        if HAS_HISTORY:
            history_count = tl.minimum(tl.maximum(tl.load(history_count_ptr + n).to(tl.int32), 0), num_history)
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
            token = rows % chunk_size
            tile_mask = row_mask[:, None] & dim_mask[None, :]
            query = tl.load(
                query_ptr + n * stride_qn + h * stride_qh + token[:, None] * stride_ql + query_chunk[:, None] * stride_qc
                + dims[None, :] * stride_qd, mask=tile_mask, other=0.0,
            )
            grad_out = tl.load(
                grad_out_ptr + n * stride_gn + h * stride_gh + token[:, None] * stride_gl
                + query_chunk[:, None] * stride_gc + dims[None, :] * stride_gd, mask=tile_mask, other=0.0,
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


# ============================================================================================ launch helpers

# Tests set this to True: every buffer a kernel must fill is then allocated full of NaN, so that any element a kernel
# fails to write shows up in the results.
POISON_OUTPUTS = False


def _output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer for kernel outputs (NaN-filled when POISON_OUTPUTS is set)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _output_like(tensor: torch.Tensor) -> torch.Tensor:
    """`empty_like` (same strides for dense tensors) for kernel outputs (NaN-filled when POISON_OUTPUTS is set)."""
    buffer = torch.empty_like(tensor)
    return buffer.fill_(float("nan")) if POISON_OUTPUTS else buffer


def _scan_block_features(num_features: int) -> int:
    return min(_next_power_of_2(num_features), 256 if not KERNELS_INTERPRETED else 64)


def _chunk_scan_forward(gates: torch.Tensor, inputs: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    num_rows, num_chunks, chunk_size, num_streams, num_features = inputs.shape
    states = _output(inputs.shape, dtype=torch.float32, device=inputs.device)
    if states.numel() == 0:
        return states
    block_features = _scan_block_features(num_features)
    grid = (num_rows * num_chunks, triton.cdiv(num_features, block_features))
    _chunk_scan_forward_kernel[grid](
        gates, inputs, initial_state if initial_state is not None else inputs, states,
        num_chunks, chunk_size, num_features,
        NUM_STREAMS=num_streams,
        BLOCK_STREAMS=_next_power_of_2(num_streams),
        BLOCK_FEATURES=block_features,
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
    block_features = _scan_block_features(num_features)
    grid = (num_rows * num_chunks, triton.cdiv(num_features, block_features))
    _chunk_scan_backward_kernel[grid](
        grad_states, gates, states, initial_state if initial_state is not None else states,
        grad_gates, grad_inputs, grad_initial,
        num_chunks, chunk_size, num_features,
        NUM_STREAMS=num_streams,
        BLOCK_STREAMS=_next_power_of_2(num_streams),
        BLOCK_FEATURES=block_features,
        HAS_INITIAL=initial_state is not None,
    )
    return grad_gates, grad_inputs, grad_initial


# Tiles of the blocked attention kernels (queries x summaries), per input dtype, for heads up to 64 and above 64.
# Chosen to stay well inside the shared memory of A100/H100-class GPUs (at most 70 KB per block with two pipeline
# stages, as `scripts/compile_triton_kernels.py` reports), not tuned on a GPU: to tune, change them and compare
# with `benchmarks/bench_triton.py`.
ATTENTION_TILES = {
    "16bit": {"small_head": (64, 64), "large_head": (64, 32)},
    "fp32": {"small_head": (32, 32), "large_head": (32, 32)},
}
ATTENTION_NUM_WARPS = 4
ATTENTION_NUM_STAGES = 2
ROWS_BLOCK_N = 64  # summaries per step of the one-query-per-program kernel (memory-bound: wide loads)


def _attention_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Launch parameters of the attention kernels. tl.dot needs every side >= 16; the head is padded to a power of 2."""
    block_d = max(16, _next_power_of_2(head_dim))
    config = dict(
        BLOCK_D=block_d,
        UPCAST=KERNELS_INTERPRETED and dtype == torch.bfloat16,
        # fp32 inputs: exact fp32 products (no TF32), as the PyTorch path computes them; ignored for 16-bit inputs
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )
    if KERNELS_INTERPRETED:  # small tiles: tests then cross tile borders with small shapes
        return dict(config, BLOCK_M=16, BLOCK_N=16)
    tiles = ATTENTION_TILES["fp32" if dtype == torch.float32 else "16bit"]
    block_m, block_n = tiles["small_head" if block_d <= 64 else "large_head"]
    return dict(config, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=ATTENTION_NUM_WARPS, num_stages=ATTENTION_NUM_STAGES)


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
    config = _attention_config(head_dim, query.dtype)
    rows_per_head = chunk_size * num_chunks
    if kernel == "auto":
        kernel = "rows" if rows_per_head <= ROW_KERNEL_MAX_ROWS else "blocked"
    if kernel == "rows":
        _chunk_attention_rows_kernel[(num_rows * num_heads, rows_per_head)](
            *arguments, HAS_HISTORY=has_history, BLOCK_N=16 if KERNELS_INTERPRETED else ROWS_BLOCK_N,
            BLOCK_D=config["BLOCK_D"],
        )
    elif kernel == "blocked":
        grid = (triton.cdiv(rows_per_head, config["BLOCK_M"]), num_rows * num_heads)
        _chunk_attention_forward_kernel[grid](*arguments, HAS_HISTORY=has_history, **config)
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
    config = _attention_config(head_dim, query.dtype)
    rows_per_head = chunk_size * num_chunks
    _chunk_attention_backward_query_kernel[(triton.cdiv(rows_per_head, config["BLOCK_M"]), num_rows * num_heads)](
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
    _chunk_attention_backward_key_kernel[(triton.cdiv(num_keys, config["BLOCK_N"]), num_rows * num_heads)](
        query, keys, values, count_argument, lse, grad_out, delta, grad_keys, grad_values,
        *query.stride(), *keys.stride(), *values.stride(), *grad_out.stride(),
        num_heads, chunk_size, num_chunks, num_history, head_dim, scale * LOG2_E, scale,
        HAS_HISTORY=has_history, **config,
    )
    return grad_query, grad_own_score, grad_own_value, grad_keys, grad_values


# ============================================================================================== custom ops


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself if `empty_like` reproduces its strides (dense, possibly permuted), else a contiguous copy."""
    if torch.empty_like(tensor).stride() == tensor.stride():
        return tensor
    return tensor.contiguous()


@torch.library.custom_op(f"{_LIBRARY}::chunk_scan", mutates_args=())
def _chunk_scan_op(gates: torch.Tensor, inputs: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    return _chunk_scan_forward(gates, inputs, initial_state)


@_chunk_scan_op.register_fake
def _(gates, inputs, initial_state):
    return inputs.new_empty(inputs.shape, dtype=torch.float32)


@torch.library.custom_op(f"{_LIBRARY}::chunk_scan_backward", mutates_args=())
def _chunk_scan_backward_op(
    grad_states: torch.Tensor, gates: torch.Tensor, states: torch.Tensor, initial_state: torch.Tensor | None,
    inputs_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _chunk_scan_backward(grad_states.contiguous(), gates, states, initial_state, inputs_dtype)


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


@torch.library.custom_op(f"{_LIBRARY}::chunk_attention_backward", mutates_args=())
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
    return (
        query.new_empty(query.shape), own_score.new_empty(own_score.shape), own_value.new_empty(own_value.shape),
        key_summaries.new_empty(key_summaries.shape), value_summaries.new_empty(value_summaries.shape),
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
    return _chunk_scan_op(
        gates.contiguous(), inputs.contiguous(), initial_state.contiguous() if initial_state is not None else None
    )


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
    respect to the five floating inputs. The decode step is L = C = 1 with P the cache capacity.
    """
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
    out, _ = _chunk_attention_op(
        query, own_score, own_value, key_summaries, value_summaries, history_count, float(scale)
    )
    return out


__all__ = ["chunk_scan", "chunk_attention", "triton_is_usable", "TRITON_IMPORT_ERROR", "SUPPORTED_DTYPES"]
