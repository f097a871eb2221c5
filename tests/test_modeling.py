"""RatForCausalLM: the properties of SPEC section 6 and the conventions of transformers models."""

import math

import pytest
import torch

from conftest import LAYER_PATTERNS, random_ids, tiny_config, tiny_model
from modeling_rat import RatForCausalLM, RatModel
from oracles import token_by_token_mixers


PATTERNS = ["rat", "rnn", "rat+sliding", "rat+full", "attention+sliding"]


def logits_of(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


# ----------------------------------------------------------------------------------------- fast == reference


@pytest.mark.parametrize("pattern", ["rat", "rnn", "rat+sliding", "rat+full"])
@pytest.mark.parametrize("length", [1, 3, 4, 13])
def test_fast_path_equals_reference_forward_and_gradients(pattern, length):
    model = tiny_model(LAYER_PATTERNS[pattern]).train()
    ids = random_ids(2, length)

    def run(implementation):
        model.set_rat_implementation(implementation)
        model.zero_grad()
        loss = model(ids, labels=ids, use_cache=False).loss
        logits = model(ids, use_cache=False).logits
        (loss + logits.square().mean()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast_logits, fast_grads = run("fast")
    reference_logits, reference_grads = run("reference")
    torch.testing.assert_close(fast_logits, reference_logits, rtol=1e-4, atol=1e-5)
    assert fast_grads.keys() == reference_grads.keys()
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 16])
@pytest.mark.parametrize("num_qk_groups", [1, 2, 4])
def test_fast_path_equals_reference_across_chunk_sizes_and_groups(chunk_size, num_qk_groups):
    model = tiny_model(["rat", "rat"], chunk_size=chunk_size, num_qk_groups=num_qk_groups).train()
    ids = random_ids(2, 11, seed=chunk_size)
    results = {}
    for implementation in ("fast", "reference"):
        model.set_rat_implementation(implementation)
        model.zero_grad()
        logits = model(ids, use_cache=False).logits
        logits.pow(2).mean().backward()
        results[implementation] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["fast"][0], results["reference"][0], rtol=1e-4, atol=1e-5)
    for fast_grad, reference_grad in zip(results["fast"][1], results["reference"][1]):
        torch.testing.assert_close(fast_grad, reference_grad, rtol=1e-4, atol=1e-6)


def test_fast_path_equals_reference_with_padding_and_packing():
    model = tiny_model(["rat", "rnn"])
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    for kwargs in (dict(attention_mask=mask), dict(position_ids=positions)):
        model.set_rat_implementation("fast")
        fast = logits_of(model, ids, **kwargs)
        model.set_rat_implementation("reference")
        reference = logits_of(model, ids, **kwargs)
        valid = mask.bool() if "attention_mask" in kwargs else torch.ones_like(mask, dtype=torch.bool)
        torch.testing.assert_close(fast[valid], reference[valid], rtol=1e-4, atol=1e-5)


def _layouts(batch_size, length):
    """Inputs that exercise every arrangement of the chunk grid: plain, left- and right-padded, packed."""
    left = torch.ones(batch_size, length, dtype=torch.long)
    left[0, : length // 2] = 0
    right = torch.ones(batch_size, length, dtype=torch.long)
    right[-1, length - 3 :] = 0
    cut = length // 3
    packed = torch.arange(length).repeat(batch_size, 1)
    packed[0, cut:] -= cut  # row 0 holds two sequences, the second starting at position 0
    return {
        "plain": {},
        "left padding": dict(attention_mask=left),
        "right padding": dict(attention_mask=right),
        "packed": dict(position_ids=packed),
    }


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("pattern, chunk_size", [("rat", 4), ("rat", 1), ("rat", 5), ("rnn", 4), ("rat+sliding", 3)])
def test_every_backend_equals_the_token_by_token_equations(backend, pattern, chunk_size):
    """SPEC 6.6 and 6.4-5: logits and every gradient against the equations written token by token (tests/oracles.py),
    which share no code with the model's chunk grid, cache or attention kernels."""
    model = tiny_model(LAYER_PATTERNS[pattern], chunk_size=chunk_size).train()
    model.set_rat_implementation(backend)
    ids = random_ids(2, 14)
    for name, kwargs in _layouts(*ids.shape).items():
        valid = kwargs.get("attention_mask", torch.ones_like(ids)).bool()

        def run():
            model.zero_grad()
            logits = model(ids, use_cache=False, **kwargs).logits
            logits[valid].square().mean().backward()
            return logits.detach()[valid], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        logits, grads = run()
        with token_by_token_mixers(model):
            expected_logits, expected_grads = run()
        torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5, msg=name)
        assert grads.keys() == expected_grads.keys()
        for parameter in grads:
            torch.testing.assert_close(grads[parameter], expected_grads[parameter], rtol=1e-4, atol=1e-6, msg=f"{name} {parameter}")


# ------------------------------------------------------------------------------------------- SPEC section 6


@pytest.mark.parametrize("pattern", PATTERNS)
def test_causality(pattern):
    model = tiny_model(LAYER_PATTERNS[pattern])
    ids = random_ids(1, 14)
    changed = ids.clone()
    changed[0, 9:] = (changed[0, 9:] % 60) + 1
    before, after = logits_of(model, ids), logits_of(model, changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=0)
    assert not torch.allclose(before[:, 9:], after[:, 9:])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_left_padding_equals_each_row_alone(pattern, batch_size):
    model = tiny_model(LAYER_PATTERNS[pattern])
    lengths = [13, 6, 9][:batch_size]
    rows = [random_ids(1, n, seed=n)[0] for n in lengths]
    longest = max(lengths) + (2 if batch_size == 1 else 0)  # batch size 1 gets padding too
    ids = torch.zeros(batch_size, longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):] = row
        mask[i, longest - len(row):] = 1
    batched = logits_of(model, ids, attention_mask=mask)
    assert torch.isfinite(batched).all()
    for i, row in enumerate(rows):
        alone = logits_of(model, row[None])
        torch.testing.assert_close(batched[i, longest - len(row):], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_right_padding_keeps_real_tokens(pattern):
    model = tiny_model(LAYER_PATTERNS[pattern])
    ids = random_ids(2, 11)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batched = logits_of(model, ids, attention_mask=mask)
    torch.testing.assert_close(batched[1, :7], logits_of(model, ids[1:, :7])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[0], logits_of(model, ids[:1])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_packed_sequences_are_independent(pattern):
    model = tiny_model(LAYER_PATTERNS[pattern])
    lengths = [5, 9, 1, 6]
    sequences = [random_ids(1, n, seed=10 + n)[0] for n in lengths]
    packed = torch.cat(sequences)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    out = logits_of(model, packed, position_ids=positions)
    start = 0
    for sequence in sequences:
        alone = logits_of(model, sequence[None])[0]
        torch.testing.assert_close(out[0, start:start + len(sequence)], alone, rtol=1e-5, atol=1e-5)
        start += len(sequence)


def test_position_ids_equal_to_arange_change_nothing():
    model = tiny_model(["rat", "sliding_attention"])
    ids = random_ids(2, 9)
    torch.testing.assert_close(logits_of(model, ids), logits_of(model, ids, position_ids=torch.arange(9)[None].expand(2, -1)))


# ------------------------------------------------------------------------------------ transformers conventions


def test_inputs_embeds_equal_input_ids():
    model = tiny_model()
    ids = random_ids(2, 7)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        torch.testing.assert_close(model(inputs_embeds=embeds, use_cache=False).logits, logits_of(model, ids))
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=ids, inputs_embeds=embeds)


def test_logits_to_keep_and_hidden_states():
    model = tiny_model(["rat", "full_attention"])
    ids = random_ids(2, 9)
    full = logits_of(model, ids)
    torch.testing.assert_close(logits_of(model, ids, logits_to_keep=1), full[:, -1:])
    torch.testing.assert_close(logits_of(model, ids, logits_to_keep=torch.tensor([0, 4])), full[:, [0, 4]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(out.hidden_states[0], model.get_input_embeddings()(ids))


def test_loss_uses_transformers_loss_with_ignore_index_and_num_items():
    model = tiny_model()
    ids = random_ids(2, 8)
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels, use_cache=False)
    shifted_logits, shifted_labels = out.logits[:, :-1].reshape(-1, 61), labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    summed = torch.nn.functional.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100, reduction="sum")
    with_count = model(ids, labels=labels, use_cache=False, num_items_in_batch=torch.tensor(20)).loss
    torch.testing.assert_close(with_count, summed / 20)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(["rat", "sliding_attention"]).train()
    ids = random_ids(2, 10)

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = gradients()
    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing and model.is_gradient_checkpointing
    checkpointed = gradients()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


def test_tied_and_untied_embeddings(tmp_path):
    tied = tiny_model()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = tiny_model(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    untied.save_pretrained(tmp_path)
    reloaded = RatForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.lm_head.weight, untied.lm_head.weight, rtol=0, atol=0)


def test_projection_names_for_lora_and_class_attributes():
    model = tiny_model(["rat", "rnn", "full_attention", "sliding_attention"])
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "output_gate_proj", "forget_gate_proj", "up_proj", "down_proj"} <= names
    rat, rnn, attention = (model.model.layers[i].mixer for i in range(3))
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= {n for n, _ in rat.named_children()}
    assert {"v_proj", "o_proj", "output_gate_proj", "forget_gate_proj"} <= {n for n, _ in rnn.named_children()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} == {n for n, _ in attention.named_children()}
    assert RatForCausalLM.base_model_prefix == "model" and RatForCausalLM._no_split_modules == ["RatDecoderLayer"]
    assert isinstance(model.model, RatModel)


def test_initialisation_follows_the_official_recipe():
    config = tiny_config(["rat", "rnn"], hidden_size=256, num_attention_heads=4, chunk_size=16, initializer_range=0.02, rnn_forget_gate_init_length=512)
    torch.manual_seed(0)
    model = RatForCausalLM(config)
    rat_bias = model.model.layers[0].mixer.forget_gate_bias
    rnn_bias = model.model.layers[1].mixer.forget_gate_bias
    assert rat_bias.min() >= 0 and rat_bias.max() <= math.log(15) + 1e-6 and rat_bias.max() > math.log(10)
    assert rnn_bias.min() >= 0 and rnn_bias.max() <= math.log(511) + 1e-6 and rnn_bias.max() > math.log(400)
    weight = model.model.layers[0].mixer.q_proj.weight
    assert abs(weight.std().item() - 0.02) < 0.002 and abs(weight.mean().item()) < 0.002
    assert torch.equal(model.model.layers[0].mixer_norm.weight, torch.ones(256))
    for chunk_size in (1, 2):  # U(1, L - 1) is empty: the documented fallback is U(1, 2)
        bias = RatForCausalLM(tiny_config(chunk_size=chunk_size)).model.layers[0].mixer.forget_gate_bias
        assert bias.min() >= 0 and bias.max() <= math.log(2) + 1e-6


def test_from_pretrained_keeps_loaded_weights_including_the_forget_gate_bias(tmp_path):
    model = tiny_model(["rat", "rnn", "sliding_attention"])
    with torch.no_grad():
        for layer in model.model.layers[:2]:
            layer.mixer.forget_gate_bias.copy_(torch.linspace(-3, 7, layer.mixer.forget_gate_bias.numel()))
    model.save_pretrained(tmp_path)
    reloaded = RatForCausalLM.from_pretrained(tmp_path)
    original = dict(model.named_parameters())
    for name, parameter in reloaded.named_parameters():
        torch.testing.assert_close(parameter, original[name], rtol=0, atol=0, msg=name)
    ids = random_ids(2, 9)
    torch.testing.assert_close(logits_of(reloaded, ids), logits_of(model, ids), rtol=0, atol=0)


def test_auto_classes_without_trust_remote_code(tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is RatForCausalLM
    assert type(AutoModel.from_pretrained(tmp_path)) is RatModel
    assert type(AutoModelForCausalLM.from_config(model.config)) is RatForCausalLM


def test_bfloat16_forward_is_close_to_float32():
    model = tiny_model(["rat", "sliding_attention"], initializer_range=0.05)
    ids = random_ids(2, 21)
    fp32 = logits_of(model, ids)
    bf16 = logits_of(model.to(torch.bfloat16), ids)
    assert bf16.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: logits of magnitude ~1 agree to a few 1e-2
    torch.testing.assert_close(bf16.float(), fp32, rtol=0.05, atol=0.05)


def test_bad_masks_get_clear_errors():
    model = tiny_model()
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match="expected \\(2, 6\\)"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="2-D padding mask"):
        model(ids, attention_mask=torch.ones(2, 1, 6, 6))
    with pytest.raises(ValueError, match="attention weights"):
        model(ids, output_attentions=True)


def test_long_sequence_not_a_multiple_of_the_chunk_size_runs_in_bfloat16_and_float32():
    model = tiny_model(["rat"], chunk_size=16, initializer_range=0.02)
    ids = random_ids(1, 16 * 7 + 5)
    out = logits_of(model, ids)
    assert out.shape == (1, 117, 61) and torch.isfinite(out).all()


def test_long_prefill_of_sliding_layers_runs_in_blocks_and_matches_the_masked_path():
    """Beyond 2 windows the sliding layers attend block by block (O(T * window)); same logits as with the mask."""
    model = tiny_model(["sliding_attention", "rat"], sliding_window=5)
    ids = random_ids(2, 23)
    blocked = logits_of(model, ids)
    # a left-padded batch takes the masked path (the general layout)
    padded = logits_of(model, torch.cat([torch.zeros(2, 1, dtype=torch.long), ids], 1),
                       attention_mask=torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.ones_like(ids)], 1))
    torch.testing.assert_close(blocked, padded[:, 1:], rtol=1e-5, atol=1e-5)
