"""
The task heads on `RatModel` (transformers' generic heads): sequence classification, token classification, question
answering. Registered with the Auto classes and saved in every `auto_map`; loadable with `trust_remote_code` where the
package is missing; fine-tuned with LoRA through `Trainer`.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import transformers

from conftest import LAYER_PATTERNS, ROOT, random_ids, tiny_config
from modeling_rat import RatForQuestionAnswering, RatForSequenceClassification, RatForTokenClassification


PATTERNS = ["rat", "rnn", "rat+sliding", "rat+full"]
PAD = 0  # the tiny configs' pad_token_id; random_ids never draws it


def tiny_head(head_class, pattern="rat+sliding", seed=0, **overrides):
    torch.manual_seed(seed)
    return head_class(tiny_config(LAYER_PATTERNS[pattern], num_labels=3, **overrides)).eval()


def padded_batch(rows, side, length=None):
    """Rows of different lengths, padded with PAD on `side` (to `length`, else the longest), and their attention mask."""
    longest = length or max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), PAD)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for index, row in enumerate(rows):
        columns = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
        ids[index, columns] = row
        mask[index, columns] = 1
    return ids, mask


def unequal_rows():
    return [random_ids(1, length, seed=length)[0] for length in (11, 5, 1, 8)]  # 5 and 8 end inside a chunk of 4


# ------------------------------------------------------------------------------------------ sequence classification


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_sequence_classification_of_a_padded_row_equals_the_row_alone(pattern, side):
    model = tiny_head(RatForSequenceClassification, pattern)
    rows = unequal_rows()
    ids, mask = padded_batch(rows, side)
    with torch.no_grad():
        alone = torch.cat([model(row[None]).logits for row in rows])
        with_mask = model(ids, attention_mask=mask).logits
        without_mask = model(ids).logits  # transformers' rule: the last token that is not pad_token_id
    assert with_mask.shape == (len(rows), 3)
    torch.testing.assert_close(with_mask, alone, rtol=1e-5, atol=1e-5)
    if side == "right":  # without a mask, left padding would enter the state: only right padding is pooled alike
        torch.testing.assert_close(without_mask, alone, rtol=1e-5, atol=1e-5)


def test_sequence_classification_pools_the_last_real_token_not_the_last_column():
    model = tiny_head(RatForSequenceClassification, "rat")
    row = random_ids(1, 6)
    ids, mask = padded_batch([row[0], random_ids(1, 9)[0]], "right")
    with torch.no_grad():
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
        logits = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[0], model.score(hidden[0, 5]))
    torch.testing.assert_close(logits[1], model.score(hidden[1, 8]))


def test_sequence_classification_loss_and_tuple_outputs():
    model = tiny_head(RatForSequenceClassification, "rat", return_dict=False)
    ids, mask = padded_batch(unequal_rows(), "left")
    labels = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        loss, logits = model(ids, attention_mask=mask, labels=labels, use_cache=False)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))


# ----------------------------------------------------------------------------- token classification, questions


@pytest.mark.parametrize("head_class", [RatForTokenClassification, RatForQuestionAnswering])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_per_token_heads_give_a_padded_row_what_it_gets_alone(head_class, pattern):
    model = tiny_head(head_class, pattern)
    rows = unequal_rows()
    ids, mask = padded_batch(rows, "left")
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        for index, row in enumerate(rows):
            alone = model(row[None])
            columns = slice(ids.shape[1] - len(row), None)
            if head_class is RatForTokenClassification:
                assert batch.logits.shape == (len(rows), ids.shape[1], 3)
                torch.testing.assert_close(batch.logits[index, columns], alone.logits[0], rtol=1e-5, atol=1e-5)
            else:
                torch.testing.assert_close(batch.start_logits[index, columns], alone.start_logits[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(batch.end_logits[index, columns], alone.end_logits[0], rtol=1e-5, atol=1e-5)


def test_per_token_heads_compute_transformers_losses():
    ids = random_ids(2, 7)
    token_model = tiny_head(RatForTokenClassification, "rat")
    labels = torch.tensor([[0, 1, 2, -100, 1, 1, 0], [2, 2, 1, 0, -100, 0, 1]])
    with torch.no_grad():
        output = token_model(ids, labels=labels)
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits.reshape(-1, 3), labels.reshape(-1)))
    qa_model = tiny_head(RatForQuestionAnswering, "rat")
    starts, ends = torch.tensor([1, 3]), torch.tensor([2, 6])
    with torch.no_grad():
        output = qa_model(ids, start_positions=starts, end_positions=ends)
    expected = (F.cross_entropy(output.start_logits, starts) + F.cross_entropy(output.end_logits, ends)) / 2
    torch.testing.assert_close(output.loss, expected)


# ------------------------------------------------------------------------------------- Auto classes, remote code


HEADS = {
    "AutoModelForSequenceClassification": RatForSequenceClassification,
    "AutoModelForTokenClassification": RatForTokenClassification,
    "AutoModelForQuestionAnswering": RatForQuestionAnswering,
}


def save_tokenizer(folder, vocab_size):
    """A word-level tokenizer over the tiny vocabulary: "[PAD]" is id 0, "w<i>" is id i."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": PAD, **{f"w{index}": index for index in range(1, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="w1")
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.mark.slow
def test_heads_load_with_trust_remote_code_where_the_package_is_missing(tmp_path):
    """Each head saved, then loaded by its Auto class in a process that cannot import this package; the text
    classification pipeline on the sequence classifier, one text at a time and in a padded batch."""
    ids = random_ids(2, 9)
    expected = {}
    for auto_class_name, head_class in HEADS.items():
        model = tiny_head(head_class, "rat+sliding", seed=len(auto_class_name))
        model.save_pretrained(tmp_path / auto_class_name)
        with torch.no_grad():
            output = model(ids)
        expected[auto_class_name] = [getattr(output, name).tolist() for name in ("logits", "start_logits") if name in output]
    classifier_folder = tmp_path / "AutoModelForSequenceClassification"
    tokenizer = save_tokenizer(classifier_folder, tiny_config().vocab_size)
    texts = ["w5 w9 w13 w2 w40 w7", "w3 w11"]
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(classifier_folder).eval()
    with torch.no_grad():
        expected_labels = [
            classifier.config.id2label[int(classifier(**tokenizer(text, return_tensors="pt")).logits.argmax())]
            for text in texts
        ]
    script = textwrap.dedent(
        f"""
        import json, sys, torch

        class BlockPackage:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("modeling_rat", "configuration_rat"):
                    raise ImportError(f"{{name}} is blocked: this process stands for a machine without the package")

        sys.meta_path.insert(0, BlockPackage())
        import transformers

        ids, results = torch.tensor({ids.tolist()}), {{}}
        for auto_class_name in {list(HEADS)!r}:
            model = getattr(transformers, auto_class_name).from_pretrained({str(tmp_path)!r} + "/" + auto_class_name, trust_remote_code=True)
            assert "transformers_modules" in type(model).__module__, type(model).__module__
            with torch.no_grad():
                output = model.eval()(ids)
            results[auto_class_name] = [getattr(output, name).tolist() for name in ("logits", "start_logits") if name in output]
        classify = transformers.pipeline("text-classification", model={str(classifier_folder)!r}, trust_remote_code=True)
        results["one at a time"] = [classify(text)[0]["label"] for text in {texts!r}]
        results["padded batch"] = [result["label"] for result in classify({texts!r}, batch_size=2)]
        print(json.dumps(results))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for auto_class_name in HEADS:
        torch.testing.assert_close(torch.tensor(loaded[auto_class_name]), torch.tensor(expected[auto_class_name]))
    assert loaded["one at a time"] == loaded["padded batch"] == expected_labels


# ------------------------------------------------------------------------------------------- LoRA through Trainer


class LastTokenParity(torch.utils.data.Dataset):
    """
    A tiny task: is the last real token of a (left- or right-padded) row even? Labels 0/1. The last token comes from
    16 ids, so that the 256 training rows show each id's parity about 16 times: with 60 ids (4 rows each) the
    LoRA-adapted model fits the training rows but reaches only 0.75 on held-out rows, a test of memory, not of the
    head's pooling.
    """

    def __init__(self, size, seed):
        generator = torch.Generator().manual_seed(seed)
        self.examples = []
        for index in range(size):
            length = int(torch.randint(3, 12, (1,), generator=generator))
            row = torch.randint(1, 61, (length,), generator=generator)
            row[-1] = int(torch.randint(1, 17, (1,), generator=generator))
            ids, mask = padded_batch([row], "left" if index % 2 else "right", length=12)
            self.examples.append({"input_ids": ids[0], "attention_mask": mask[0], "labels": int(row[-1]) % 2})

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


@pytest.mark.slow
def test_lora_fine_tuning_through_trainer(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from modeling_rat.training.lora import lora_target_modules

    def base_model():
        torch.manual_seed(0)
        return RatForSequenceClassification(tiny_config(LAYER_PATTERNS["rat+sliding"], num_labels=2))

    lora_config = LoraConfig(r=8, lora_alpha=16, target_modules=lora_target_modules(base_model().config), task_type="SEQ_CLS")
    model = get_peft_model(base_model(), lora_config)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert any("lora_" in name for name in trainable) and any("score" in name for name in trainable)
    assert not any("embed_tokens" in name or "norm" in name for name in trainable)
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=60, per_device_train_batch_size=16, learning_rate=1e-2,
        logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=LastTokenParity(256, seed=0))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses

    evaluation = LastTokenParity(64, seed=1)
    batch = {key: torch.stack([torch.as_tensor(example[key]) for example in evaluation]) for key in evaluation[0]}
    model.eval()
    with torch.no_grad():
        trained_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    accuracy = (trained_logits.argmax(-1) == batch["labels"]).float().mean().item()
    assert accuracy > 0.75, accuracy

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(reloaded_logits, trained_logits)
