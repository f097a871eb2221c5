"""The lm-evaluation-harness path, unmodified: a tiny remote-code checkpoint through `lm_eval.simple_evaluate` (the
`hf` model, `trust_remote_code=True`) on the offline tasks of examples/eval_tasks, at batch sizes 1 and 4."""

import json
import math

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager

from conftest import ROOT
from modeling_rat import RatConfig, RatForCausalLM


TASKS_DIR = ROOT / "examples" / "eval_tasks"
TASKS = ["stdlib_docstring_choice", "stdlib_docstring_summary"]
LIMIT = 8


def byte_level_tokenizer(texts, vocab_size=320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<pad>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny RAT + sliding-window model with a byte-level BPE, saved as a remote-code checkpoint."""
    rows = [json.loads(line) for line in (TASKS_DIR / "data" / "docstring_summary.jsonl").read_text().splitlines()]
    tokenizer = byte_level_tokenizer([row["code"] + "\nSummary: " + row["summary"] for row in rows])
    torch.manual_seed(0)
    config = RatConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       chunk_size=4, layer_types=["rat", "sliding_attention"], sliding_window=16,
                       rnn_forget_gate_init_length=128, initializer_range=0.3,  # peaked distributions: differences show
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.bos_token_id)
    folder = tmp_path_factory.mktemp("lm-eval") / "tiny-rat"
    RatForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def evaluate(checkpoint, batch_size):
    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={checkpoint},trust_remote_code=True,dtype=float32", tasks=TASKS,
        batch_size=batch_size, device="cpu", limit=LIMIT, log_samples=True,
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
    )


@pytest.mark.slow
def test_batch_sizes_1_and_4_give_the_same_loglikelihoods_and_generations(checkpoint):
    one, four = evaluate(checkpoint, 1), evaluate(checkpoint, 4)

    def loglikelihoods(results):
        samples = sorted(results["samples"]["stdlib_docstring_choice"], key=lambda sample: sample["doc_id"])
        return torch.tensor([[response[0][0] for response in sample["resps"]] for sample in samples], dtype=torch.float64)

    single, batched = loglikelihoods(one), loglikelihoods(four)
    assert single.shape == (LIMIT, 4), "four choices per example"
    assert torch.isfinite(single).all() and (single < 0).all()
    assert single.std() > 1.0, "a random model with peaked weights scores the choices differently"
    # batched rows are right-padded to the longest request; only float summation order may differ
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-4)

    def generations(results):
        samples = sorted(results["samples"]["stdlib_docstring_summary"], key=lambda sample: sample["doc_id"])
        return [sample["resps"][0][0] for sample in samples]

    # generation batches are left-padded: each row must continue exactly as alone (greedy)
    assert generations(four) == generations(one)
    assert len(generations(one)) == LIMIT
    for results in (one, four):
        choice = results["results"]["stdlib_docstring_choice"]
        assert 0 <= choice["acc,none"] <= 1 and 0 <= choice["acc_norm,none"] <= 1
        summary = results["results"]["stdlib_docstring_summary"]
        assert 0 <= summary["rougeL,none"] <= 100 and math.isfinite(summary["rouge1,none"])
