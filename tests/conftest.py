"""Shared helpers: tiny models, the official fixtures, offline settings."""

import os
from pathlib import Path

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter. The kernels are built when
# `modeling_rat.rat_triton` is imported, so this must be set before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]

from modeling_rat import RatConfig, RatForCausalLM  # noqa: E402


# Logits produced by the official RAT code (see tests/fixtures/README.md); RAT_FIXTURES points elsewhere if needed.
FIXTURES = Path(os.environ.get("RAT_FIXTURES", ROOT / "tests" / "fixtures"))
LAYER_PATTERNS = {
    "rat": ["rat", "rat"],
    "rnn": ["rnn", "rnn"],
    "attention": ["full_attention", "full_attention"],
    "rat+sliding": ["rat", "sliding_attention"],
    "rat+full": ["rat", "full_attention"],
    "attention+sliding": ["full_attention", "sliding_attention"],
}


def tiny_config(layer_types=("rat", "rat"), **overrides) -> RatConfig:
    arguments = dict(
        vocab_size=61,
        hidden_size=32,
        num_hidden_layers=len(layer_types),
        num_attention_heads=4,
        num_qk_groups=2,
        chunk_size=4,
        layer_types=list(layer_types),
        sliding_window=6,
        initializer_range=0.3,  # larger than the 0.02 default so that attention is peaked and mistakes show
        rnn_forget_gate_init_length=64,
        pad_token_id=0,
    )
    arguments.update(overrides)
    return RatConfig(**arguments)


def tiny_model(layer_types=("rat", "rat"), seed=0, dtype=torch.float32, **overrides) -> RatForCausalLM:
    torch.manual_seed(seed)
    model = RatForCausalLM(tiny_config(layer_types, **overrides)).eval()
    return model.to(dtype)


def random_ids(batch, length, vocab=61, seed=1):
    """Token ids that avoid 0 (the tiny models' pad token), so that generate() never mistakes them for padding."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=generator)


def fixture_paths():
    return sorted(FIXTURES.glob("*.pt")) if FIXTURES.is_dir() else []


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
