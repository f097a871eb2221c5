"""Training data and helpers: the standard-library corpus and code summarization task (no leakage between
splits), tokenizer training, ROUGE, and clear errors for bad input (missing columns, empty splits, too-long
examples, tokenizers without a padding token)."""

import json
import textwrap

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import ROOT
from modeling_rat.training import (
    check_columns,
    check_not_empty,
    ensure_pad_token,
    rouge_scores,
    train_byte_level_bpe,
    truncate_to_tokens,
)


import pretrain  # noqa: E402
import sft_summarization  # noqa: E402
import stdlib_data  # noqa: E402


# ========================================================================================= a fake standard library

SHARED_BODY = '''
def {name}(values):
    """Add up the values of a sequence of numbers."""
    total = 0
    for value in values:
        total += value
    return total
'''


def fake_library(root, packages=24):
    """Packages spread over the three splits; every package also holds one function whose body is identical across
    all packages (only the name differs), which deduplication must keep in one split only."""
    for index in range(packages):
        package = root / f"pkg{index}"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(SHARED_BODY.format(name=f"total_{index}"))
        (package / "tools.py").write_text(textwrap.dedent(f'''
            def scale_{index}(x, factor={index + 2}):
                """Multiply x by the package factor and return the product."""
                # a comment that must not survive
                return x * factor

            class Box{index}:
                def area(self):
                    """Compute the area of the box from its sides."""
                    return self.width * self.height * {index + 1}

                def undocumented(self):
                    return {index}
            '''))
    (root / "test").mkdir()
    (root / "test" / "test_things.py").write_text('def helper():\n    """Never part of any split at all."""\n    return 1\n')
    (root / "site-packages").mkdir()
    (root / "site-packages" / "thirdparty.py").write_text('def f():\n    """Third party code is excluded."""\n    return 2\n')
    return root


def test_standard_library_modules_exclude_tests_and_third_party(tmp_path):
    root = fake_library(tmp_path / "lib")
    names = [module.name for module in stdlib_data.standard_library_modules(root)]
    assert "pkg0" in names and "pkg0.tools" in names
    assert not any(name.startswith(("test", "site-packages", "thirdparty")) for name in names)
    real = stdlib_data.standard_library_modules()
    real_names = {module.name for module in real}
    assert {"json", "collections", "email.parser"} <= real_names
    assert not any(name.split(".")[0] in ("test", "idlelib", "lib2to3") for name in real_names)


def test_code_summarization_splits_do_not_leak(tmp_path):
    root = fake_library(tmp_path / "lib")
    dataset = stdlib_data.code_summarization_dataset(root=root)
    assert set(dataset) == {"train", "validation", "test"}
    assert all(len(dataset[split]) > 0 for split in dataset), {split: len(dataset[split]) for split in dataset}
    packages = {split: {module.split(".")[0] for module in dataset[split]["module"]} for split in dataset}
    assert not packages["train"] & packages["validation"]
    assert not packages["train"] & packages["test"]
    assert not packages["validation"] & packages["test"]
    codes = [code for split in dataset for code in dataset[split]["code"]]
    assert len(codes) == len(set(codes))
    # The shared body appears once in the whole dataset, whatever the function's name.
    shared = [code for code in codes if "total += value" in code]
    assert len(shared) == 1
    for split in dataset:
        for code, summary in zip(dataset[split]["code"], dataset[split]["summary"]):
            assert summary not in code, "the target docstring must be removed from the code"
            assert "#" not in code, "comments are dropped by re-printing the syntax tree"
            assert code.startswith("def ")
    assert not any("undocumented" in code for code in codes)
    assert not any("Never part" in s or "Third party" in s for split in dataset for s in dataset[split]["summary"])


def test_pretraining_corpus_uses_the_same_package_split(tmp_path):
    root = fake_library(tmp_path / "lib")
    corpus = stdlib_data.standard_library_corpus(root=root)
    summarization = stdlib_data.code_summarization_dataset(root=root)
    for split in ("train", "validation", "test"):
        corpus_packages = {doc["module"].split(".")[0] for doc in corpus[split]}
        task_packages = {module.split(".")[0] for module in summarization[split]["module"]}
        assert task_packages <= corpus_packages
    # pretrain.py trains on the train packages only, so no summarization test function is seen in pretraining.
    train_text = "".join(doc["text"] for doc in corpus["train"])
    for name in summarization["test"]["name"]:
        assert f"def {name}(" not in train_text or name == "area"


def test_split_of_is_stable_and_checks_fractions():
    assert stdlib_data.split_of("json") == stdlib_data.split_of("json")
    assignments = [stdlib_data.split_of(f"package{i}") for i in range(2000)]
    assert 0.07 < assignments.count("test") / 2000 < 0.13
    assert 0.07 < assignments.count("validation") / 2000 < 0.13
    assert stdlib_data.split_of("anything", 0.0, 0.0) == "train"
    with pytest.raises(ValueError, match="fractions"):
        stdlib_data.split_of("json", 0.6, 0.5)


def test_docstring_summary():
    assert stdlib_data.docstring_summary("Return the sum of values.\n\nMore text here.") == "Return the sum of values."
    assert stdlib_data.docstring_summary("Return the value of x.y. Then more.") == "Return the value of x.y."
    assert stdlib_data.docstring_summary("Spans\ntwo lines of text here.") == "Spans two lines of text here."
    assert stdlib_data.docstring_summary("Too short") is None
    assert stdlib_data.docstring_summary(">>> f(1)\n2") is None


@pytest.mark.slow
def test_real_standard_library_task():
    dataset = stdlib_data.code_summarization_dataset()
    sizes = {split: len(dataset[split]) for split in dataset}
    assert sizes["train"] > 1000 and sizes["validation"] > 50 and sizes["test"] > 50, sizes
    modules = {split: set(dataset[split]["module"]) for split in dataset}
    assert not modules["train"] & modules["test"] and not modules["train"] & modules["validation"]
    codes = [code for split in dataset for code in dataset[split]["code"]]
    assert len(codes) == len(set(codes))


# ============================================================================================ tokenizers, ROUGE


def test_byte_level_bpe_round_trips_any_text():
    tokenizer = train_byte_level_bpe(["def add(a, b):\n    return a + b\n"] * 20 + ["print('héllo wörld')"], vocab_size=300)
    text = "def añadir(x):\n\treturn x * 2  # ✓\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    with pytest.raises(ValueError, match="at least 260"):
        train_byte_level_bpe(["x"], vocab_size=100)


def test_truncate_to_tokens_cuts_at_a_token_boundary():
    tokenizer = train_byte_level_bpe(["the quick brown fox jumps over the lazy dog"] * 10, vocab_size=300)
    text = "the quick brown fox jumps over the lazy dog again and again"
    kept, cut = truncate_to_tokens(tokenizer, text, 4)
    assert cut and text.startswith(kept)
    assert len(tokenizer(kept, add_special_tokens=False)["input_ids"]) == 4
    assert truncate_to_tokens(tokenizer, "the dog", 10) == ("the dog", False)
    with pytest.raises(ValueError):
        truncate_to_tokens(tokenizer, text, 0)


def test_rouge_scores():
    perfect = rouge_scores(["return the sum of values"], ["Return the sum of values."])
    assert perfect == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    assert rouge_scores(["apples"], ["bananas are yellow"])["rouge1"] == 0.0
    partial = rouge_scores(["return the values", "x"], ["return the sum of values", "x"])
    assert 50 < partial["rouge1"] < 100
    with pytest.raises(ValueError, match="2 predictions for 1"):
        rouge_scores(["a", "b"], ["a"])


def _word_tokenizer(pad=True, eos=True):
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["[UNK]"] + (["[PAD]"] if pad else []) + (["[EOS]"] if eos else [])
    tokenizer.train_from_iterator(["a b c"], trainers.WordLevelTrainer(special_tokens=special))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]" if pad else None,
                                   eos_token="[EOS]" if eos else None)


def test_tokenizer_without_pad_token():
    assert ensure_pad_token(_word_tokenizer()).pad_token == "[PAD]"
    tokenizer = ensure_pad_token(_word_tokenizer(pad=False))
    assert tokenizer.pad_token == "[EOS]", "documented handling: the EOS token pads"
    with pytest.raises(ValueError, match="neither a padding token nor an end-of-sequence token"):
        ensure_pad_token(_word_tokenizer(pad=False, eos=False))


# ============================================================================================== bad input


def write_jsonl(folder, split, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.jsonl", "w") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")


def test_dataset_checks():
    from datasets import Dataset

    dataset = Dataset.from_dict({"dialogue": ["x"], "summary": ["y"]})
    check_columns(dataset, ["dialogue", "summary"], "train")
    with pytest.raises(ValueError, match=r"no column\(s\) \['document'\]; its columns are \['dialogue', 'summary'\]"):
        check_columns(dataset, ["document", "summary"], "train", "--document-column")
    with pytest.raises(ValueError, match="test split is empty"):
        check_not_empty(dataset.select([]), "test")


def test_pretrain_dataset_errors(tmp_path):
    write_jsonl(tmp_path / "data", "train", [{"content": "some text"}] * 4)
    write_jsonl(tmp_path / "data", "validation", [{"content": "more text"}] * 2)
    args = pretrain.build_parser().parse_args(["--dataset", str(tmp_path / "data")])
    with pytest.raises(ValueError, match=r"no column\(s\) \['text'\].*\['content'\].*--text-column"):
        pretrain.load_texts(args)
    write_jsonl(tmp_path / "blank", "train", [{"text": "  "}] * 3)
    write_jsonl(tmp_path / "blank", "validation", [{"text": "fine"}])
    args = pretrain.build_parser().parse_args(["--dataset", str(tmp_path / "blank")])
    with pytest.raises(ValueError, match="train split .* has no non-empty text"):
        pretrain.load_texts(args)
    # No validation split: a part of train is held out.
    write_jsonl(tmp_path / "only-train", "train", [{"text": f"document {i}"} for i in range(20)])
    args = pretrain.build_parser().parse_args(["--dataset", str(tmp_path / "only-train"), "--validation-fraction", "0.2"])
    train, validation, _ = pretrain.load_texts(args)
    assert len(train) == 16 and len(validation) == 4 and not set(train) & set(validation)


def sft_args(*extra):
    return sft_summarization.build_parser().parse_args(list(extra))


def test_sft_dataset_errors(tmp_path):
    rows = [{"dialogue": "a b c", "summary": "a"}] * 3
    for split in ("train", "validation", "test"):
        write_jsonl(tmp_path / "data", split, rows)
    with pytest.raises(ValueError, match=r"no column\(s\) \['document'\].*--document-column and --summary-column"):
        sft_summarization.load_splits(sft_args("--dataset", str(tmp_path / "data")))
    splits = sft_summarization.load_splits(sft_args("--dataset", str(tmp_path / "data"), "--document-column", "dialogue"))
    assert splits["train"].column_names == ["document", "summary"]
    write_jsonl(tmp_path / "two", "train", rows)
    write_jsonl(tmp_path / "two", "validation", rows)
    with pytest.raises(ValueError, match=r"no split\(s\) \['test'\].*--test-split"):
        sft_summarization.load_splits(sft_args("--dataset", str(tmp_path / "two"), "--document-column", "dialogue"))
    # A split whose examples are all unusable is empty after formatting: a clear error, not an empty run.
    from datasets import Dataset

    tokenizer = train_byte_level_bpe(["a b c"] * 5, vocab_size=300)
    empty = Dataset.from_dict({"document": ["", "  "], "summary": ["x", "y"]})
    with pytest.raises(ValueError, match="test split is empty"):
        sft_summarization.to_prompt_completion(empty, tokenizer, sft_args(), "test")


def test_sft_examples_longer_than_max_length_are_cut_to_fit(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from conftest import tiny_config
    from modeling_rat import RatForCausalLM
    from modeling_rat.training.launch import activation_checkpointing_argument

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    tokenizer = train_byte_level_bpe([" ".join(words)] * 10, vocab_size=300)
    long_document = " ".join(words * 30)
    long_summary = " ".join(words * 5)
    split = Dataset.from_dict({"document": [long_document, "alpha beta"], "summary": [long_summary, "gamma delta"]})
    args = sft_args("--max-length", "48", "--max-summary-tokens", "10")
    formatted = sft_summarization.to_prompt_completion(split, tokenizer, args, "train")
    assert formatted["prompt"][0].endswith(sft_summarization.PROMPT_SUFFIX)
    assert formatted["prompt"][1] == "alpha beta" + sft_summarization.PROMPT_SUFFIX, "short examples are untouched"
    assert formatted["reference"][0] == long_summary, "ROUGE compares with the full reference"
    assert len(tokenizer(formatted["completion"][0], add_special_tokens=False)["input_ids"]) <= 10

    # Through TRL's own tokenization: every example fits max_length with its whole (cut) completion supervised.
    model = RatForCausalLM(tiny_config(("rat", "rat"), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id))
    trainer = SFTTrainer(
        model=model, train_dataset=formatted.remove_columns("reference"), processing_class=tokenizer,
        args=SFTConfig(output_dir=str(tmp_path / "out"), max_length=48, report_to="none", bf16=False, use_cpu=True,
                       max_steps=1, shuffle_dataset=False, **activation_checkpointing_argument(False)),
    )
    for example, completion in zip(trainer.train_dataset, formatted["completion"]):
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        assert len(example["input_ids"]) <= 48
        supervised = [label for label in example["labels"] if label != -100]
        assert supervised == completion_ids + [tokenizer.eos_token_id]

    with pytest.raises(ValueError, match="leaves no room for the document"):
        sft_summarization.to_prompt_completion(split, tokenizer, sft_args("--max-length", "12", "--max-summary-tokens", "10"), "train")
