"""Publish a RAT checkpoint on the Hugging Face Hub, checked before anything leaves the machine.

    python hub_upload.py SOURCE --repo-id OWNER/NAME [--dry-run] [--staging-dir DIR] [options]

SOURCE is a checkpoint directory written by `save_pretrained` (or a Trainer checkpoint folder), or an official RAT
checkpoint file (`.pth`/`.pt`, github CLAIRE-Labo/RAT) converted on the fly: its training config, when it carries one,
gives the architecture; otherwise give what the weights do not fix (`--layer-pattern`, `--chunk-size`, `--window` for
sliding-window layers; see `python -m modeling_rat.convert_official --help`).

What happens, in order:

1. Load the source model with this package (a checkpoint folder must load completely: missing or unexpected weights,
   or weights that are not finite, stop here).
2. Stage the Hub folder: safetensors weights (sharded above `--max-shard-size`), `config.json` with an `auto_map`,
   the model's code (`configuration_rat.py`, `modeling_rat.py` and the modules it imports), `generation_config.json`,
   the tokenizer files (`--tokenizer`, or SOURCE's own), and a model card `README.md`. Nothing else: optimizer states
   and pickled files of a training folder are never staged, nor are training leftovers (`use_cache: false`, the
   tokenizer's local loading options) or local paths from `--metrics`.
3. Validate in a separate Python process in which this package cannot be imported (and neither can triton, peft,
   trl or accelerate), as on the machine of someone who only has transformers: load the staged folder with
   `trust_remote_code=True`, run a forward pass and a short greedy generation on a left-padded batch, and compare
   them with the source model's; run the model card's usage snippet (the one this tool writes, never text given on
   the command line) against the staged folder. Any failure refuses the upload and says why.
4. List the files and their sizes. With `--dry-run`, stop here: nothing touches the network.
5. Upload through huggingface_hub: `create_repo`, then everything in ONE commit (`upload_folder`), so that a failed
   upload leaves the repo as it was. Weights of an earlier upload that the new commit does not overwrite (other
   shard names) are deleted in that same commit. The token comes from `--token`, `HF_TOKEN` or the saved login
   (`hf auth login`).
"""

import argparse
import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path

from modeling_rat.convert_official import add_conversion_arguments, conversion_options
from modeling_rat.hub import HubUploadError
from modeling_rat.hub.model_card import (
    DEFAULT_LICENSE,
    PROMPT_FORMAT_KEY,
    check_prompt_format,
    is_local_path,
    model_card,
    read_metrics,
    usage_snippet,
)
from modeling_rat.hub.staging import (
    format_size,
    load_source_model,
    load_tokenizer,
    prepare_staging_dir,
    stage_checkpoint,
    staged_files,
    tokenizer_source,
)
from modeling_rat.hub.upload import resolve_token, upload_staged_folder
from modeling_rat.hub.validation import validate_staged_folder


logger = logging.getLogger("hub_upload")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hub_upload.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="checkpoint folder (save_pretrained output) or official .pth checkpoint file")
    parser.add_argument("--repo-id", required=True, help="Hub repository OWNER/NAME (created if it does not exist)")
    parser.add_argument("--dry-run", action="store_true", help="stage, validate and list the files, upload nothing (no network)")
    parser.add_argument("--staging-dir", help="stage into this empty or new folder and keep it (default: a temporary folder, removed)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="publish the weights in this dtype (default: as stored)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file; bigger models are sharded (default: 5GB)")
    parser.add_argument("--tokenizer", metavar="PATH_OR_NAME", help="tokenizer to publish with the model (default: SOURCE's, if it has one)")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help=f"license of the model card (default: {DEFAULT_LICENSE})")
    parser.add_argument("--base-model", help="Hub id of the model this one was fine-tuned from (model card metadata)")
    parser.add_argument("--datasets", nargs="+", metavar="DATASET", help="Hub ids of the training datasets (model card metadata)")
    parser.add_argument("--metrics", metavar="JSON", help="JSON file of training/evaluation results, shown in the model card")
    parser.add_argument(
        "--prompt-format", metavar="FORMAT",
        help="prompt format of the fine-tuning task, its input in braces, e.g. '{document}\\nSummary:' (\\n and \\t are read "
             "as a new line and a tab); the model card's usage snippet prompts that way (default: the "
             f"'{PROMPT_FORMAT_KEY}' of --metrics, else a neutral prompt)",
    )
    parser.add_argument("--tags", nargs="+", metavar="TAG", help="extra model card tags (`rat` is always there)")
    parser.add_argument("--model-name", help="title of the model card (default: the repo name)")
    parser.add_argument("--description", help="first paragraph of the model card (shown as written, never run)")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing public repo is refused)")
    parser.add_argument("--revision", help="branch to commit to (created from main if needed; default: main)")
    parser.add_argument("--commit-message", default="Upload RAT model", help="message of the upload commit")
    parser.add_argument("--token", help="Hub token with write access (default: HF_TOKEN, then the saved `hf auth login`)")
    parser.add_argument("--validation-timeout", type=float, default=3600, help="seconds allowed for the isolated load check (default: 3600)")
    add_conversion_arguments(parser.add_argument_group("official checkpoints (SOURCE is a .pth file)"))
    return parser


def _check_hub_ids(args: argparse.Namespace):
    """The repository, base model and dataset ids must be Hub ids; the card links the last two, so never local paths."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    named = [("--repo-id", args.repo_id)] + ([("--base-model", args.base_model)] if args.base_model else [])
    named += [("--datasets", dataset) for dataset in args.datasets or []]
    for option, repo_id in named:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            raise HubUploadError(f"{option} {repo_id!r} is not a valid Hub repository id: {error}") from error
        if option != "--repo-id" and is_local_path(repo_id):
            raise HubUploadError(f"{option} {repo_id!r} is a local path; the model card needs its Hub id (OWNER/NAME).")
    if "/" not in args.repo_id:
        raise HubUploadError(f"--repo-id must be OWNER/NAME (your user or organization name, a slash, the model name), got {args.repo_id!r}.")


def _read_escapes(text: str) -> str:
    """`\\n`, `\\t` and `\\\\` typed on a command line, as a new line, a tab and a backslash."""
    return re.sub(r"\\([nt\\])", lambda match: {"n": "\n", "t": "\t", "\\": "\\"}[match.group(1)], text)


def _check_options(args: argparse.Namespace):
    """Refuse bad options before any work."""
    from transformers.utils.hub import convert_file_size_to_int

    _check_hub_ids(args)
    try:
        if convert_file_size_to_int(args.max_shard_size) <= 0:
            raise ValueError("it must be positive")
    except ValueError as error:
        raise HubUploadError(f"--max-shard-size {args.max_shard_size!r} is not a size such as 5GB or 500MB: {error}") from error
    if not args.validation_timeout > 0:
        raise HubUploadError(f"--validation-timeout must be a positive number of seconds, got {args.validation_timeout}.")


def _prompt_format(args: argparse.Namespace, metrics: dict | None) -> str | None:
    """The fine-tuning prompt format: `--prompt-format`, else the one `--metrics` names, else None (unknown)."""
    if args.prompt_format is not None:
        prompt_format, where = _read_escapes(args.prompt_format), "--prompt-format"
    elif PROMPT_FORMAT_KEY in (metrics or {}):
        prompt_format, where = metrics[PROMPT_FORMAT_KEY], f"{PROMPT_FORMAT_KEY} in --metrics {args.metrics}"
    else:
        return None
    check_prompt_format(prompt_format, where)
    return prompt_format


def publish(args: argparse.Namespace) -> int:
    import torch

    _check_options(args)
    metrics = read_metrics(args.metrics) if args.metrics else None
    prompt_format = _prompt_format(args, metrics)
    token = None if args.dry_run else resolve_token(args.token)  # before hours of work, not after
    if args.staging_dir:
        prepare_staging_dir(args.staging_dir)
    tokenizer_path = tokenizer_source(args.tokenizer, args.source)

    logger.info(f"Loading {args.source}")
    model = load_source_model(args.source, conversion_options(args), getattr(torch, args.dtype) if args.dtype else None)
    tokenizer = load_tokenizer(tokenizer_path, model) if tokenizer_path else None
    snippet_options = dict(has_tokenizer=tokenizer is not None, vocab_size=model.config.vocab_size, prompt_format=prompt_format)
    card = model_card(
        model, args.repo_id, usage_snippet(args.repo_id, **snippet_options), has_tokenizer=tokenizer is not None,
        prompt_format=prompt_format, license=args.license, base_model=args.base_model, datasets=args.datasets,
        metrics=metrics, metrics_folders=[Path(args.metrics).resolve().parent] if args.metrics else [], tags=args.tags,
        model_name=args.model_name, description=args.description,
    )
    temporary = None if args.staging_dir else tempfile.mkdtemp(prefix="rat-hub-staging-")
    staging_dir = Path(args.staging_dir or temporary)
    try:
        logger.info(f"Staging into {staging_dir}")
        stage_checkpoint(model, staging_dir, card, tokenizer, args.max_shard_size)
        logger.info("Validating: loading the staged folder with trust_remote_code in a process without rat-transformers")
        # The snippet that runs is the card's, generated here, pointing at the staged folder instead of the repo id.
        snippet = usage_snippet(str(staging_dir.resolve()), **snippet_options)
        validate_staged_folder(model, staging_dir, snippet, timeout=args.validation_timeout)
        files = staged_files(staging_dir)
        print(f"{'Would upload' if args.dry_run else 'Uploading'} {len(files)} files to {args.repo_id}"
              f"{f' (revision {args.revision})' if args.revision else ''}:")
        for name, size in files:
            print(f"  {format_size(size):>10}  {name}")
        print(f"  {format_size(sum(size for _, size in files)):>10}  total")
        if args.dry_run:
            kept = f"staged folder kept in {staging_dir}" if temporary is None else "use --staging-dir to keep the staged folder"
            print(f"Dry run: validation passed, nothing was uploaded ({kept}).")
            return 0
        commit = upload_staged_folder(staging_dir, args.repo_id, token, args.private, args.revision, args.commit_message)
        print(f"Uploaded to https://huggingface.co/{args.repo_id}: {getattr(commit, 'commit_url', commit)}")
        return 0
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def main(argv=None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        return publish(args)
    except HubUploadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the file system refused something not covered above (e.g. no temporary folder)
        print(f"error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (an upload is one commit: it either completed or changed nothing)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
