"""
What the static cache gains: milliseconds per decode step of RatForCausalLM with the dynamic cache (eager), the
static cache (eager) and the static cache with the step compiled by `torch.compile`, side by side in one run.

The decode loop is written out (one `forward` per token) so that the same loop runs in all three modes; the
compiled step is first run until it stops compiling (Dynamo traces it once for a fixed mask length and once more
when the length becomes dynamic), and the compilation time is reported apart. The tokens of the three modes are
checked to be identical before anything is timed.

    python -m benchmarks.compiled_decode [--context 1024] [--batch 1,16] [--steps 32] [--output DIR]
"""

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import StaticCache

from modeling_rat import RatConfig, RatForCausalLM


if not __package__:  # run as a file, where the sibling modules cannot be imported
    sys.exit("error: run it as a module from the repository root: python -m benchmarks.compiled_decode [options]")

from .common import RunOptions, machine_info, write_json  # noqa: E402
from .decode import returned_cache  # noqa: E402


logger = logging.getLogger("benchmarks")


def build(hidden_size: int, num_layers: int, layer_type: str, context: int, steps: int) -> RatForCausalLM:
    torch.manual_seed(0)
    config = RatConfig(vocab_size=2048, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=8, chunk_size=16,
                       layer_types=[layer_type] * num_layers)
    return RatForCausalLM(config).eval()


def decode(model, forward, prompt, steps: int, cache) -> tuple[torch.Tensor, list[float]]:
    """Prefill with the eager model, then `steps` greedy steps through `forward`; returns tokens and step times."""
    batch_size, context = prompt.shape
    with torch.no_grad():
        out = model(prompt, cache=cache, use_cache=True)
        cache = returned_cache(out)
        token, tokens, times = out.logits[:, -1:].argmax(-1), [], []
        for step in range(steps):
            mask = torch.ones(batch_size, context + step + 1, dtype=torch.long)
            start = time.perf_counter()
            out = forward(token, attention_mask=mask, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
            tokens.append(token)
    return torch.cat(tokens, dim=1), times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compiled_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--layer-type", default="rat", choices=["rat", "rnn"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None, help="folder for compiled_decode.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    options = RunOptions.resolve(device="cpu", dtype="float32", threads=args.threads)
    torch.set_num_threads(options.threads)
    model = build(args.hidden_size, args.num_layers, args.layer_type, args.context, args.steps)
    result = {"machine": machine_info(options), "settings": vars(args), "cases": []}
    print(f"\nms per decode step, context {args.context}, D {args.hidden_size}, {args.num_layers} {args.layer_type} "
          f"layers, median of {args.steps} steps")
    print(f"{'batch':>6}{'dynamic':>10}{'static':>10}{'static+compile':>16}{'compile time':>14}")
    for batch_size in [int(b) for b in args.batch.split(",")]:
        prompt = torch.randint(1, 2048, (batch_size, args.context))

        def static_cache():
            return StaticCache(config=model.config, max_cache_len=args.context + args.steps + 1)

        torch._dynamo.reset()  # compiled afresh for each batch size (reusing it would make the batch size dynamic)
        compiled_forward = torch.compile(model.forward)
        dynamic_tokens, dynamic_times = decode(model, model.forward, prompt, args.steps, None)
        static_tokens, static_times = decode(model, model.forward, prompt, args.steps, static_cache())
        start = time.perf_counter()
        compiled_tokens, _ = decode(model, compiled_forward, prompt, args.steps, static_cache())  # compiles
        compile_s = time.perf_counter() - start
        compiled_tokens_again, compiled_times = decode(model, compiled_forward, prompt, args.steps, static_cache())
        for name, tokens in [("static", static_tokens), ("compiled", compiled_tokens),
                             ("compiled", compiled_tokens_again)]:
            if not torch.equal(tokens, dynamic_tokens):
                raise RuntimeError(f"The {name} decode gave other tokens than the dynamic cache: nothing is timed.")
        case = {
            "batch": batch_size,
            "dynamic_ms": 1e3 * statistics.median(dynamic_times),
            "static_ms": 1e3 * statistics.median(static_times),
            "static_compiled_ms": 1e3 * statistics.median(compiled_times),
            "first_compiled_run_s": compile_s,
        }
        result["cases"].append(case)
        print(f"{batch_size:>6}{case['dynamic_ms']:10.2f}{case['static_ms']:10.2f}{case['static_compiled_ms']:16.2f}"
              f"{compile_s:13.1f}s")
    if args.output:
        logger.info("wrote %s", write_json(Path(args.output) / "compiled_decode.json", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
