"""Data and scoring of the offline lm-evaluation-harness tasks in this folder, built from the code summarization test
split of the Python standard library (functions never seen in pretraining): `data/*.jsonl`, rebuilt by
`python examples/evaluate.py build-tasks`. The YAML files name these functions with `!function`."""

from pathlib import Path


DATA = Path(__file__).resolve().parent / "data"


def _load(name: str):
    from datasets import Dataset, DatasetDict

    path = DATA / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build it with `python examples/evaluate.py build-tasks`.")
    return DatasetDict({"test": Dataset.from_json(str(path))})


def docstring_choice(**metadata):
    """Multiple choice: a function's code, and four one-sentence summaries, one of them from its docstring."""
    return _load("docstring_choice")


def docstring_summary(**metadata):
    """Generation: a function's code; the first sentence of its docstring is the reference."""
    return _load("docstring_summary")


def summary_scores(doc, results):
    """ROUGE-1 and ROUGE-L F1 (x 100, stemmed) of the generated summary against the docstring's first sentence."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = scorer.score(doc["summary"], results[0].strip())
    return {name: 100 * score.fmeasure for name, score in scores.items()}
