"""
Loading what a command line names (a dataset, a tokenizer, a RAT model) from a local path or the Hub, with errors
that say what is wrong: a local path that does not exist is reported as such (not as a malformed Hub name), an empty
data file as empty, a folder without a tokenizer or with another architecture by what it lacks.
"""

from __future__ import annotations

from pathlib import Path


# Local data files, by suffix, and the `datasets` builder that reads them.
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
                      ".txt": "text", ".arrow": "arrow"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def is_local_path(name: str) -> bool:
    """
    Whether `name` can only mean a local path: Hub names are `name` or `owner/name`, so anything starting with `/`,
    `.` or `~`, holding a backslash or two slashes, or ending in a data-file suffix is local.
    """
    return (name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
            or Path(name).suffix.lower() in DATA_FILE_BUILDERS)


def check_location(name: str, option: str, want_folder: bool = True) -> Path | None:
    """
    The local path `name` (given with `option`) points to, or None for a Hub name. Raises FileNotFoundError for a
    local path that does not exist and NotADirectoryError for a file where a folder is needed.
    """
    path = Path(name).expanduser()
    if path.exists():
        if want_folder and not path.is_dir():
            raise NotADirectoryError(f"{option} {name} is a file; a folder is needed.")
        return path
    if is_local_path(name):
        raise FileNotFoundError(f"{option} {name}: no such file or folder.")
    return None


def load_dataset_dict(name: str, config_name: str | None = None, option: str = "--dataset"):
    """
    `datasets.load_dataset` for a Hub dataset, a local dataset folder, or a single local data file (.jsonl, .json,
    .csv, .tsv, .parquet, .txt, .arrow: its rows become the "train" split), with clear errors for missing paths,
    empty data files (no rows, or a CSV with only a header) and unreadable ones.
    """
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    path = check_location(name, option, want_folder=False)
    if path is not None and path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{option} {name}: unknown data file type {path.suffix!r}; use one of "
                             f"{sorted(DATA_FILE_BUILDERS)} or a dataset folder.")
        arguments = dict(path=builder, data_files={"train": str(path)},
                         **({"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}))
    else:
        arguments = dict(path=str(path) if path is not None else name, name=config_name)
    try:
        return load_dataset(**arguments)
    except StopIteration:  # the json reader on an empty file
        raise ValueError(f"{option} {name}: a data file is empty (no rows).") from None
    except DatasetGenerationError as error:
        cause = error.__cause__ or error
        raise ValueError(f"{option} {name}: cannot read its data ({type(cause).__name__}: {cause}).") from None
    except ValueError as error:
        if "corresponds to no data" in str(error):  # a split whose files hold no rows (e.g. a header-only CSV)
            raise ValueError(f"{option} {name}: a split has no rows (an empty file, or a CSV with only a "
                             "header).") from None
        raise
    except ConnectionError as error:
        raise ConnectionError(f"{option} {name} is not a local file or folder, and the Hub cannot be reached to "
                              f"find it there ({error}).") from None


def load_tokenizer(name: str, option: str = "--tokenizer", **kwargs):
    """`AutoTokenizer.from_pretrained(name)`, refusing a missing local path or a folder that holds no tokenizer."""
    from transformers import AutoTokenizer

    path = check_location(name, option)
    if path is not None and not any((path / file).is_file() for file in TOKENIZER_FILES):
        elsewhere = "name another tokenizer folder or Hub name"
        if option != "--tokenizer":
            elsewhere += " with --tokenizer"
        raise FileNotFoundError(
            f"{option} {name} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}). Save one into it with "
            f"`tokenizer.save_pretrained(folder)`, or {elsewhere}."
        )
    return AutoTokenizer.from_pretrained(str(path) if path is not None else name, **kwargs)


def check_rat_model(name: str, option: str = "--model", **kwargs):
    """
    The configuration of the model `name` names (local folder or Hub), refusing a missing path, a folder without
    `config.json`, or a model of another architecture. Keyword arguments go to `AutoConfig.from_pretrained`.
    """
    from transformers import AutoConfig

    path = check_location(name, option)
    if path is not None and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{option} {name} holds no model (no config.json): name a folder written by "
                                "save_pretrained, e.g. the output folder of examples/pretrain.py.")
    config = AutoConfig.from_pretrained(str(path) if path is not None else name, **kwargs)
    if config.model_type != "rat":
        raise ValueError(
            f"{option} {name} is a {config.model_type!r} model; this command trains RAT models (model_type 'rat'), "
            "such as the output of examples/pretrain.py or a checkpoint converted with "
            "`python -m modeling_rat.convert_official`."
        )
    return config

