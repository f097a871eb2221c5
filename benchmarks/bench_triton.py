"""
Benchmark of the RAT mixer's Triton kernels against softmax attention (SDPA / FlashAttention) and the fast PyTorch
path: layer forward+backward, prefill, and one decode step.

    python benchmarks/bench_triton.py                 # GPU: the paper's setting (see below), writes JSON and PNG
    python benchmarks/bench_triton.py --quick         # small shapes; on a machine without GPU, the CPU + Triton's
                                                      # interpreter (a smoke run: its timings mean nothing)

Setting (paper, section on efficiency): 262,144 tokens per batch at sequence lengths 4K ... 128K (batch = tokens /
length), hidden size 2048, 16 heads of 128, 2 key/query groups, chunk size 16, bf16. The "layer" is the token mixer
with its projections (`RatMixer` / `RatAttention` of the model); the MLP is the same for both and left out.
The decode step: batch 512 with 4K tokens of context, one new token per row.

Every measurement first checks that its outputs (and, for training, its gradients) agree with a reference, then
times: the Triton path against the fast PyTorch path (itself tested against the token-by-token reference in
tests/), and once, at a small shape, against `rat_reference` itself; attention against SDPA's math backend.

Figures: median time over `--repeats` runs after warm-up (CUDA events), model FLOPs (matrix products only: a causal
softmax layer costs 2 * 2 * D per query-key pair, a RAT layer's queries see T / (2 L) summaries on average) and the
achieved TFLOP/s and fraction of the GPU's dense bf16 peak; compulsory bytes (inputs, outputs, weights, caches)
and the fraction of the memory bandwidth; the roofline floor max(FLOPs / peak, bytes / bandwidth) and how far
above it each measurement is. Peaks come from the GPU's name (H100 SXM, H200, A100) or `--peak-tflops` and
`--peak-bandwidth`.
"""

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels can only run under Triton's interpreter, which must be chosen before the
    # kernels are built (at the import of modeling_rat.rat_triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from configuration_rat import RatConfig  # noqa: E402
from modeling_rat.cache_rat import RatChunkCacheLayer  # noqa: E402
from modeling_rat.modeling_rat import RatAttention, RatMixer  # noqa: E402
from modeling_rat.rat_layout import RatSequenceLayout  # noqa: E402
from modeling_rat.rat_ops import apply_rotary, rotary_cos_sin  # noqa: E402


try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    def tqdm(iterable, **kwargs):
        return iterable


# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s and memory bandwidth in GB/s, from NVIDIA's data sheets.
GPU_PEAKS = {
    "H200": (989.4, 4800.0),
    "H100 SXM": (989.4, 3350.0),
    "H100 PCIe": (756.0, 2000.0),
    "H100": (989.4, 3350.0),
    "A100-SXM4-80GB": (312.0, 2039.0),
    "A100": (312.0, 1555.0),
}


def gpu_peaks(name: str):
    for key, peaks in GPU_PEAKS.items():
        if key.lower() in name.lower():
            return peaks
    return None, None


# ================================================================================================ measurement


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function, device, repeats: int, warmup: int) -> float:
    """Median wall time of `function()` in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            function()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def assert_agree(name: str, got: torch.Tensor, want: torch.Tensor, fraction: float):
    """max |got - want| <= fraction * max |want| (bf16 paths differ by a few bf16 roundings)."""
    error = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    if not math.isfinite(error) or error > fraction * max(scale, 1e-6):
        raise AssertionError(f"{name}: outputs disagree (max error {error:.3g}, scale {scale:.3g}); not timing it.")
    return error / max(scale, 1e-12)


# ================================================================================================ FLOPs, bytes


def projection_flops(config: RatConfig, kind: str) -> float:
    """Matrix-product FLOPs per token of the mixer's projections."""
    hidden, groups_width = config.hidden_size, config.num_qk_groups * config.head_dim
    if kind == "rat":  # z, v, f: D -> D; q, k: D -> G d; o: D -> D
        return 2 * hidden * (4 * hidden + 2 * groups_width)
    return 2 * hidden * 4 * hidden  # q, k, v, o


def attention_flops_per_token(config: RatConfig, kind: str, seq_len: int) -> float:
    """Forward FLOPs per token of the score and value products (causal: on average half the keys)."""
    hidden = config.hidden_size
    visible = seq_len / (2 * config.chunk_size) if kind == "rat" else seq_len / 2
    return 4 * hidden * visible


def layer_flops(config, kind, seq_len, tokens, backward: bool) -> float:
    projections = projection_flops(config, kind) * tokens
    attention = attention_flops_per_token(config, kind, seq_len) * tokens
    if not backward:
        return projections + attention
    # backward: two products per projection; attention recomputes the scores (5 products instead of 2)
    return 3 * projections + 3.5 * attention


def weight_bytes(config, kind, element_size=2) -> float:
    return projection_flops(config, kind) / 2 * element_size


def layer_bytes(config, kind, tokens, backward: bool, element_size=2) -> float:
    """Compulsory traffic: the input and output activations (and their gradients), the weights (and theirs)."""
    activations = 2 * tokens * config.hidden_size * element_size
    weights = weight_bytes(config, kind, element_size)
    return (2 if backward else 1) * (activations + weights)


def decode_bytes(config, kind, batch, context, element_size=2) -> float:
    """One decode step: the weights, the cache read (keys and values, or chunk summaries and the running state)."""
    hidden = config.hidden_size
    if kind == "rat":
        cache = batch * 2 * (context // config.chunk_size) * hidden * element_size + 2 * batch * 2 * hidden * 4
    else:
        cache = batch * 2 * (context + 1) * hidden * element_size
    return weight_bytes(config, kind, element_size) + cache + 2 * batch * hidden * element_size


def decode_flops(config, kind, batch, context) -> float:
    visible = context // config.chunk_size if kind == "rat" else context + 1
    return batch * (projection_flops(config, kind) + 4 * config.hidden_size * visible)


def figures(time_ms, flops, nbytes, peak_tflops, peak_bandwidth):
    result = {"time_ms": time_ms, "tflops": flops / time_ms / 1e9, "gbytes_per_s": nbytes / time_ms / 1e6}
    if peak_tflops:
        floor = max(flops / (peak_tflops * 1e12), nbytes / (peak_bandwidth * 1e9)) * 1e3
        result.update(
            fraction_of_peak_flops=result["tflops"] / peak_tflops,
            fraction_of_peak_bandwidth=result["gbytes_per_s"] / peak_bandwidth,
            roofline_floor_ms=floor,
            times_roofline_floor=time_ms / floor,
        )
    return result


# ==================================================================================================== layers


def make_layers(config, device, dtype):
    torch.manual_seed(0)
    rat = RatMixer(config, 0).to(device=device, dtype=dtype)
    attention = RatAttention(config, 0).to(device=device, dtype=dtype)
    with torch.no_grad():
        for module in (rat, attention):
            for parameter in module.parameters():
                parameter.normal_(0.0, config.initializer_range)
        # the official forget-gate initialisation: f = sigmoid(log(U(1, L - 1))) keeps about L tokens of memory
        rat.forget_gate_bias.copy_(torch.empty_like(rat.forget_gate_bias, dtype=torch.float32)
                                   .uniform_(1, max(config.chunk_size - 1, 2)).log_().to(dtype))
    return rat, attention


def run_rat(mixer, implementation, hidden_states, cache_layer=None, layout=None):
    mixer.config.rat_implementation = implementation
    batch, seq_len = hidden_states.shape[:2]
    if layout is None:
        layout = RatSequenceLayout.build(batch, seq_len, hidden_states.device)
    return mixer(hidden_states, layout, cache_layer)


def run_attention(attention, hidden_states, backends):
    batch, seq_len = hidden_states.shape[:2]
    layout = RatSequenceLayout.build(batch, seq_len, hidden_states.device)
    with sdpa_backends(backends):
        return attention(hidden_states, layout, None)


def sdpa_backends(backends):
    if backends is None:
        import contextlib

        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backends)


def flash_backends(device, dtype):
    """FlashAttention when SDPA has it for this device and dtype, else SDPA's default choice."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None, "sdpa"
    from torch.nn.attention import SDPBackend

    probe = torch.randn(1, 1, 128, 128, device=device, dtype=dtype)
    try:
        with sdpa_backends([SDPBackend.FLASH_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(probe, probe, probe, is_causal=True)
        return [SDPBackend.FLASH_ATTENTION], "flash_attention"
    except RuntimeError:
        return None, "sdpa"


def math_backends():
    from torch.nn.attention import SDPBackend

    return [SDPBackend.MATH]


def forward_backward(function, inputs, parameters, grad_output):
    for tensor in [inputs, *parameters]:
        tensor.grad = None
    out = function(inputs)
    out.backward(grad_output)
    return out


def gradients(inputs, parameters):
    return [inputs.grad] + [p.grad for p in parameters]


# =============================================================================================== benchmarks


def check_against_reference(config, device, dtype):
    """Once, at a small shape: the Triton path against the token-by-token reference (`rat_reference`)."""
    mixer, _ = make_layers(config, device, torch.float32)
    hidden = torch.randn(2, 3 * config.chunk_size + 5, config.hidden_size, device=device)
    batch, seq_len = hidden.shape[:2]
    layout = RatSequenceLayout.build(batch, seq_len, device)
    with torch.no_grad():
        got = run_rat(mixer, "triton", hidden, layout=layout)
        mixer.config.rat_implementation = "reference"
        want = mixer(hidden, layout, None)
    return assert_agree("triton vs rat_reference (fp32, small shape)", got, want, 1e-4)


def bench_training(config, mixers, seq_len, tokens, device, dtype, args, attention_backends, peaks):
    """Layer forward+backward and prefill at one sequence length, for RAT (Triton, fast) and attention."""
    rat, attention = mixers
    batch = max(1, tokens // seq_len)
    tokens = batch * seq_len
    torch.manual_seed(seq_len)
    hidden = torch.randn(batch, seq_len, config.hidden_size, device=device, dtype=dtype).requires_grad_()
    grad_output = torch.randn_like(hidden)
    rat_parameters, attention_parameters = list(rat.parameters()), list(attention.parameters())
    results = {"seq_len": seq_len, "batch": batch, "tokens": tokens}

    # --- checks: Triton vs fast (outputs and gradients); attention (flash) vs SDPA math
    outputs = {}
    for implementation in ("triton", "fast"):
        out = forward_backward(lambda x: run_rat(rat, implementation, x), hidden, rat_parameters, grad_output)
        outputs[implementation] = (out.detach(), [g.detach().clone() for g in gradients(hidden, rat_parameters)])
    checks = {"rat_output": assert_agree("RAT triton vs fast: output", outputs["triton"][0], outputs["fast"][0], 2e-2)}
    for index, (got, want) in enumerate(zip(outputs["triton"][1], outputs["fast"][1])):
        name = "input" if index == 0 else [n for n, _ in rat.named_parameters()][index - 1]
        checks[f"rat_grad_{name}"] = assert_agree(f"RAT triton vs fast: gradient of {name}", got, want, 3e-2)
    del outputs
    if seq_len * batch <= args.attention_check_tokens:
        with torch.no_grad():
            flash = run_attention(attention, hidden, attention_backends)
            math_out = run_attention(attention, hidden, math_backends())
        checks["attention_output"] = assert_agree("attention vs SDPA math", flash, math_out, 2e-2)
        del flash, math_out
    results["checks_max_error_over_scale"] = checks

    # --- forward + backward
    timed = {
        "rat_triton": lambda: forward_backward(lambda x: run_rat(rat, "triton", x), hidden, rat_parameters, grad_output),
        "rat_fast": lambda: forward_backward(lambda x: run_rat(rat, "fast", x), hidden, rat_parameters, grad_output),
        "attention": lambda: forward_backward(
            lambda x: run_attention(attention, x, attention_backends), hidden, attention_parameters, grad_output
        ),
    }
    for name, function in timed.items():
        kind = "attention" if name == "attention" else "rat"
        time_ms = time_call(function, device, args.repeats, args.warmup)
        results[f"train_{name}"] = figures(
            time_ms, layer_flops(config, kind, seq_len, tokens, True), layer_bytes(config, kind, tokens, True), *peaks
        )

    # --- prefill: forward without gradients, filling a cache as generation does
    hidden = hidden.detach()

    def rat_prefill(implementation):
        cache_layer = RatChunkCacheLayer()
        with torch.no_grad():
            return run_rat(rat, implementation, hidden, cache_layer)

    def attention_prefill():
        with torch.no_grad():
            return run_attention(attention, hidden, attention_backends)

    with torch.no_grad():
        checks["rat_prefill_output"] = assert_agree("RAT prefill triton vs fast", rat_prefill("triton"), rat_prefill("fast"), 2e-2)
    for name, function in (("rat_triton", lambda: rat_prefill("triton")), ("rat_fast", lambda: rat_prefill("fast")),
                           ("attention", attention_prefill)):
        kind = "attention" if name == "attention" else "rat"
        time_ms = time_call(function, device, args.repeats, args.warmup)
        results[f"prefill_{name}"] = figures(
            time_ms, layer_flops(config, kind, seq_len, tokens, False), layer_bytes(config, kind, tokens, False), *peaks
        )
    return results


def prefilled_rat_cache(mixer, batch, context, device, dtype, tokens_per_call):
    """A RAT cache layer holding `context` tokens per row, filled by the model's own prefill (in pieces)."""
    cache_layer = RatChunkCacheLayer()
    piece = max(mixer.chunk_size, tokens_per_call // batch // mixer.chunk_size * mixer.chunk_size)
    generator = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for start in range(0, context, piece):
            length = min(piece, context - start)
            hidden = torch.randn(batch, length, mixer.hidden_size, device=device, dtype=dtype, generator=generator)
            layout = RatSequenceLayout.build(batch, length, device, cached_columns=cache_layer.get_seq_length())
            run_rat(mixer, "fast", hidden, cache_layer, layout)
    return cache_layer


def bench_decode(config, mixers, batch, context, device, dtype, args, attention_backends, peaks):
    """One decode step per row on top of `context` cached tokens: RAT (Triton, fast) against attention (KV cache)."""
    rat, attention = mixers
    heads, head_dim = config.num_attention_heads, config.head_dim
    torch.manual_seed(context)
    hidden = torch.randn(batch, 1, config.hidden_size, device=device, dtype=dtype)
    prefilled = prefilled_rat_cache(rat, batch, context, device, dtype, args.tokens_per_batch)
    num_calls = args.warmup + args.repeats

    def rat_steps(implementation):
        """A fresh copy of the cache and the step function: each call decodes the next token (the cache grows)."""
        cache_layer = copy.deepcopy(prefilled)
        layouts = iter([RatSequenceLayout.build(batch, 1, device, cached_columns=context + step)
                        for step in range(num_calls + 1)])  # built ahead: not timed

        def step():
            with torch.no_grad():
                return run_rat(rat, implementation, hidden, cache_layer, next(layouts))

        return step

    # Attention with a preallocated KV cache (the best case: no copy of the cache per step).
    key_cache = torch.randn(batch, heads, context + 1, head_dim, device=device, dtype=dtype)
    value_cache = torch.randn(batch, heads, context + 1, head_dim, device=device, dtype=dtype)
    cos, sin = rotary_cos_sin(torch.tensor([context], device=device), head_dim, config.rope_theta, dtype)

    def attention_step(backends=attention_backends):
        with torch.no_grad():
            shape = (batch, 1, heads, head_dim)
            query = apply_rotary(attention.q_proj(hidden).view(shape).transpose(1, 2), cos, sin)
            key = apply_rotary(attention.k_proj(hidden).view(shape).transpose(1, 2), cos, sin)
            key_cache[:, :, context : context + 1] = key
            value_cache[:, :, context : context + 1] = attention.v_proj(hidden).view(shape).transpose(1, 2)
            with sdpa_backends(backends):
                out = torch.nn.functional.scaled_dot_product_attention(query, key_cache, value_cache)
            return attention.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))

    results = {"batch": batch, "context": context}
    checks = {"rat_decode_output": assert_agree("RAT decode triton vs fast", rat_steps("triton")(),
                                                rat_steps("fast")(), 2e-2)}
    if batch * context <= args.attention_check_tokens:
        checks["attention_decode_output"] = assert_agree(
            "attention decode vs SDPA math", attention_step(), attention_step(math_backends()), 2e-2
        )
    results["checks_max_error_over_scale"] = checks
    for name, function in (("rat_triton", rat_steps("triton")), ("rat_fast", rat_steps("fast")),
                           ("attention", attention_step)):
        kind = "attention" if name == "attention" else "rat"
        time_ms = time_call(function, device, args.repeats, args.warmup)
        results[f"decode_{name}"] = figures(
            time_ms, decode_flops(config, kind, batch, context), decode_bytes(config, kind, batch, context), *peaks
        )

    # The attention cores alone: RAT's inter-chunk attention over the cached summaries vs SDPA over the KV cache.
    from modeling_rat import rat_triton

    completed = torch.full((batch,), context // config.chunk_size, device=device)
    summaries = prefilled.keys[:, :, : context // config.chunk_size], prefilled.values[:, :, : context // config.chunk_size]
    query = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
    own_score = torch.randn(batch, heads, device=device)
    own_value = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
    scale = 1 / math.sqrt(head_dim)

    def rat_core():
        with torch.no_grad():
            return rat_triton.decode_attention(query, own_score, own_value, *summaries, completed, scale)

    query_heads = query[:, :, None, :]  # (B, H, 1, d)

    def attention_core():
        with torch.no_grad(), sdpa_backends(attention_backends):
            return torch.nn.functional.scaled_dot_product_attention(query_heads, key_cache, value_cache)

    summary_bytes = 2 * batch * heads * (context // config.chunk_size) * head_dim * summaries[0].element_size()
    kv_bytes = 2 * batch * heads * (context + 1) * head_dim * key_cache.element_size()
    for name, function, flops, nbytes in (
        ("rat_triton", rat_core, 4 * batch * config.hidden_size * (context // config.chunk_size), summary_bytes),
        ("attention", attention_core, 4 * batch * config.hidden_size * (context + 1), kv_bytes),
    ):
        time_ms = time_call(function, device, args.repeats, args.warmup)
        results[f"decode_core_{name}"] = figures(time_ms, flops, nbytes, *peaks)
    return results


# ======================================================================================================= main


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written")
        return
    training = results["training"]
    lengths = [entry["seq_len"] for entry in training]
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for axis, phase in zip(axes[:2], ("train", "prefill")):
        for name, label in (("rat_triton", "RAT (Triton)"), ("rat_fast", "RAT (PyTorch fast path)"),
                            ("attention", f"attention ({results['attention_backend']})")):
            axis.plot(lengths, [entry[f"{phase}_{name}"]["time_ms"] for entry in training], marker="o", label=label)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel("time per layer call (ms)")
        axis.set_title(f"{'forward+backward' if phase == 'train' else 'prefill'}, {results['tokens_per_batch']} tokens per batch")
        axis.legend()
        axis.grid(True, which="both", alpha=0.3)
    decode = results["decode"]
    names = ["decode_rat_triton", "decode_rat_fast", "decode_attention", "decode_core_rat_triton", "decode_core_attention"]
    axes[2].bar(range(len(names)), [decode[name]["time_ms"] for name in names])
    axes[2].set_xticks(range(len(names)), ["RAT\nTriton", "RAT\nfast", "attention", "RAT core\nTriton", "attention\ncore"])
    axes[2].set_ylabel("time (ms)")
    axes[2].set_title(f"one decode step, batch {decode['batch']}, context {decode['context']}")
    title = results["device"] + ("" if results["gpu"] else " (no GPU: Triton interpreter, timings not meaningful)")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (and the only mode without a GPU)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help="sequence lengths (default 4K..128K)")
    parser.add_argument("--tokens-per-batch", type=int, default=None, help="tokens per batch (default 262144)")
    parser.add_argument("--hidden-size", type=int, default=None)
    parser.add_argument("--num-heads", type=int, default=None)
    parser.add_argument("--num-qk-groups", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--decode-batch", type=int, default=None, help="decode batch (default 512)")
    parser.add_argument("--decode-context", type=int, default=None, help="tokens in the cache (default 4096)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--attention-check-tokens", type=int, default=65536,
                        help="check attention against SDPA's math backend up to this many tokens (it is O(T^2))")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, TFLOP/s")
    parser.add_argument("--peak-bandwidth", type=float, default=None, help="memory bandwidth of the GPU, GB/s")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "outputs" / "bench_triton")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_arguments(argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu and not args.quick:
        print("No GPU available: running the small --quick shapes on the CPU (Triton interpreter) instead.")
        args.quick = True
    quick = args.quick
    defaults = (
        dict(seq_lens=[4096, 8192, 16384, 32768, 65536, 131072], tokens_per_batch=262144, hidden_size=2048,
             num_heads=16, decode_batch=512, decode_context=4096, repeats=10, warmup=3)
        if not quick else
        dict(seq_lens=[64, 128] if not gpu else [1024, 4096], tokens_per_batch=256 if not gpu else 16384,
             hidden_size=64 if not gpu else 1024, num_heads=2 if not gpu else 8, decode_batch=4 if not gpu else 64,
             decode_context=64 if not gpu else 1024, repeats=1 if not gpu else 5, warmup=0 if not gpu else 1)
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    dtype = getattr(torch, args.dtype)
    if not gpu:
        dtype = torch.float32  # CPU SDPA and the interpreter: fp32 keeps the smoke run meaningful
    config = RatConfig(
        hidden_size=args.hidden_size, num_attention_heads=args.num_heads, num_qk_groups=args.num_qk_groups,
        chunk_size=args.chunk_size, num_hidden_layers=1, layer_types=["rat"], vocab_size=256,
        initializer_range=0.02,
    )
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()})"
    peak_tflops, peak_bandwidth = gpu_peaks(name) if gpu else (None, None)
    peak_tflops = args.peak_tflops or peak_tflops
    peak_bandwidth = args.peak_bandwidth or peak_bandwidth
    peaks = (peak_tflops, peak_bandwidth) if peak_tflops and peak_bandwidth else (None, None)
    attention_backends, attention_backend = flash_backends(device, dtype)
    print(f"device: {name}; dtype {dtype}; peaks: {peak_tflops} TFLOP/s, {peak_bandwidth} GB/s; "
          f"attention baseline: {attention_backend}")
    if not gpu:
        print("NOTE: no GPU available. This is a smoke run of the benchmark on the CPU with Triton's interpreter: "
              "it checks that everything runs and agrees, but its timings say nothing about GPU performance.")

    results = {
        "device": name, "gpu": gpu, "dtype": str(dtype), "attention_backend": attention_backend,
        "peak_tflops": peak_tflops, "peak_bandwidth_gbs": peak_bandwidth, "tokens_per_batch": args.tokens_per_batch,
        "config": {k: getattr(config, k) for k in ("hidden_size", "num_attention_heads", "head_dim", "num_qk_groups",
                                                   "chunk_size")},
        "torch": torch.__version__, "quick": quick,
    }
    results["reference_check_max_error_over_scale"] = check_against_reference(config, device, dtype)
    mixers = make_layers(config, device, dtype)
    results["training"] = []
    for seq_len in tqdm(args.seq_lens, desc="forward+backward and prefill"):
        entry = bench_training(config, mixers, seq_len, args.tokens_per_batch, device, dtype, args,
                               attention_backends, peaks)
        results["training"].append(entry)
        print(
            f"T={seq_len:>6} B={entry['batch']:>4}: fwd+bwd ms  triton {entry['train_rat_triton']['time_ms']:9.3f}  "
            f"fast {entry['train_rat_fast']['time_ms']:9.3f}  attention {entry['train_attention']['time_ms']:9.3f}  |  "
            f"prefill ms  triton {entry['prefill_rat_triton']['time_ms']:9.3f}  "
            f"fast {entry['prefill_rat_fast']['time_ms']:9.3f}  attention {entry['prefill_attention']['time_ms']:9.3f}"
        )
        if gpu:
            torch.cuda.empty_cache()
    results["decode"] = bench_decode(config, mixers, args.decode_batch, args.decode_context, device, dtype, args,
                                     attention_backends, peaks)
    decode = results["decode"]
    print(
        f"decode B={args.decode_batch} context={args.decode_context}: layer ms triton "
        f"{decode['decode_rat_triton']['time_ms']:.4f} fast {decode['decode_rat_fast']['time_ms']:.4f} attention "
        f"{decode['decode_attention']['time_ms']:.4f}; cores ms triton {decode['decode_core_rat_triton']['time_ms']:.4f} "
        f"attention {decode['decode_core_attention']['time_ms']:.4f}"
    )

    # Ratios measured side by side in this run.
    speedups = {}
    for entry in results["training"]:
        for phase in ("train", "prefill"):
            triton_ms = entry[f"{phase}_rat_triton"]["time_ms"]
            speedups[f"{phase}_T{entry['seq_len']}_attention_over_triton"] = entry[f"{phase}_attention"]["time_ms"] / triton_ms
            speedups[f"{phase}_T{entry['seq_len']}_fast_over_triton"] = entry[f"{phase}_rat_fast"]["time_ms"] / triton_ms
    speedups["decode_attention_over_triton"] = decode["decode_attention"]["time_ms"] / decode["decode_rat_triton"]["time_ms"]
    speedups["decode_fast_over_triton"] = decode["decode_rat_fast"]["time_ms"] / decode["decode_rat_triton"]["time_ms"]
    speedups["decode_core_attention_over_triton"] = (
        decode["decode_core_attention"]["time_ms"] / decode["decode_core_rat_triton"]["time_ms"]
    )
    results["speedups"] = speedups
    for key, value in speedups.items():
        print(f"  {key}: {value:.2f}x")
    if peaks[0]:
        for entry in results["training"]:
            train = entry["train_rat_triton"]
            print(f"  T={entry['seq_len']}: RAT Triton fwd+bwd at {train['tflops']:.1f} TFLOP/s "
                  f"({100 * train['fraction_of_peak_flops']:.1f}% of peak), {train['times_roofline_floor']:.2f}x the roofline floor")
        core = decode["decode_core_rat_triton"]
        print(f"  decode core: {core['gbytes_per_s']:.0f} GB/s ({100 * core['fraction_of_peak_bandwidth']:.1f}% of bandwidth)")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / "bench_triton.json"
    json_path.write_text(json.dumps(results, indent=2))
    print(f"wrote {json_path}")
    plot(results, args.output_dir / "bench_triton.png")
    return results


if __name__ == "__main__":
    main()
