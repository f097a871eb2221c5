"""Clear errors for inputs a RAT model cannot run correctly: ids, embeddings, labels, `logits_to_keep`.

The attention mask and the position ids are checked where they are read (`rat_layout.py`). Checks of tensor values read
the device once per forward at most and are skipped while compiling; the rest reads only shapes and types.
"""

import torch
from transformers.cache_utils import Cache
from transformers.utils import logging


logger = logging.get_logger(__name__)


def require_integer_tensor(name: str, value, meaning: str):
    """Raise a TypeError unless `value` is a tensor of integers (booleans are not): ids, positions, indices."""
    if torch.is_tensor(value) and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        return
    kind = value.dtype if torch.is_tensor(value) else type(value).__name__
    raise TypeError(f"`{name}` must be an integer tensor ({meaning}), got {kind}.")


def validate_model_inputs(config, embed_tokens, input_ids, inputs_embeds, cache, output_attentions):
    """
    Refuse what `RatModel` cannot run correctly, with a message that says what to change. The attention mask and the
    position ids are checked where they are read (`RatSequenceLayout.build`), the labels by `validate_loss_inputs`.

    * exactly one of `input_ids`, integer ids of shape (batch, tokens) in [0, vocab_size), and `inputs_embeds`, a
      floating (batch, tokens, hidden_size) tensor in the embedding's dtype (any floating dtype under autocast);
    * at least one row and one new token; `cache` a transformers `Cache`; no `output_attentions`.

    The id range costs one comparison over the ids and one read from the device per forward, skipped while compiling;
    the rest reads only shapes and types.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
    if output_attentions:
        raise ValueError("RAT models do not return attention weights (RAT layers attend to chunk summaries).")
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError(f"`cache` must be a transformers `Cache` (e.g. DynamicCache), got {type(cache).__name__}.")
    if input_ids is not None:
        require_integer_tensor("input_ids", input_ids, "token ids")
        if input_ids.dim() != 2:
            raise ValueError(
                f"`input_ids` must have shape (batch, tokens), got {tuple(input_ids.shape)}"
                + (": add the batch dimension with `input_ids[None]`." if input_ids.dim() == 1 else ".")
            )
        shape = tuple(input_ids.shape)
    else:
        if not torch.is_tensor(inputs_embeds) or not inputs_embeds.is_floating_point():
            kind = inputs_embeds.dtype if torch.is_tensor(inputs_embeds) else type(inputs_embeds).__name__
            raise TypeError(f"`inputs_embeds` must be a floating-point tensor, got {kind}.")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"`inputs_embeds` must have shape (batch, tokens, {config.hidden_size}) (the model's hidden size), got "
                f"{tuple(inputs_embeds.shape)}."
            )
        model_dtype = embed_tokens.weight.dtype
        if inputs_embeds.dtype != model_dtype and not torch.is_autocast_enabled(inputs_embeds.device.type):
            raise TypeError(
                f"`inputs_embeds` are {inputs_embeds.dtype} but the model computes in {model_dtype}: pass "
                "`inputs_embeds.to(model.dtype)` (or run under torch.autocast)."
            )
        shape = tuple(inputs_embeds.shape[:2])
    if shape[0] == 0:
        raise ValueError("The input has no rows (batch size 0): pass at least one sequence.")
    if shape[1] == 0:
        cached = int(cache.get_seq_length()) if cache is not None else 0
        raise ValueError(
            "The input has no new token" + (f" (the cache already holds {cached} tokens)" if cached else "") + ": "
            "with a cache, pass the whole sequence to generate() (the cached tokens followed by the new ones), or "
            "at least one new token to forward()."
        )
    if input_ids is not None and not torch.compiler.is_compiling():
        smallest, largest = torch.stack(torch.aminmax(input_ids)).tolist()
        if smallest < 0 or largest >= config.vocab_size:
            raise ValueError(
                f"`input_ids` holds the id {smallest if smallest < 0 else largest}, outside the vocabulary [0, "
                f"{config.vocab_size}): ids must come from this model's tokenizer (is `vocab_size` right?)."
            )


def validate_loss_inputs(labels, logits_to_keep, input_shape, vocab_size, loss_kwargs):
    """
    Refuse labels and `logits_to_keep` that cannot give the loss or the logits asked for (`RatForCausalLM.forward`).

    * `labels`: integer (batch, tokens), the input's shape (the model shifts them: logits at t are scored against
      labels[t + 1]), each an id in [0, vocab_size) or `ignore_index` (-100); the same for `shift_labels` (already
      shifted). When every target is ignored (and `num_items_in_batch` counts no supervised token elsewhere), the
      loss is NaN, a mean over no token, as in transformers' loss: a warning says so. A warning, not an error: the
      gradients of that loss are exactly zero, so a training step on such a batch (a completion truncated away) does
      not spoil the weights, and an error would stop a long run for it.
    * `logits_to_keep`: an int >= 0 (0 keeps all; more than the input has keeps all) or a 1-D tensor of indices of
      tokens; 0 when labels are given (the loss needs every token's logits).

    Costs one read from the device per forward with labels (skipped while compiling).
    """
    if torch.is_tensor(logits_to_keep):
        require_integer_tensor("logits_to_keep", logits_to_keep, "indices of tokens")
        seq_len = input_shape[1]
        if logits_to_keep.dim() != 1:
            raise ValueError(f"A tensor `logits_to_keep` must be 1-D (indices of tokens), got shape {tuple(logits_to_keep.shape)}.")
        if not torch.compiler.is_compiling() and bool(((logits_to_keep < -seq_len) | (logits_to_keep >= seq_len)).any()):
            raise ValueError(f"`logits_to_keep` holds indices outside the {seq_len} tokens of the input: {logits_to_keep.tolist()}.")
    elif isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int):
        raise TypeError(f"`logits_to_keep` must be an int or a tensor of indices of tokens, got {logits_to_keep!r}.")
    elif logits_to_keep < 0:
        raise ValueError(f"`logits_to_keep` must be >= 0 (the number of last tokens to keep, 0 for all), got {logits_to_keep}.")
    if labels is None:
        return
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError("`logits_to_keep` must be 0 when `labels` are given: the loss needs the logits of every token.")
    ignore_index = loss_kwargs.get("ignore_index", -100)
    targets = {"labels": labels}
    if loss_kwargs.get("shift_labels") is not None:
        targets["shift_labels"] = loss_kwargs["shift_labels"]
    for name, tensor in targets.items():
        require_integer_tensor(name, tensor, f"token ids, {ignore_index} for ignored tokens")
        if tuple(tensor.shape) != tuple(input_shape):
            raise ValueError(
                f"`{name}` has shape {tuple(tensor.shape)} but the input has shape {tuple(input_shape)}: give one label per "
                f"input token ({ignore_index} where no loss is wanted); the model shifts them itself."
            )
    if torch.compiler.is_compiling():
        return
    supervised = (labels[:, 1:] if "shift_labels" not in targets else targets["shift_labels"]) != ignore_index
    out_of_range = [((tensor < 0) | (tensor >= vocab_size)) & (tensor != ignore_index) for tensor in targets.values()]
    num_items = loss_kwargs.get("num_items_in_batch")
    others_supervised = torch.as_tensor(num_items if num_items is not None else 0, device=labels.device) > 0
    flags = torch.stack([*(bad.any() for bad in out_of_range), supervised.any() | others_supervised]).tolist()
    for (name, tensor), bad, failed in zip(targets.items(), out_of_range, flags):
        if failed:
            raise ValueError(
                f"`{name}` holds {int(tensor[bad][0])}, which is neither a token id in [0, {vocab_size}) nor the ignored "
                f"label {ignore_index}."
            )
    if not flags[-1]:
        logger.warning_once(
            f"Every target of a batch is ignored ({ignore_index}; the targets are labels[:, 1:], as token t predicts token "
            "t + 1): its loss is NaN, a mean over no token. Its gradients are zero (weights move only by the "
            "optimiser's momentum); drop such batches, or pass `num_items_in_batch` (the supervised tokens of all "
            "micro-batches) to get a loss of 0. Shown once."
        )
