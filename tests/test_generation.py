"""generate() in every decoding mode, each against a cache-free or per-row reference."""

import threading

import pytest
import torch
from transformers import (
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)

from conftest import LAYER_PATTERNS, random_ids, tiny_model


PATTERNS = ["rat", "rnn", "rat+sliding", "rat+full"]
_MODELS = {}


def model_for(pattern, **overrides):
    key = (pattern, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        _MODELS[key] = tiny_model(LAYER_PATTERNS[pattern], **overrides)
    return _MODELS[key]


def generate(model, ids, **kwargs):
    kwargs.setdefault("max_new_tokens", 10)
    kwargs.setdefault("pad_token_id", 0)
    with torch.no_grad():
        return model.generate(ids, **kwargs)


def left_padded(rows):
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):] = row
        mask[i, longest - len(row):] = 1
    return ids, mask


@pytest.mark.parametrize("pattern", PATTERNS)
def test_greedy_with_cache_equals_without(pattern):
    model = model_for(pattern)
    ids = random_ids(2, 9)
    cached = generate(model, ids, do_sample=False, max_new_tokens=14)
    uncached = generate(model, ids, do_sample=False, max_new_tokens=14, use_cache=False)
    assert torch.equal(cached, uncached)
    # and greedy really follows the forward's argmax
    with torch.no_grad():
        logits = model(cached[:, :-1], use_cache=False).logits
    assert torch.equal(logits[:, 8:].argmax(-1), cached[:, 9:])


@pytest.mark.parametrize("pattern", ["rat", "rat+sliding"])
def test_sampling_with_the_same_seed_gives_the_same_tokens(pattern):
    model = model_for(pattern)
    ids = random_ids(2, 7)
    torch.manual_seed(123)
    cached = generate(model, ids, do_sample=True, top_k=20, temperature=0.9, max_new_tokens=12)
    torch.manual_seed(123)
    uncached = generate(model, ids, do_sample=True, top_k=20, temperature=0.9, max_new_tokens=12, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_beam_search_and_num_return_sequences(pattern):
    model = model_for(pattern)
    ids = random_ids(2, 6)
    kwargs = dict(num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=9, early_stopping=True)
    cached = generate(model, ids, **kwargs)
    uncached = generate(model, ids, use_cache=False, **kwargs)
    assert cached.shape == (4, 15)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_left_padded_batch_rows_equal_rows_alone(pattern):
    model = model_for(pattern)
    rows = [random_ids(1, n, seed=n)[0] for n in (11, 4, 7)]
    ids, mask = left_padded(rows)
    batched = generate(model, ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    for i, row in enumerate(rows):
        alone = generate(model, row[None], do_sample=False, max_new_tokens=12)
        assert torch.equal(batched[i, ids.shape[1] - len(row):], alone[0]), f"row {i}"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_batch_of_one_with_padding(pattern):
    model = model_for(pattern)
    row = random_ids(1, 6)[0]
    ids, mask = left_padded([row])
    ids = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), mask], dim=1)
    padded = generate(model, ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    alone = generate(model, row[None], do_sample=False, max_new_tokens=10)
    assert torch.equal(padded[0, 5:], alone[0])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_continuing_from_a_returned_cache_equals_one_shot(pattern):
    model = model_for(pattern)
    ids = random_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    one_shot = generate(model, ids, attention_mask=mask, do_sample=False, max_new_tokens=16)
    with torch.no_grad():
        first = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6, pad_token_id=0,
                               return_dict_in_generate=True)
    cache = getattr(first, "cache", None) if "cache" in first else first.past_key_values
    continued_mask = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], dim=1)
    cache_kwarg = "cache" if "cache" in first else "past_key_values"
    continued = generate(model, first.sequences, attention_mask=continued_mask, do_sample=False, max_new_tokens=10,
                         **{cache_kwarg: cache})
    assert torch.equal(continued, one_shot)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_prefill_chunk_size(pattern):
    model = model_for(pattern)
    ids = random_ids(2, 17)
    chunked = generate(model, ids, do_sample=False, max_new_tokens=8, prefill_chunk_size=5)
    assert torch.equal(chunked, generate(model, ids, do_sample=False, max_new_tokens=8))


@pytest.mark.parametrize("pattern", ["rat", "rat+full"])
def test_inputs_embeds(pattern):
    model = model_for(pattern)
    ids = random_ids(2, 7)
    embeds = model.get_input_embeddings()(ids).detach()
    from_embeds = generate(model, None, inputs_embeds=embeds, do_sample=False, max_new_tokens=8)
    from_ids = generate(model, ids, do_sample=False, max_new_tokens=8)
    assert torch.equal(from_embeds, from_ids[:, 7:])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_assisted_decoding_with_a_smaller_rat_assistant(pattern):
    model = model_for(pattern)
    assistant = tiny_model(["rat"], seed=5)  # different weights: many candidates get rejected and rolled back
    ids = random_ids(1, 9)
    plain = generate(model, ids, do_sample=False, max_new_tokens=30)
    assisted = generate(model, ids, do_sample=False, max_new_tokens=30, assistant_model=assistant)
    assert torch.equal(assisted, plain)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_prompt_lookup_decoding(pattern):
    model = model_for(pattern)
    ids = torch.cat([random_ids(1, 6, seed=3)] * 4, dim=1)  # repetitive prompt: lookups find candidates
    plain = generate(model, ids, do_sample=False, max_new_tokens=30)
    lookup = generate(model, ids, do_sample=False, max_new_tokens=30, prompt_lookup_num_tokens=22)
    assert torch.equal(lookup, plain)


class _ToyTokenizer:
    """Enough of a tokenizer for the streamers: decodes ids as space-separated numbers."""

    def decode(self, ids, skip_special_tokens=False, **kwargs):
        return "".join(f" {int(i)}" for i in ids)


def test_streamers_receive_the_generated_tokens(capsys):
    model = model_for("rat+sliding")
    ids = random_ids(1, 5)
    tokens = generate(model, ids, do_sample=False, max_new_tokens=7, streamer=TextStreamer(_ToyTokenizer(), skip_prompt=True))
    printed = capsys.readouterr().out.split()
    assert [int(t) for t in printed] == tokens[0, 5:].tolist()

    streamer = TextIteratorStreamer(_ToyTokenizer(), skip_prompt=True)
    thread = threading.Thread(target=generate, args=(model, ids), kwargs=dict(do_sample=False, max_new_tokens=7, streamer=streamer))
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert [int(t) for t in text.split()] == tokens[0, 5:].tolist()


def test_stopping_criteria_and_eos():
    model = model_for("rat")
    ids = random_ids(2, 5)

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 9, dtype=torch.bool)

    stopped = generate(model, ids, do_sample=False, max_new_tokens=20, stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert stopped.shape[1] == 9
    full = generate(model, ids, do_sample=False, max_new_tokens=12)
    eos = int(full[0, 8])
    with_eos = generate(model, ids, do_sample=False, max_new_tokens=12, eos_token_id=eos)
    assert with_eos[0, 8] == eos and (with_eos[0, 9:] == 0).all()  # row 0 stops and is padded after its eos


def test_text_generation_pipeline(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    vocab = {"[PAD]": 0, "[UNK]": 1} | {f"w{i}": i for i in range(2, 61)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    model = model_for("rat+sliding")
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator("w5 w9 w12 w40", max_new_tokens=6, do_sample=False, return_tensors=True)
    ids = torch.tensor([tokenizer("w5 w9 w12 w40")["input_ids"]])
    assert list(out[0]["generated_token_ids"]) == generate(model, ids, do_sample=False, max_new_tokens=6)[0].tolist()
    text = generator("w5 w9 w12 w40", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text.startswith("w5 w9 w12 w40") and len(text) > len("w5 w9 w12 w40")


def test_generation_config_round_trip_and_unsupported_options(tmp_path):
    model = model_for("rat")
    ids = random_ids(1, 5)
    with pytest.raises(ValueError, match="attention weights"):
        generate(model, ids, output_attentions=True, return_dict_in_generate=True)
    model.generation_config = GenerationConfig(max_new_tokens=3, pad_token_id=0)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "generation_config.json").is_file()
