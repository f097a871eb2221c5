"""
Benchmark suite of rat-transformers: RAT against softmax attention (transformers' `LlamaForCausalLM` with SDPA, or
the SDPA attention mixer of the same width), side by side in one run. Run it from the repository root:

    python -m benchmarks.run [--quick] [--only mixer,model,decode,cache] [--output results/benchmarks]

Every benchmark first checks that what it compares computes the right thing (fast path against the reference,
decoding against the full forward) and refuses to time it otherwise. Methods and options: docs/benchmarks.md.
"""
