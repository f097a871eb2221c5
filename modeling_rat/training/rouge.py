"""ROUGE for summarization, as the literature reports it (`rouge-score`, stemmed F1 x 100)."""

from __future__ import annotations

from collections.abc import Sequence


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (x100) of `predictions` against `references`, with `rouge-score` and Porter stemming."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    if not predictions:
        raise ValueError("No predictions to score.")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * value / len(predictions) for key, value in totals.items()}
