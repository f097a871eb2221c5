"""TRL's SFTTrainer, unmodified, on RAT models: completion-only loss, chat templates, padding-free packing, LoRA,
loading from a path with `trust_remote_code`. Tiny models, tiny offline tokenizers, a few steps."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from conftest import tiny_config
from modeling_rat import RatForCausalLM
from modeling_rat.training import DEFAULT_CHAT_TEMPLATE, LORA_TARGET_MODULES, train_byte_level_bpe
from modeling_rat.training.launch import activation_checkpointing_argument


SENTENCES = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran in the park with a red ball all day",
    "the sun is warm and the sky is blue over the sea",
    "birds sing in the morning when the light comes back",
    "she reads a long book about old ships and the sea",
    "we cook rice and beans for dinner on cold nights",
    "the train leaves the station at nine every morning",
    "he writes short notes to remember what to buy",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} [EOS] {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def word_tokenizer(with_pad=True):
    """A word-level tokenizer trained offline on `SENTENCES` (plus the words of the prompt and chat formats)."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    special = (["[PAD]"] if with_pad else []) + ["[UNK]", "[EOS]"]
    tokenizer.train_from_iterator(
        SENTENCES + ["summary : user assistant system"], trainers.WordLevelTrainer(special_tokens=special)
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]" if with_pad else None
    )
    return wrapped


def model_for(tokenizer, layer_types=("rat", "sliding_attention"), seed=0, **overrides):
    torch.manual_seed(seed)
    arguments = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                     eos_token_id=tokenizer.eos_token_id, initializer_range=0.1)
    arguments.update(overrides)
    config = tiny_config(layer_types, **arguments)
    return RatForCausalLM(config)


def sft_config(tmp_path, checkpointing=False, **overrides):
    arguments = dict(
        **activation_checkpointing_argument(checkpointing),
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        max_length=64,
        dataset_num_proc=None,
        seed=0,
        disable_tqdm=True,
    )
    arguments.update(overrides)
    return SFTConfig(**arguments)


def prompt_completion_dataset():
    rows = [{"prompt": " ".join(s.split()[:6]), "completion": " " + " ".join(s.split()[6:])} for s in SENTENCES]
    return Dataset.from_list(rows)


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def test_prompt_completion_loss_on_completion_only(tmp_path):
    tokenizer = word_tokenizer()
    model = model_for(tokenizer)
    trainer = SFTTrainer(
        model=model, args=sft_config(tmp_path, shuffle_dataset=False), train_dataset=prompt_completion_dataset(),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(SENTENCES))])
    for row, sentence in enumerate(SENTENCES):
        prompt_ids = tokenizer(" ".join(sentence.split()[:6]), add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(" ".join(sentence.split()[6:]), add_special_tokens=False)["input_ids"]
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        length = int(mask.sum())
        assert ids[:length].tolist() == prompt_ids + completion_ids + [tokenizer.eos_token_id]
        expected = [-100] * len(prompt_ids) + completion_ids + [tokenizer.eos_token_id]
        assert labels[:length].tolist() == expected, "loss must cover the completion (and EOS) only"
        assert (labels[length:] == -100).all()
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])]
    assert changed, "training changed no weight"


def test_conversational_dataset_with_chat_template(tmp_path):
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = model_for(tokenizer)
    rows = [
        {
            "prompt": [{"role": "user", "content": " ".join(s.split()[:5])}],
            "completion": [{"role": "assistant", "content": " ".join(s.split()[5:])}],
        }
        for s in SENTENCES
    ]
    trainer = SFTTrainer(
        model=model, args=sft_config(tmp_path, shuffle_dataset=False), train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    text = tokenizer.decode(ids)
    assert text.startswith("user : the cat sat on the [EOS] assistant : mat and")
    supervised = tokenizer.decode(ids[labels != -100])
    assert supervised.startswith("mat and looked at the dog"), supervised
    assert "user" not in supervised
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))

    # Messages-only conversations (the language-modelling form) go through the template too.
    messages = [{"messages": row["prompt"] + row["completion"]} for row in rows]
    trainer = SFTTrainer(
        model=model, args=sft_config(tmp_path, max_steps=2), train_dataset=Dataset.from_list(messages),
        processing_class=tokenizer,
    )
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))


def test_conversational_sft_with_the_default_chat_template(tmp_path, caplog):
    """A tokenizer trained like examples/pretrain.py's ships a ChatML template: TRL's conversational SFT works on it
    as it is, prompt/completion and messages (with assistant-only loss), and the end-of-turn token is supervised."""
    tokenizer = train_byte_level_bpe(SENTENCES * 4, vocab_size=300)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    turn_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = model_for(tokenizer)
    conversations = [
        ([{"role": "user", "content": " ".join(s.split()[:5])}],
         [{"role": "assistant", "content": " ".join(s.split()[5:])}])
        for s in SENTENCES
    ]
    rows = [{"prompt": prompt, "completion": completion} for prompt, completion in conversations]
    trainer = SFTTrainer(model=model, args=sft_config(tmp_path, shuffle_dataset=False),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    example = trainer.train_dataset[0]
    text = tokenizer.decode(example["input_ids"])
    assert text == ("<|im_start|>user\nthe cat sat on the<|im_end|>\n<|im_start|>assistant\n"
                    "mat and looked at the dog<|im_end|>\n")
    labels = trainer.data_collator([example])["labels"][0]
    assert tokenizer.decode(labels[labels != -100]) == "mat and looked at the dog<|im_end|>\n"
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))

    # Messages with assistant-only loss: the template's generation markers select the assistant turn and its end.
    messages = [{"messages": prompt + completion} for prompt, completion in conversations]
    with caplog.at_level("WARNING"):
        trainer = SFTTrainer(model=model, args=sft_config(tmp_path, assistant_only_loss=True, max_steps=2),
                             train_dataset=Dataset.from_list(messages), processing_class=tokenizer)
    assert "end-of-turn token" not in caplog.text
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels = batch["labels"][0]
    supervised = labels[labels != -100].tolist()
    assert tokenizer.decode(supervised) == "mat and looked at the dog<|im_end|>"
    assert supervised[-1] == turn_end
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))


def _separate_logits(model, packed_ids, position_ids):
    """Run each packed sequence alone (split where positions restart) and concatenate the logits."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    pieces = []
    for start, end in zip(starts[:-1], starts[1:]):
        pieces.append(model(input_ids=packed_ids[:, start:end], use_cache=False).logits)
    return torch.cat(pieces, dim=1), len(starts) - 1


def _shifted_loss(logits, labels):
    return torch.nn.functional.cross_entropy(
        logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="mean"
    )


@pytest.mark.parametrize(
    "layer_types",
    [("rat", "rat"), ("rnn", "rnn"), ("sliding_attention", "sliding_attention"), ("full_attention", "full_attention"),
     ("rat", "sliding_attention")],
    ids=["rat", "rnn", "sliding", "full", "rat+sliding"],
)
def test_packing_is_padding_free_and_isolates_sequences(tmp_path, layer_types):
    tokenizer = word_tokenizer()
    model = model_for(tokenizer, layer_types, initializer_range=0.3)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(tmp_path, packing=True, max_length=64, per_device_train_batch_size=8),
        train_dataset=Dataset.from_list([{"text": s} for s in SENTENCES]),
        processing_class=tokenizer,
    )
    batch = first_batch(trainer)
    assert "attention_mask" not in batch
    assert {"position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "seq_idx"} <= set(batch)
    position_ids = batch["position_ids"]
    assert batch["input_ids"].shape[0] == 1 and int((position_ids == 0).sum()) >= 3, "several sequences in one row"

    model.train()  # dropout-free model: train mode only matters for caching, which must stay off
    packed_loss = trainer.compute_loss(model, dict(batch))
    packed_loss.backward()
    packed_gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    separate_logits, count = _separate_logits(model, batch["input_ids"], position_ids)
    assert count >= 3
    torch.testing.assert_close(packed_logits, separate_logits.detach(), rtol=1e-5, atol=1e-5)
    separate_loss = _shifted_loss(separate_logits, batch["labels"])
    torch.testing.assert_close(packed_loss.detach(), separate_loss.detach(), rtol=1e-5, atol=1e-6)
    separate_loss.backward()
    assert packed_gradients.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, gradient in packed_gradients.items():
        torch.testing.assert_close(gradient, model.get_parameter(name).grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packing_trains_with_gradient_checkpointing_and_lora(tmp_path):
    tokenizer = word_tokenizer()
    model = model_for(tokenizer, ("rat", "sliding_attention"))
    trainer = SFTTrainer(
        model=model,
        args=sft_config(tmp_path, checkpointing=True, packing=True, max_steps=4),
        train_dataset=Dataset.from_list([{"text": s} for s in SENTENCES * 2]),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_MODULES, task_type="CAUSAL_LM"),
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    parameters = dict(trainer.model.named_parameters())
    assert any(not torch.equal(parameters[n], p) for n, p in lora_before.items()), "adapters did not train"
    assert all(torch.equal(parameters[n], p) for n, p in base_before.items()), "base weights must stay frozen"


def test_model_given_as_path_with_trust_remote_code(tmp_path):
    tokenizer = word_tokenizer()
    model = model_for(tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rat.RatForCausalLM"
    trainer = SFTTrainer(
        model=str(tmp_path / "model"),
        args=sft_config(tmp_path, model_init_kwargs={"trust_remote_code": True, "dtype": torch.float32}),
        train_dataset=prompt_completion_dataset(),
    )
    assert type(trainer.model).__name__ == "RatForCausalLM"
    for name, parameter in trainer.model.state_dict().items():
        torch.testing.assert_close(parameter, model.state_dict()[name], rtol=0, atol=0)
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))


@pytest.mark.slow
def test_remote_code_model_path_in_fresh_process(tmp_path):
    """Without this package imported, SFTTrainer loads the saved folder's own code (transformers_modules)."""
    tokenizer = word_tokenizer()
    model_for(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from datasets import Dataset
        from transformers import AutoTokenizer
        from trl import SFTConfig, SFTTrainer
        path = {str(tmp_path / 'model')!r}
        rows = [{{"prompt": "the cat sat", "completion": " on the mat"}}] * 8
        common = dict(output_dir={str(tmp_path / 'out')!r}, max_steps=2, per_device_train_batch_size=4,
                      report_to="none", bf16=False, use_cpu=True, save_strategy="no", max_length=32)
        # (a) SFTConfig(trust_remote_code=True): TRL forwards it to the model and to the tokenizer loading.
        # (b) model_init_kwargs for the model, the tokenizer loaded by the caller.
        variants = [
            dict(args=SFTConfig(trust_remote_code=True, **common)),
            dict(args=SFTConfig(model_init_kwargs={{"trust_remote_code": True}}, **common),
                 processing_class=AutoTokenizer.from_pretrained(path, trust_remote_code=True)),
        ]
        for variant in variants:
            trainer = SFTTrainer(model=path, train_dataset=Dataset.from_list(rows), **variant)
            assert "modeling_rat" not in sys.modules, "the installed package must not be imported"
            module = type(trainer.model).__module__
            assert module.startswith("transformers_modules"), module
            loss = trainer.train().training_loss
            assert loss == loss
            print("REMOTE_OK", module)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    env["PYTHONPATH"] = ""  # this repository must not be importable
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("REMOTE_OK transformers_modules") == 2, result.stdout
