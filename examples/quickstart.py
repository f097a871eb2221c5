"""Build a small RAT language model, run a forward pass and generate a few tokens.

    python examples/quickstart.py [--model rat|rat-swa|attention|attention-swa|rnn] [--size tiny|mini|small|...]

Runs offline in seconds on a CPU; it uses random weights, so the generated tokens are arbitrary.
"""

import argparse
import logging
import time

import torch

from configuration_rat import PAPER_LAYER_PATTERNS, PRESET_SIZES
from modeling_rat import RatConfig, RatForCausalLM, cache_nbytes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="rat", choices=list(PAPER_LAYER_PATTERNS), help="one of the paper's models")
    parser.add_argument("--size", default="mini", choices=list(PRESET_SIZES), help="preset size")
    parser.add_argument("--prompt-length", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=20)
    args = parser.parse_args(argv)
    if args.prompt_length < 1 or args.new_tokens < 1:
        parser.error("--prompt-length and --new-tokens must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("quickstart")

    torch.manual_seed(0)
    config = RatConfig.from_preset(args.model, args.size, sliding_window=64 if args.model.endswith("swa") else None)
    model = RatForCausalLM(config).eval()
    log.info(
        "Built %s (%s): %s parameters, layers %s, chunk size %d",
        args.model, args.size, f"{model.num_parameters():,}", config.layer_types, config.chunk_size,
    )
    prompt = torch.randint(0, config.vocab_size, (2, args.prompt_length))
    with torch.no_grad():
        start = time.perf_counter()
        out = model(prompt, labels=prompt)
        log.info("Forward pass on %s tokens: loss %.3f (random weights: about ln(vocab) = %.3f), %.2fs",
                 tuple(prompt.shape), out.loss.item(), torch.log(torch.tensor(float(config.vocab_size))).item(),
                 time.perf_counter() - start)
        start = time.perf_counter()
        generated = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False,
                                   return_dict_in_generate=True, pad_token_id=0)
        log.info("Generated %d tokens per row in %.2fs: %s", args.new_tokens, time.perf_counter() - start,
                 generated.sequences[0, args.prompt_length:].tolist())
    cache = getattr(generated, "cache", None) or getattr(generated, "past_key_values", None)
    if cache is not None:
        log.info("Cache: %s bytes for %d sequences of %d tokens", f"{cache_nbytes(cache):,}", prompt.shape[0],
                 generated.sequences.shape[1])


if __name__ == "__main__":
    main()
