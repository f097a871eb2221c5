"""The model card (`README.md`) of a staged Hub folder, filled in from `model_card_template.md`, and its usage snippet."""

import json
import logging
import math
import os
import string
import textwrap
from pathlib import Path

from ..configuration_rat import PAPER_LAYER_PATTERNS
from . import HubUploadError


logger = logging.getLogger("hub_upload")

TEMPLATE = Path(__file__).resolve().with_name("model_card_template.md")
DEFAULT_LICENSE = "apache-2.0"
# Results shown in a table cell: longer texts and lists are not table material.
MAX_CELL_CHARACTERS = 120
# Lists of records in the results (e.g. sample predictions) become a table of their own, with at most this many rows.
MAX_EXAMPLE_ROWS = 5
# The key of the results file that names the fine-tuning prompt format (see `read_prompt_format`).
PROMPT_FORMAT_KEY = "prompt_format"


# ============================================================================================ the results file


def read_metrics(path) -> dict:
    """The `--metrics` JSON file: an object of results (nested objects allowed)."""
    try:
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HubUploadError(f"Cannot read --metrics {path} as JSON: {error}") from error
    if not isinstance(metrics, dict):
        raise HubUploadError(f"--metrics {path} must hold a JSON object (metric name -> value), not a {type(metrics).__name__}.")
    return metrics


def is_local_path(text: str, folders=()) -> bool:
    """
    Whether `text` names a file or folder of this machine: an absolute or home-relative path, or a relative one that
    exists here or in one of `folders`. Such values are never published: they mean nothing to readers of the card and
    may expose the machine's layout.
    """
    if not isinstance(text, str) or not text.strip() or "\n" in text:
        return False
    expanded = os.path.expanduser(text)
    if os.path.isabs(expanded) or expanded != text:
        return True
    return any(_exists(Path(folder) / text) for folder in (Path.cwd(), *folders))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long, or holding a NUL byte: not a file of this machine
        return False


def check_prompt_format(prompt_format, where: str = "the prompt format") -> str:
    """
    The name of the input field of `prompt_format`, which must be a format string with exactly one named field, e.g.
    "{document}\\nSummary:". `where` names its origin in the error.
    """
    if not isinstance(prompt_format, str):
        raise HubUploadError(f"{where} must be a string, got {prompt_format!r}.")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(prompt_format) if field is not None]
    except ValueError as error:
        raise HubUploadError(f"{where} {prompt_format!r} is not a format string ({error}): write literal braces as {{{{ }}}}.") from error
    if len(fields) != 1 or not fields[0].isidentifier():
        raise HubUploadError(
            f"{where} {prompt_format!r} must hold exactly one input field in braces, e.g. '{{document}}\\nSummary:'; "
            f"found {fields or 'none'}."
        )
    return fields[0]


def _flatten(metrics: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _cell(value) -> str:
    """A value as a markdown table cell: numbers rounded, text on one line with `|` escaped."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    text = " ".join(str(value).split())
    if len(text) > MAX_CELL_CHARACTERS:
        text = text[: MAX_CELL_CHARACTERS - 1] + "…"
    return text.replace("|", "\\|")


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def results_section(metrics: dict, folders=()) -> str:
    """
    The card's results: one table of metrics (nested keys joined with dots), and a table per list of records (e.g.
    sample predictions, at most `MAX_EXAMPLE_ROWS` rows). Local paths are left out, and so are texts too long for a
    cell and lists of anything else; each omission is logged.
    """
    rows, tables, left_out = [], [], []
    for name, value in _flatten({key: value for key, value in metrics.items() if key != PROMPT_FORMAT_KEY}):
        if isinstance(value, str) and is_local_path(value, folders):
            left_out.append(f"{name} (a local path)")
        elif isinstance(value, str) and ("\n" in value.strip() or len(value) > MAX_CELL_CHARACTERS):
            left_out.append(f"{name} (text too long for a table)")
        elif _is_scalar(value):
            rows.append(f"| {_cell(name)} | {_cell(value)} |")
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            columns = list(dict.fromkeys(key for item in value for key, field in item.items() if _is_scalar(field)))
            if not columns:
                left_out.append(f"{name} (records without plain values)")
                continue
            lines = [f"### {name}", "", "| " + " | ".join(_cell(column) for column in columns) + " |",
                     "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(item.get(column, "")) for column in columns) + " |" for item in value[:MAX_EXAMPLE_ROWS]]
            if len(value) > MAX_EXAMPLE_ROWS:
                lines += ["", f"({MAX_EXAMPLE_ROWS} of {len(value)} shown.)"]
            tables.append("\n".join(lines))
        elif isinstance(value, list) and all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value) and len(value) <= 8:
            rows.append(f"| {_cell(name)} | {', '.join(_cell(item) for item in value)} |")
        else:
            left_out.append(f"{name} (a {type(value).__name__} that is not a table value)")
    if left_out:
        logger.info("Left out of the model card's results: " + "; ".join(left_out))
    sections = []
    if rows:
        sections.append("\n".join(["| Metric | Value |", "|---|---|", *rows]))
    sections += tables
    if not sections:
        return ""
    return "## Training and evaluation results\n\n" + "\n\n".join(sections) + "\n\n"


# ================================================================================================ the snippet


def _python_string(text: str) -> str:
    """`text` as a double-quoted Python string literal."""
    return json.dumps(text, ensure_ascii=False)


def usage_snippet(repo_id: str, has_tokenizer: bool, vocab_size: int, prompt_format: str | None = None) -> str:
    """
    The model card's Python example, as generated here (validation runs it, with `repo_id` the staged folder). With a
    `prompt_format`, it prompts the model the way it was fine-tuned; otherwise it continues a neutral text.
    """
    if not has_tokenizer:
        example_ids = list(range(1, min(9, vocab_size)))
        return textwrap.dedent(
            f"""\
            import torch
            from transformers import AutoModelForCausalLM

            repo_id = {_python_string(repo_id)}
            model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)

            # This repository has no tokenizer: use the one the model was trained with to make token ids.
            input_ids = torch.tensor([{example_ids}])
            outputs = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=20, do_sample=False)
            print(outputs[0].tolist())
            """
        )
    if prompt_format is None:
        prompt_lines = 'prompt = "Your text here."\n'
    else:
        field = check_prompt_format(prompt_format)
        prompt_lines = (
            "# The prompt format the model was fine-tuned with; it writes what follows.\n"
            f"prompt = {_python_string(prompt_format)}.format({field}={_python_string(f'Your {field} here.')})\n"
        )
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"repo_id = {_python_string(repo_id)}\n"
        "tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)\n"
        "model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)\n\n"
        f"{prompt_lines}"
        'inputs = tokenizer(prompt, return_tensors="pt")\n'
        "outputs = model.generate(**inputs, max_new_tokens=40, do_sample=False)\n"
        "print(tokenizer.decode(outputs[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))\n"
    )


# ================================================================================================== the card


def _format_count(count: int) -> str:
    for threshold, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= threshold:
            return f"{count / threshold:.3g}{suffix}"
    return str(count)


def describe_layer_pattern(layer_types: list[str]) -> str:
    """`['rat', 'sliding_attention'] * 12` -> "(`rat`, `sliding_attention`) × 12 (24 layers)"."""
    count = len(layer_types)
    for period in range(1, count + 1):
        if count % period == 0 and layer_types == layer_types[:period] * (count // period):
            break
    unit = ", ".join(f"`{layer_type}`" for layer_type in layer_types[:period])
    if period == 1:
        return f"{count} × {unit}"
    if period == count:
        return f"{unit} ({count} layers)"
    return f"({unit}) × {count // period} ({count} layers)"


def paper_model_name(layer_types: list[str]) -> str | None:
    """Which of the paper's five models this layer pattern is, if any."""
    for name, pattern in PAPER_LAYER_PATTERNS.items():
        if layer_types == [pattern(i) for i in range(len(layer_types))]:
            return name
    return None


def _architecture_rows(model) -> list[str]:
    config = model.config
    layer_types = list(config.layer_types)
    parameters = model.num_parameters()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    rows = [
        f"| Parameters | {_format_count(parameters)} ({parameters:,}) |",
        f"| Layers | {describe_layer_pattern(layer_types)} |",
        f"| Hidden size | {config.hidden_size} (MLP {config.intermediate_size}, {config.hidden_act}) |",
        f"| Heads | {config.num_attention_heads} of size {config.head_dim}; {config.num_qk_groups} key/query groups in RAT layers |",
    ]
    if "rat" in layer_types:
        rows.append(f"| Chunk size | {config.chunk_size} |")
    if "sliding_attention" in layer_types:
        rows.append(
            f"| Sliding window | {config.sliding_window} tokens, the query included (official `window_size` {config.sliding_window - 1}) |"
        )
    if "rnn" in layer_types:
        rows.append(
            f"| rnn forget gates | initialised for {config.rnn_forget_gate_init_length}-token sequences "
            "(`rnn_forget_gate_init_length`) |"
        )
    rows += [
        f"| Vocabulary | {config.vocab_size} |",
        "| Context length | no limit (rotary angles follow the chunk or token index) |",
        f"| Weights | safetensors, {dtype} |",
    ]
    return rows


def model_card(
    model,
    repo_id: str,
    usage: str,
    has_tokenizer: bool = False,
    prompt_format: str | None = None,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    metrics: dict | None = None,
    metrics_folders=(),
    tags: list[str] | None = None,
    model_name: str | None = None,
    description: str | None = None,
) -> str:
    """
    The model card (`README.md`): YAML metadata, description, `usage` (the snippet of `usage_snippet`), architecture,
    results (`metrics`, see `results_section`; relative paths are looked up in `metrics_folders` too), citation.
    """
    from huggingface_hub import ModelCardData

    layer_types = list(model.config.layer_types)
    paper_model = paper_model_name(layer_types)
    all_tags = list(dict.fromkeys(["rat", "text-generation", "custom_code", *([paper_model] if paper_model else []), *(tags or [])]))
    metadata = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=all_tags,
        base_model=base_model,
        datasets=list(datasets) if datasets else None,
    )
    summary = [description or (
        f"A {_format_count(model.num_parameters())}-parameter RAT language model"
        + (f" (the paper's `{paper_model}` layout)" if paper_model else "") + "."
    )]
    if base_model:
        summary.append(f"Fine-tuned from [{base_model}](https://huggingface.co/{base_model}).")
    if datasets:
        summary.append("Trained on " + ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets) + ".")
    tokenizer_note = (
        "\nThe tokenizer takes it too: `AutoTokenizer` first reads the model's `config.json`, which names this code "
        "(without the flag,\ntransformers asks whether to run it)." if has_tokenizer else ""
    )
    prompt_note = ""
    if prompt_format is not None:
        prompt_note = (
            f"The model was fine-tuned on prompts of the form `{_python_string(prompt_format)}` (a Python format string): "
            "give it a prompt in that form and it writes the completion.\n\n"
        )
    return string.Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        metadata=metadata.to_yaml().strip(),
        title=model_name or repo_id.split("/")[-1],
        summary="\n\n".join(summary),
        tokenizer_note=tokenizer_note,
        prompt_note=prompt_note,
        usage=usage.rstrip("\n"),
        architecture="\n".join(_architecture_rows(model)),
        results=results_section(metrics, metrics_folders) if metrics else "",
    )
