"""
Publishing RAT checkpoints on the Hugging Face Hub: the modules behind `hub_upload.py`. None of them is part of the
remote-code bundle saved beside the weights.

- `staging.py`: load the model to publish (a checkpoint folder, or an official checkpoint converted on the fly) and
  write the Hub folder: weights, config and code, generation config, tokenizer, model card.
- `model_card.py` with `model_card_template.md`: the model card (`README.md`) and its usage snippet.
- `validation.py`: load the staged folder in a separate process without this package and compare it with the source.
- `isolated_check.py`: the script that process runs (nothing of this package is importable there).
- `upload.py`: the upload as one commit, and messages for the Hub's errors.
"""


class HubUploadError(Exception):
    """A refusal with a message that says what was wrong and what to do; `hub_upload.py` prints it and exits with 2."""
